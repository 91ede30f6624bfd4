"""The exact reference kernel: any AttentionSpec with PyTorch ops, in O(N) memory.

Algorithm (the online softmax of FlashAttention, written with tensor ops):
queries are processed in chunks of ``q_chunk`` rows; for each chunk the keys are
visited in blocks of ``k_block``, keeping a running row maximum ``m``, a running
denominator ``l`` and an unnormalized accumulator ``acc``:

    s      = scores of the tile (scale, softcap, additive terms, boolean terms -> -inf)
    m_new  = max(m, rowmax(s))
    l      = l * exp(m - m_new) + rowsum(exp(s - m_new))
    acc    = acc * exp(m - m_new) + exp(s - m_new) @ v_block
    out    = acc / l,   lse = m + log(l)

Key blocks that the mask terms prove empty for the whole chunk are skipped, so
a causal or windowed call does proportionally less work. Arithmetic is float32
for half inputs (float64 for float64 inputs). Rows with no visible key follow
the spec's ``fill``. The backward recomputes one query chunk at a time under
autograd, so it too stays O(N) in memory.
"""

from __future__ import annotations

import torch

from .registry import Grads, Kernel, register
from .spec import AttentionSpec, Fill, key_padding_keep

#: elements in one score tile ``[B, Hq, q_chunk, k_block]``: 4M floats = 16 MiB
TILE_ELEMENTS = 1 << 22
K_BLOCK = 1024
#: a CPU core pair sustains a few tens of GFLOP/s in float32 matmul
CPU_FLOPS = 5e10


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """``(q_chunk, k_block)``, a pure function of the spec so forward and backward agree."""
    k_block = max(1, min(spec.kv_len, K_BLOCK))
    rows = TILE_ELEMENTS // max(1, spec.batch * spec.q_heads * k_block)
    q_chunk = max(1, min(spec.q_len, max(16, rows)))
    return q_chunk, k_block


