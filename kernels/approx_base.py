"""What the approximate kernels and the SDPA kernels share: a backward by recomputation.

Kernels whose forward is a composition of differentiable torch ops (Performer's
random features, PyTorch's SDPA) get their backward by running that forward
again under ``torch.enable_grad`` on detached leaves and asking
``torch.autograd.grad`` for the input gradients. The custom op's backward runs
below autograd, so the recompute builds its own small graph and frees it on
return: memory is the forward's saved tensors, for the duration of the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import registry
from .registry import Grads, Kernel
from .spec import AttentionSpec, band_keep, key_padding_keep


def recompute_grads(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], torch.Tensor],
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    needs_bias_grad: bool,
    needs_mask_grad: bool,
    grad_like_out: bool = False,
) -> Grads:
    """``(dq, dk, dv, dbias, dmask)`` of ``forward(q, k, v, spec)`` by autograd on a recomputation.

    ``grad_like_out``: hand autograd the output's gradient in the recomputed output's strides (a copy when
    they differ), for backends whose backward assumes it."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    terms = {}
    if needs_bias_grad:
        terms["bias"] = spec.bias.detach().requires_grad_(True)
    if needs_mask_grad:
        terms["mask"] = spec.mask.detach().requires_grad_(True)
    with torch.enable_grad():
        out = forward(*leaves, spec.with_(**terms) if terms else spec)
        inputs = leaves + list(terms.values())
        grad_out = grad_out.to(out.dtype)
        if grad_like_out and grad_out.stride() != out.stride():
            grad_out = torch.empty_like(out).copy_(grad_out)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    dq, dk, dv = grads[:3]
    rest = iter(grads[3:])
    dbias = next(rest) if needs_bias_grad else None
    dmask = next(rest) if needs_mask_grad else None
    return dq, dk, dv, dbias, dmask


def nan_lse(q: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """A log-sum-exp placeholder for kernels that do not compute one (their backward does not read it)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.full((spec.batch, spec.q_heads, spec.q_len), float("nan"), dtype=dtype, device=q.device)


def tensor_reasons(spec: AttentionSpec, *, allowed: tuple[str, ...]) -> list[str]:
    """One reason per mask term of ``spec`` that is not in ``allowed``."""
    return [f"mask term {term!r} not supported" for term in spec.mask_terms if term not in allowed]


# ------------------------------------------------------------------ settings
class Approximate(Kernel):
    """An approximate kernel family: its settings (window, features...) are hyperparameters.

    The registered instance runs the family's default settings under its own
    name. ``configured(**settings)`` is the same family with other settings,
    registered under a name that states them (``approx_local_global[window=256,n_global=16]``)
    so that a rewritten graph's op call names the whole decision. ``search_space``
    is the grid a calibration tries for one call, in order of increasing cost.
    """

    exact = False
    family: str = ""

    def settings(self) -> dict[str, int]:
        raise NotImplementedError

    def search_space(self, spec: AttentionSpec) -> list[dict[str, int]]:
        return [self.settings()]

    def with_settings(self, **settings) -> Approximate:
        return type(self)(**{**self.settings(), **settings})

    @property
    def variant(self) -> bool:
        """Whether this instance was configured by a calibration (not the family's default)."""
        return self.name != self.family

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())


def variant_name(family: str, settings: dict[str, int]) -> str:
    return f"{family}[{','.join(f'{k}={v}' for k, v in settings.items())}]"


def configured(kernel: Approximate, **settings) -> Approximate:
    """``kernel``'s family with ``settings``, registered (once) under a name that states them."""
    default = registry.get(kernel.family)
    wanted = {**default.settings(), **kernel.settings(), **settings}
    if wanted == default.settings():
        return default
    name = variant_name(kernel.family, wanted)
    try:
        return registry.get(name)
    except ValueError:
        made = default.with_settings(**wanted)
        made.name = name
        return registry.register(made)


# ------------------------------------------------------------------ mask terms on gathered keys
def terms_at(spec: AttentionSpec, rows: torch.Tensor, cols: torch.Tensor):
    """The spec's mask terms on gathered positions: query ``rows [nb, c]`` against key ``cols [nb, K]``.

    Returns ``(keep, additive)``: a bool tensor broadcastable to ``[B, Hq, nb, c, K]``
    (None when nothing masks) and the additive terms, each broadcastable likewise.
    Positions must be in range (callers clamp and mask the padding themselves).
    """
    keep = None

    def conj(term):
        nonlocal keep
        keep = term if keep is None else keep & term

    lo, hi = spec.band()
    if lo is not None or hi is not None:
        rel = cols[:, None, :] - rows[:, :, None] - spec.diagonal_offset  # [nb, c, K]
        conj(band_keep(rel, lo, hi)[None, None])
    if spec.key_padding is not None:
        kept = key_padding_keep(spec.key_padding, spec.kv_len)  # [B, Nk]
        conj(kept[:, cols][:, None, :, None, :])  # [B, 1, nb, 1, K]
    if spec.q_doc is not None:
        same = spec.q_doc[:, rows][:, :, :, None] == spec.kv_doc[:, cols][:, :, None, :]  # [B|1, nb, c, K]
        conj(same[:, None])
    additive = []
    for term in (spec.bias, spec.mask):
        if term is None:
            continue
        gathered = _gather(term, rows, cols)
        if term.dtype == torch.bool:
            conj(gathered)
        else:
            additive.append(gathered)
    return keep, additive


def _gather(term: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A term broadcastable to ``[B, H, Nq, Nk]`` at (rows, cols): ``[B|1, H|1, nb, c, K]``."""
    while term.dim() < 4:
        term = term[None]
    r = rows if term.shape[2] > 1 else torch.zeros_like(rows)
    c = cols if term.shape[3] > 1 else torch.zeros_like(cols)
    return term[:, :, r[:, :, None], c[:, None, :]]
