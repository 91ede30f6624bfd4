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

from .registry import Grads
from .spec import AttentionSpec


def recompute_grads(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], torch.Tensor],
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    needs_bias_grad: bool,
    needs_mask_grad: bool,
) -> Grads:
    """``(dq, dk, dv, dbias, dmask)`` of ``forward(q, k, v, spec)`` by autograd on a recomputation."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    terms = {}
    if needs_bias_grad:
        terms["bias"] = spec.bias.detach().requires_grad_(True)
    if needs_mask_grad:
        terms["mask"] = spec.mask.detach().requires_grad_(True)
    with torch.enable_grad():
        out = forward(*leaves, spec.with_(**terms) if terms else spec)
        inputs = leaves + list(terms.values())
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)
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
