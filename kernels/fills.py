"""Rows with no visible key: what the original model computed there, forward and backward.

A kernel computes the visible part of each row and leaves a row with no
visible key as 0 with ``lse = -inf``. These helpers, shared by every kernel,
then give such rows what the model being replaced gave (``spec.fill``):

* ``Fill.NEG_INF`` — NaN (softmax of ``-inf`` everywhere); in the backward the
  NaN probabilities spread NaN over dV of every key of the head.
* ``Fill.SAFE`` — 0, and no gradient (SDPA's safe softmax).
* ``Fill.FINITE`` — the masked scores were *replaced* by a finite minimum: the
  softmax is uniform, out = mean(v); dV gets dO / Nk on every key; the scores
  get no gradient (``masked_fill``'s backward zeroes it).
* ``Fill.FINITE_ADDED`` — a finite minimum was *added* (an additive
  ``finfo.min`` mask): the same uniform output, but autograd differentiates
  the addition as the identity, so q, k and an additive bias receive the
  gradient of a softmax that is uniform over all keys:
  ``dS_j = (dO . v_j - dO . mean(v)) / Nk``.

Rows are rare (left padding), so the backward corrections are computed for
those rows only, against all keys, with PyTorch ops.
"""

from __future__ import annotations

import torch

from .spec import AttentionSpec, Fill

FINITE_FILLS = (Fill.FINITE, Fill.FINITE_ADDED)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fill_empty_rows(out: torch.Tensor, empty: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """``out [B, Hq, Nq, Dv]`` with rows where ``empty [B, Hq, Nq]`` replaced as ``spec.fill`` says."""
    if spec.fill == Fill.SAFE:
        return torch.where(empty[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    if spec.fill == Fill.NEG_INF:
        return torch.where(empty[..., None], torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    # every score is the same finite minimum: softmax is uniform over all keys. The mean is computed
    # whether or not a row needs it: O(Nk Dv) beside the attention's O(Nq Nk D), and no host sync
    mean_v = v.to(_compute_dtype(v.dtype)).mean(dim=2)  # [B, Hkv, Dv], float64 for float64 inputs
    mean_v = mean_v.repeat_interleave(spec.group_size, dim=1)[:, :, None]  # [B, Hq, 1, Dv]
    return torch.where(empty[..., None], mean_v.to(out.dtype), out)


def empty_row_grads(q, k, v, grad_out, empty, spec: AttentionSpec, needs_bias_grad: bool = False,
                    needs_mask_grad: bool = False):
    """Gradient contributions of rows with no visible key: ``(dq, dk, dv, dbias, dmask)``, each or None.

    In float32 (float64 for float64 inputs).

    Add them to a kernel's gradients, which count such rows as contributing nothing.
    """
    if spec.fill == Fill.SAFE or not bool(empty.any()):
        return None, None, None, None, None
    b, hkv, g = spec.batch, spec.kv_heads, spec.group_size
    if spec.fill == Fill.NEG_INF:
        nan_heads = empty.reshape(b, hkv, g, -1).any(-1).any(-1)[:, :, None, None]  # [B, Hkv, 1, 1]
        dv = torch.where(nan_heads, float("nan"), torch.zeros(v.shape, dtype=_compute_dtype(v.dtype), device=v.device))
        return None, None, dv, None, None
    rows_do = torch.where(empty[..., None], grad_out.to(_compute_dtype(grad_out.dtype)), 0.0)  # [B, Hq, Nq, Dv]
    uniform = rows_do.sum(2).reshape(b, hkv, g, -1).sum(2)[:, :, None, :] / spec.kv_len  # [B, Hkv, 1, Dv]
    dv = uniform.expand(b, hkv, spec.kv_len, spec.v_head_dim)
    if spec.fill == Fill.FINITE:
        return None, None, dv, None, None
    dq, dk, dbias, dmask = _uniform_softmax_grads(q, k, v, grad_out, empty, spec, needs_bias_grad, needs_mask_grad)
    return dq, dk, dv, dbias, dmask


def _uniform_softmax_grads(q, k, v, grad_out, empty, spec: AttentionSpec, needs_bias_grad, needs_mask_grad):
    """dq, dk, dbias, dmask of rows whose softmax was uniform over all keys (an added finite fill)."""
    cdtype = _compute_dtype(q.dtype)
    bi, hi, ii = torch.nonzero(empty, as_tuple=True)  # the empty rows
    kv_head = hi // spec.group_size
    k_rows = k[bi, kv_head].to(cdtype)  # [R, Nk, D]
    v_rows = v[bi, kv_head].to(cdtype)  # [R, Nk, Dv]
    q_rows = q[bi, hi, ii].to(cdtype)  # [R, D]
    do = grad_out[bi, hi, ii].to(cdtype)  # [R, Dv]
    dp = (v_rows @ do[:, :, None]).squeeze(-1)  # [R, Nk]
    ds = (dp - dp.mean(-1, keepdim=True)) / spec.kv_len  # dS of the scores after softcap and bias
    term_grads = []
    for term, needed in ((spec.bias, needs_bias_grad), (spec.mask, needs_mask_grad)):
        grad = None
        if needed:  # an additive term receives the scores' gradient
            grad = torch.zeros(term.shape, dtype=cdtype, device=ds.device)
            _scatter_rows(grad, ds, bi, hi, ii)
        term_grads.append(grad)
    if spec.softcap is not None:
        raw = (k_rows @ q_rows[:, :, None]).squeeze(-1) * spec.scale  # [R, Nk]
        ds = ds * (1.0 - torch.tanh(raw / spec.softcap) ** 2)
    dq = torch.zeros(q.shape, dtype=cdtype, device=q.device)
    dq[bi, hi, ii] = (ds[:, None, :] @ k_rows).squeeze(1) * spec.scale
    dk = torch.zeros(k.shape, dtype=cdtype, device=k.device)
    dk.index_put_((bi, kv_head), ds[:, :, None] * q_rows[:, None, :] * spec.scale, accumulate=True)
    return dq, dk, *term_grads


def _scatter_rows(total: torch.Tensor, ds: torch.Tensor, bi, hi, ii) -> None:
    """Add rows ``ds [R, Nk]`` at (b, h, i) into a term broadcastable to [B, H, Nq, Nk], summing broadcast dims."""
    view = total.reshape((1,) * (4 - total.dim()) + tuple(total.shape))
    index = tuple(idx if view.shape[d] > 1 else torch.zeros_like(idx) for d, idx in enumerate((bi, hi, ii)))
    rows = ds if view.shape[3] > 1 else ds.sum(-1, keepdim=True)
    view.index_put_(index, rows, accumulate=True)
