"""The float64 oracle: the spec's function computed the obvious way, whole matrix at once.

Used by tests (and by anyone checking a kernel); never by the planner. Dropout is
not modelled: compare with ``dropout_p=0`` or through a fixed dropout mask.
"""

from __future__ import annotations

import torch

from .reference import add_term
from .spec import NAN_FILLS, AttentionSpec, Fill, band_keep, key_padding_keep


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """``[B, Hq, Nq, Dv]`` in float64, from the spec's materialized masks."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(spec.group_size, dim=1)  # [B, Hq, Nk, D]
    v = v.repeat_interleave(spec.group_size, dim=1)
    s = (q @ k.transpose(-1, -2)) * spec.scale  # [B, Hq, Nq, Nk]
    if spec.softcap is not None:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    keep, additive = spec.materialize()
    for term in additive:
        s = add_term(s, term, spec.dtype)
    unmasked = s
    if keep is not None and spec.fill == Fill.NEG_INF_ADDED:  # added, as the original did: its gradient passes
        s = s + torch.zeros((), dtype=s.dtype, device=s.device).masked_fill(~keep, float("-inf"))
    elif keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    empty_row = torch.isneginf(s).all(dim=-1, keepdim=True)
    if spec.fill == Fill.FINITE_ADDED:
        # the added minimum absorbed the scores: value 0 (uniform), gradient passed through as by autograd
        s = torch.where(empty_row, unmasked - unmasked.detach(), s)
    elif spec.fill == Fill.FINITE_REPLACED_ADDED:
        # an empty row's keys: kept by the band, so masked by the added padding only (the minimum absorbed the
        # score, whose gradient passes); kept by the padding, so replaced by the band (a constant); or both
        rel = torch.arange(spec.kv_len)[None, :] - torch.arange(spec.q_len)[:, None] - spec.diagonal_offset
        band = band_keep(rel.to(s.device), *spec.band())  # [Nq, Nk]
        kept = (torch.ones((), dtype=torch.bool, device=s.device) if spec.key_padding is None
                else key_padding_keep(spec.key_padding, spec.kv_len).to(s.device)[:, None, None, :])
        once = torch.where(band, unmasked - unmasked.detach(),
                           torch.where(kept, torch.zeros((), dtype=s.dtype, device=s.device), float("-inf")))
        s = torch.where(empty_row, once, s)
    elif spec.fill not in NAN_FILLS:
        # a constant row keeps softmax finite, so gradients through torch.where stay finite
        s = s.masked_fill(empty_row, 0.0)
    p = torch.softmax(s, dim=-1)
    out = p @ v
    if spec.kv_len == 0:  # no key at all: the original's sum over no key is 0, whatever it fills masked scores with
        return out
    if spec.fill == Fill.SAFE:
        out = torch.where(empty_row, torch.zeros_like(out), out)
    elif spec.fill == Fill.FINITE:
        out = torch.where(empty_row, v.mean(dim=2, keepdim=True).expand_as(out), out)
    # Fill.FINITE_ADDED: p is already uniform on those rows, and its gradient flows as in the original
    return out
