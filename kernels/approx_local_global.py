"""``approx_local_global``: Longformer-style attention, an imposed local window plus global tokens.

The approximation replaces the spec's attention with attention restricted to

    keep'(i, j) = keep(i, j) and (|j - i - offset| <= window  or  j < n_global  or  i < n_global)

(``keep`` is the spec's own mask: causal, padding, documents... are all kept).
The first ``n_global`` tokens see everything and are seen by everyone, as
Longformer's global attention on [CLS]-like tokens. Queries are processed in
chunks of ``CHUNK`` rows; each chunk gathers only the keys it may see (its
window's span, the global keys; all keys for a chunk holding global rows) and
runs the exact reference kernel on that gathered, masked sub-problem. Memory
is therefore O(N * (window + n_global)), not the exact kernels' score tiles.

The backward is the reference kernel's backward on every chunk's sub-problem,
its key/value gradients scattered back with ``index_add_``: the exact gradient
of the approximate function. ``lse`` is each row's log-sum-exp over the keys
it kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import registry
from .approx_base import nan_lse
from .registry import Grads, Kernel, register
from .spec import AttentionSpec

CHUNK = 64
#: PyTorch-op throughput assumed for the cost model (float32 matmul), CPU and GPU
CPU_FLOPS, GPU_FLOPS = 5e10, 1e14
#: Python and launch overhead per query chunk
CHUNK_SECONDS = 5e-5


@dataclass(frozen=True)
class KeySet:
    """Query rows ``q0:q1`` see keys ``idx`` (None = all keys), restricted further by ``imposed`` [q, K]."""

    q0: int
    q1: int
    idx: torch.Tensor | None
    imposed: torch.Tensor | None


class KeySetKernel(Kernel):
    """Base of the imposed-sparsity kernels: subclasses say which keys each query chunk sees."""

    exact = False

    def key_sets(self, spec: AttentionSpec, device: torch.device) -> Iterator[KeySet]:
        raise NotImplementedError

    def keys_per_chunk(self, spec: AttentionSpec) -> int:
        """Upper bound on the keys a non-global chunk gathers (for memory and cost)."""
        raise NotImplementedError

    def has_global_rows(self, spec: AttentionSpec) -> bool:
        raise NotImplementedError

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.dropout_p > 0.0:
            reasons.append(f"dropout not supported (dropout_p={spec.dropout_p})")
        if spec.requires_grad and (spec.bias is not None or (spec.mask is not None and spec.mask.is_floating_point())):
            reasons.append("gradient of an additive bias or float mask not supported")
        if spec.q_len != spec.kv_len:
            reasons.append(f"self-attention only (Nq={spec.q_len} != Nk={spec.kv_len}): the window needs one sequence")
        return reasons

    def memory_bytes(self, spec: AttentionSpec) -> int:
        keys = spec.kv_len if self.has_global_rows(spec) else min(spec.kv_len, self.keys_per_chunk(spec))
        rows = min(CHUNK, spec.q_len)
        sub = spec.with_(q_len=rows, kv_len=keys, key_padding=None, q_doc=None, kv_doc=None, bias=None, mask=None)
        heads = spec.batch * spec.q_heads
        tile_terms = heads * rows * spec.kv_len * (1 + (4 if spec.bias is not None else 0))
        gathered = spec.batch * spec.kv_heads * keys * (spec.head_dim + spec.v_head_dim) * spec.dtype.itemsize
        return registry.get("reference").memory_bytes(sub) + tile_terms + 2 * gathered

    def cost(self, spec: AttentionSpec) -> float:
        chunks = -(-spec.q_len // CHUNK)
        keys = min(spec.kv_len, self.keys_per_chunk(spec))
        flops = 2.0 * spec.batch * spec.q_heads * spec.q_len * keys * (spec.head_dim + spec.v_head_dim)
        rate = GPU_FLOPS if spec.device.type == "cuda" else CPU_FLOPS
        return flops / rate + chunks * CHUNK_SECONDS

    def _sub(self, q, k, v, spec: AttentionSpec, ks: KeySet):
        """The chunk's gathered inputs and the exact spec of its sub-problem."""
        keep = spec.keep_tile(ks.q0, ks.q1, 0, spec.kv_len)  # [b, h, q, Nk] broadcastable
        additive = spec.additive_tiles(ks.q0, ks.q1, 0, spec.kv_len)
        k_sel, v_sel = k, v
        if ks.idx is not None:
            keep = None if keep is None else keep.index_select(-1, ks.idx)
            additive = [t if t.shape[-1] == 1 else t.index_select(-1, ks.idx) for t in additive]
            k_sel, v_sel = k.index_select(2, ks.idx), v.index_select(2, ks.idx)
        if ks.imposed is not None:
            keep = ks.imposed[None, None] if keep is None else keep & ks.imposed[None, None]
        bias = None
        for term in additive:
            bias = term if bias is None else bias + term
        q_c = q[:, :, ks.q0:ks.q1]
        if keep is None:
            keep, bias = bias, None
        sub = AttentionSpec.from_tensors(
            q_c, k_sel, v_sel, scale=spec.scale, softcap=spec.softcap, mask=keep, bias=bias, fill=spec.fill,
            requires_grad=False,
        )
        return q_c, k_sel, v_sel, sub

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        reference = registry.get("reference")
        out = q.new_empty((spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim))
        lse = nan_lse(q, spec)
        for ks in self.key_sets(spec, q.device):
            q_c, k_sel, v_sel, sub = self._sub(q, k, v, spec, ks)
            out[:, :, ks.q0:ks.q1], lse[:, :, ks.q0:ks.q1] = reference.forward(q_c, k_sel, v_sel, sub, seed)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        reference = registry.get("reference")
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype)
        dv = torch.zeros_like(v, dtype=dk.dtype)
        for ks in self.key_sets(spec, q.device):
            q_c, k_sel, v_sel, sub = self._sub(q, k, v, spec, ks)
            rows = slice(ks.q0, ks.q1)
            dq_c, dk_c, dv_c, _, _ = reference.backward(
                grad_out[:, :, rows], q_c, k_sel, v_sel, out[:, :, rows], lse[:, :, rows], sub, seed, False, False
            )
            dq[:, :, rows] = dq_c
            if ks.idx is None:
                dk += dk_c
                dv += dv_c
            else:
                dk.index_add_(2, ks.idx, dk_c.to(dk.dtype))
                dv.index_add_(2, ks.idx, dv_c.to(dv.dtype))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


