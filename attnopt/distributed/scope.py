"""``ContextParallel``: one sequence layout over a mesh, to shard inputs, gather outputs and attend.

    cp = ContextParallel(mesh["cp"], load_balance=True)
    x_local = cp.shard(x, dim=1)                         # this rank's positions of [B, N, C]
    out_local = cp.attention(q_local, k_local, v_local, causal=True)
    with cp:                                             # every attnopt::attention call attends
        loss = optimized_model(x_local).sum()            # over the whole sequence, forward and
        loss.backward()                                  # backward (call backward inside)

Inside ``with cp`` the op ``torch.ops.attnopt.attention`` that ``attnopt.optimize`` put in
a model reads its q, k, v and its key padding and document rows as this rank's rows of the
sequence, and its causal and window terms over global positions (``op_forward`` /
``op_backward``, which ``attnopt.ops`` calls while a ``ContextParallel`` is active). The
model's other position-dependent parts (position ids, rotary tables) must be given this
rank's positions: ``cp.positions(n)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from attnopt.kernels.spec import Align, Fill, Window

from .context import _backward, _forward, _global_mean_v, context_parallel_attention, make_plan
from .layout import SequenceLayout, gather_sequence, local_shard

#: the ContextParallel scopes entered and not yet left, innermost last (one per process: autograd runs a
#: CUDA backward on its own threads, which must see the scope too)
_ACTIVE: list[ContextParallel | None] = []


def active() -> ContextParallel | None:
    """The innermost entered ``ContextParallel``, or None (also while a scope computes its blocks)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def _blocks():
    """While a scope computes its blocks with the op itself, the op is plain single-process attention."""
    _ACTIVE.append(None)
    try:
        yield
    finally:
        _ACTIVE.pop()


class ContextParallel:
    """A sequence sharded over the 1-D ``mesh``: two mirrored chunks per rank with ``load_balance``
    (even causal work), one chunk without. ``strategy`` as in ``context_parallel_attention``."""

    def __init__(self, mesh, *, load_balance: bool = True, strategy: str = "auto", kernel: str = "auto"):
        from .context import _mesh_group

        self.mesh, self.load_balance, self.strategy, self.kernel = mesh, load_balance, strategy, kernel
        self.group, self.rank, self.world = _mesh_group(mesh)

    def layout(self, length: int) -> SequenceLayout:
        """The layout of a whole sequence of ``length`` positions."""
        return SequenceLayout(length, self.world, self.load_balance)

    def positions(self, length: int, device=None) -> Tensor:
        """The global positions (int64) of this rank's rows of a sequence of ``length``."""
        return self.layout(length).positions(self.rank, device)

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's rows of ``x`` (the whole sequence along ``dim``)."""
        return local_shard(x, dim, self.layout(x.shape[dim]), self.rank)

    def gather(self, x_local: Tensor, dim: int) -> Tensor:
        """The whole sequence along ``dim`` from every rank's rows (a collective; not differentiable)."""
        return gather_sequence(x_local, dim, SequenceLayout.of_local(x_local.shape[dim], self.world,
                                                                     self.load_balance), self.group)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, **terms) -> Tensor:
        """``context_parallel_attention`` over this layout (terms as ``attnopt.attention``'s)."""
        terms.setdefault("kernel", self.kernel)
        return context_parallel_attention(q, k, v, self.mesh, load_balance=self.load_balance, strategy=self.strategy,
                                          **terms)

    def __enter__(self) -> ContextParallel:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    # ------------------------------------------------------------------ the op's entry points
    def _plan(self, q, k, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
              window_right, softcap, dropout_p, fill, kernel):
        unsupported = [name for name, given in (("bias", bias is not None), ("attn_mask", mask is not None),
                                                ("dropout", dropout_p > 0.0)) if given]
        if unsupported:
            raise NotImplementedError(
                f"context-parallel attention with {', '.join(unsupported)} is not supported yet: a dense term "
                "has no known sequence layout. Express the mask as causal, window, key padding or document "
                "terms, or run this attention outside the ContextParallel scope"
            )
        window = None if window_left is None and window_right is None else Window(window_left, window_right)
        return make_plan(
            q, k, self.mesh, causal=causal, align=Align(align), window=window, key_padding=key_padding,
            q_doc=q_doc, kv_doc=kv_doc, scale=scale, softcap=softcap, fill=Fill(fill),
            kernel=self.kernel if kernel == "auto" else kernel, load_balance=self.load_balance,
            strategy=self.strategy,
        )

    def op_forward(self, q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                   window_right, softcap, dropout_p, fill, kernel):
        """What ``torch.ops.attnopt.attention`` computes in this scope: ``(out, lse, seed)`` of this rank's rows."""
        plan = self._plan(q, k, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                          window_right, softcap, dropout_p, fill, kernel)
        with _blocks():
            out, lse, _, _ = _forward(plan, q, k, v)
        return out, lse, torch.zeros(1, dtype=torch.int64, device=q.device)

    def op_backward(self, grad_out, q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, scale, causal,
                    align, window_left, window_right, softcap, dropout_p, fill, kernel, needs_bias_grad,
                    needs_mask_grad):
        """What ``torch.ops.attnopt.attention_backward`` computes in this scope: ``(dq, dk, dv, -, -)``."""
        plan = self._plan(q, k, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                          window_right, softcap, dropout_p, fill, kernel)
        visible = torch.where(torch.isneginf(lse)[..., None], torch.zeros((), dtype=out.dtype), out)
        with _blocks():
            mean_v = _global_mean_v(plan, v) if plan.fill in (Fill.FINITE, Fill.FINITE_ADDED) else None
            dq, dk, dv = _backward(plan, grad_out, q, k, v, visible, lse, mean_v)
        return dq, dk, dv, q.new_empty((0,)), q.new_empty((0,))