def add_term(scores: torch.Tensor, term: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scores + term`` at the precision eager would add them (see AttentionSpec)."""
    if dtype in (torch.float16, torch.bfloat16) and term.dtype == dtype:
        return (scores.to(dtype) + term).to(scores.dtype)
    return scores + term.to(scores.dtype)


def _grouped(term: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """View a ``[b, h, q, k]`` tile (h in {1, Hq}) as ``[b, Hkv or 1, G or 1, q, k]``."""
    b, h, nq, nk = term.shape
    if h == 1:
        return term[:, :, None]
    return term.reshape(b, kv_heads, h // kv_heads, nq, nk)


class _Skipper:
    """Proves key blocks empty for a query chunk from the mask terms' structure."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.lo, self.hi = spec.band()
        self.kv_end = spec.kv_len
        if spec.key_padding is not None:
            keep = key_padding_keep(spec.key_padding, spec.kv_len)
            cols = torch.arange(1, spec.kv_len + 1, device=keep.device)
            self.kv_end = int((keep * cols).amax()) if keep.numel() else 0

    def empty(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        spec = self.spec
        off = spec.diagonal_offset
        if self.hi is not None and k0 - (q1 - 1 + off) > self.hi:
            return True
        if self.lo is not None and (k1 - 1) - (q0 + off) < self.lo:
            return True
        if k0 >= self.kv_end:
            return True
        if spec.q_doc is not None:
            q_ids, kv_ids = spec.q_doc[:, q0:q1], spec.kv_doc[:, k0:k1]
            disjoint = (q_ids.amax(1) < kv_ids.amin(1)) | (kv_ids.amax(1) < q_ids.amin(1))
            if bool(disjoint.all()):
                return True
        if spec.mask is not None and spec.mask.dtype == torch.bool:
            keep = spec.keep_tile(q0, q1, k0, k1)
            if not bool(keep.any()):
                return True
        return False


def _dropout_keep(shape, spec: AttentionSpec, seed: int, q0: int, k0: int, device) -> torch.Tensor:
    """The tile's dropout keep mask, regenerated identically by the backward."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + q0 * 65_537 + k0) % (1 << 63))
    return torch.rand(shape, generator=gen, device=device) >= spec.dropout_p


def _rows(
    q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, q0: int, seed: int,
    skipper: _Skipper,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows ``q0 : q0 + len`` against all keys: ``(out, lse)`` in compute dtype."""
    cdtype = _compute_dtype(q_rows.dtype)
    batch, q_heads, n_rows, head_dim = q_rows.shape
    kv_heads, group = spec.kv_heads, spec.group_size
    q1 = q0 + n_rows
    _, k_block = chunk_sizes(spec)
    q_g = q_rows.to(cdtype).reshape(batch, kv_heads, group, n_rows, head_dim)  # [B, Hkv, G, q, D]

    m = q_g.new_full((batch, kv_heads, group, n_rows), float("-inf"))
    l = q_g.new_zeros((batch, kv_heads, group, n_rows))
    acc = q_g.new_zeros((batch, kv_heads, group, n_rows, spec.v_head_dim))
    for k0 in range(0, spec.kv_len, k_block):
        k1 = min(k0 + k_block, spec.kv_len)
        if skipper.empty(q0, q1, k0, k1):
            continue
        k_t = k[:, :, k0:k1].to(cdtype)[:, :, None]  # [B, Hkv, 1, k, D]
        v_t = v[:, :, k0:k1].to(cdtype)[:, :, None]  # [B, Hkv, 1, k, Dv]
        s = (q_g @ k_t.transpose(-1, -2)) * spec.scale  # [B, Hkv, G, q, k]
        if spec.softcap is not None:
            s = torch.tanh(s / spec.softcap) * spec.softcap
        for term in spec.additive_tiles(q0, q1, k0, k1):
            s = add_term(s, _grouped(term, kv_heads), spec.dtype)
        keep = spec.keep_tile(q0, q1, k0, k1)
        if keep is not None:
            s = s.masked_fill(~_grouped(keep, kv_heads), float("-inf"))
        # the result does not depend on m, so no gradient needs to flow through it
        m_new = torch.maximum(m, s.detach().amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        if spec.dropout_p > 0.0:
            drop = _dropout_keep(p.shape, spec, seed, q0, k0, p.device)
            p = p * drop / (1.0 - spec.dropout_p)
        acc = acc * alpha[..., None] + p @ v_t
        m = m_new

    empty_row = l == 0
    out = acc / torch.where(empty_row, torch.ones_like(l), l)[..., None]
    if bool(empty_row.any()):
        out = _fill_empty_rows(out, empty_row, v, spec, cdtype)
    lse = m + torch.log(l)
    return (
        out.reshape(batch, q_heads, n_rows, spec.v_head_dim),
        lse.reshape(batch, q_heads, n_rows),
    )


def _fill_empty_rows(out, empty_row, v, spec: AttentionSpec, cdtype) -> torch.Tensor:
    """Rows with no visible key: NaN, zero, or the uniform average, as the spec's fill says."""
    if spec.fill == Fill.NEG_INF:
        replacement = torch.full_like(out, float("nan"))
    elif spec.fill == Fill.SAFE:
        replacement = torch.zeros_like(out)
    else:
        # every score equals the same finite minimum: softmax is uniform over all keys
        replacement = v.to(cdtype).mean(dim=2)[:, :, None, None, :].expand_as(out)
    return torch.where(empty_row[..., None], replacement, out)


class ReferenceKernel(Kernel):
    name = "reference"
    exact = True
    summary = "exact chunked online-softmax attention in PyTorch ops (any device, any mask)"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        return []

    def memory_bytes(self, spec: AttentionSpec) -> int:
        q_chunk, k_block = chunk_sizes(spec)
        tile = spec.batch * spec.q_heads * q_chunk * k_block * 4
        acc = spec.batch * spec.q_heads * q_chunk * (spec.v_head_dim + spec.head_dim + 2) * 4
        # scores, probabilities, keep mask and a product live together at the peak
        return 4 * tile + 2 * acc

    def cost(self, spec: AttentionSpec) -> float:
        flops = 2.0 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len * (spec.head_dim + spec.v_head_dim)
        return flops * _visible_fraction(spec) / CPU_FLOPS

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        q_chunk, _ = chunk_sizes(spec)
        skipper = _Skipper(spec)
        out = q.new_empty((spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim))
        lse = q.new_empty((spec.batch, spec.q_heads, spec.q_len), dtype=torch.float32)
        with torch.no_grad():
            for q0 in range(0, spec.q_len, q_chunk):
                q1 = min(q0 + q_chunk, spec.q_len)
                out_c, lse_c = _rows(q[:, :, q0:q1], k, v, spec, q0, seed, skipper)
                out[:, :, q0:q1] = out_c
                lse[:, :, q0:q1] = lse_c
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        cdtype = _compute_dtype(q.dtype)
        q_chunk, _ = chunk_sizes(spec)
        k_leaf = k.detach().requires_grad_()
        v_leaf = v.detach().requires_grad_()
        bias = spec.bias.detach().requires_grad_() if needs_bias_grad else spec.bias
        mask = spec.mask.detach().requires_grad_() if needs_mask_grad else spec.mask
        spec = spec.with_(bias=bias, mask=mask)
        skipper = _Skipper(spec)
        leaves = [k_leaf, v_leaf] + [t for t, need in ((bias, needs_bias_grad), (mask, needs_mask_grad)) if need]
        totals: list[torch.Tensor | None] = [None] * len(leaves)
        dq = torch.empty_like(q)
        for q0 in range(0, spec.q_len, q_chunk):
            q1 = min(q0 + q_chunk, spec.q_len)
            with torch.enable_grad():
                q_rows = q[:, :, q0:q1].detach().requires_grad_()
                out_c, _ = _rows(q_rows, k_leaf, v_leaf, spec, q0, seed, skipper)
                grads = torch.autograd.grad(
                    out_c, [q_rows] + leaves, grad_out[:, :, q0:q1].to(cdtype), allow_unused=True
                )
            dq[:, :, q0:q1] = _zeros_if_none(grads[0], q_rows)
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    totals[i] = g.to(cdtype) if totals[i] is None else totals[i] + g
        totals = [_zeros_if_none(t, leaf) for t, leaf in zip(totals, leaves)]
        dk, dv = totals[0].to(k.dtype), totals[1].to(v.dtype)
        rest = iter(totals[2:])
        dbias = next(rest).to(bias.dtype) if needs_bias_grad else None
        dmask = next(rest).to(mask.dtype) if needs_mask_grad else None
        return dq, dk, dv, dbias, dmask


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _visible_fraction(spec: AttentionSpec) -> float:
    """Fraction of the score matrix the band terms leave visible (1.0 without a band)."""
    lo, hi = spec.band()
    if lo is None and hi is None:
        return 1.0
    n_q, n_k, off = spec.q_len, spec.kv_len, spec.diagonal_offset
    lo = -n_k - n_q if lo is None else lo
    hi = n_k + n_q if hi is None else hi
    # keys j with max(0, i+off+lo) <= j <= min(n_k-1, i+off+hi), summed over rows
    rows = torch.arange(n_q, dtype=torch.float64)
    first = torch.clamp(rows + off + lo, min=0)
    last = torch.clamp(rows + off + hi, max=n_k - 1)
    visible = torch.clamp(last - first + 1, min=0).sum().item()
    return max(visible / (n_q * n_k), 1e-6)


register(ReferenceKernel())