class LocalGlobalKernel(KeySetKernel):
    name = "approx_local_global"
    summary = "approximate (Longformer): local window of +-window keys plus n_global global tokens"

    def __init__(self, window: int = 128, n_global: int = 16):
        self.window, self.n_global = window, n_global

    def keys_per_chunk(self, spec: AttentionSpec) -> int:
        return CHUNK + 2 * self.window + self.n_global

    def has_global_rows(self, spec: AttentionSpec) -> bool:
        return self.n_global > 0

    def key_sets(self, spec: AttentionSpec, device: torch.device) -> Iterator[KeySet]:
        off, n_k, g, w = spec.diagonal_offset, spec.kv_len, self.n_global, self.window
        for q0 in range(0, spec.q_len, CHUNK):
            q1 = min(q0 + CHUNK, spec.q_len)
            if q0 < g:  # a chunk with global rows sees every key; its other rows keep the window
                idx = None
                cols = torch.arange(n_k, device=device)
            else:
                lo, hi = max(0, q0 + off - w), min(n_k, q1 - 1 + off + w + 1)
                cols = torch.cat([torch.arange(min(g, lo), device=device), torch.arange(lo, hi, device=device)])
                idx = cols
            rows = torch.arange(q0, q1, device=device)[:, None]
            near = (cols[None, :] - rows - off).abs() <= w
            imposed = near | (cols[None, :] < g) | (rows < g)
            yield KeySet(q0, q1, idx, imposed)


register(LocalGlobalKernel())
