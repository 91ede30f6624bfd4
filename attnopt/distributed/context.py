"""Context parallelism: exact attention of a sequence sharded across the ranks of a process group.

Each rank holds the queries, keys and values of its positions (``layout.py``). The
attention of its queries over all keys is the merge of their attention over each
rank's key block: with ``(o_a, lse_a)``, ``(o_b, lse_b)`` the outputs and
log-sum-exps over two disjoint key sets,

    lse = logaddexp(lse_a, lse_b)
    o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)

is the attention over their union. Blocks are computed with ``fill="safe"`` (a
row without a visible key gives 0 and ``lse = -inf``), which merges as nothing;
a row empty over *all* keys then gets the original's fill (``kernels/fills.py``),
from the global mean of v where the fill is finite.

The backward of a block is the flash backward with the *merged* ``out`` and
``lse``: ``P = exp(s - lse)`` are then the global probabilities of the block's
keys, and ``D = rowsum(dO * O)`` the global row term, so the blocks' ``dQ`` sum
to the exact gradient and each block's ``dK``, ``dV`` go back to its owner.

Exchange: at step ``s`` rank ``r`` computes on the block of rank ``r - s``
(mod P), received directly from its owner while step ``s - 1`` computes (a ring
of shifts: every rank sends one block and receives one per step). Blocks whose
keys no query of the receiving rank can see (above a causal diagonal, outside a
window, other documents, all padded) are neither sent nor computed; both sides
know which from the same global mask summaries. ``strategy="all_gather"``
gathers every block at once instead (grouped-query K/V are small) and returns
the key gradients with one reduce-scatter.

Every rank must call with the same kinds of terms (key padding or not,
documents or not, the same causal, window, fill), since they decide the
collectives each rank runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnopt.functional import _check_tensors, _documents, _window  # imports attnopt.ops: the ops are registered
from attnopt.kernels import registry
from attnopt.kernels.fills import fill_empty_rows, row_blocks, uniform_score_grads
from attnopt.kernels.reference import LSE_EXACT_LIMIT
from attnopt.kernels.spec import NAN_FILLS, Align, AttentionSpec, Fill, Window, band_bounds, key_padding_keep

from .layout import SequenceLayout, Segment, all_gather_stacked, gather_sequence, reduce_scatter_stacked

STRATEGIES = ("auto", "ring", "all_gather")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Tile:
    """The op arguments of one (query segment, key segment) pair, in the pair's local coordinates."""

    key_padding: Tensor | None
    q_doc: Tensor | None
    kv_doc: Tensor | None
    mask: Tensor | None
    causal: bool
    align: str
    window_left: int | None
    window_right: int | None


def block_band(lo: int | None, hi: int | None, d: int, nq: int, nk: int, device=None):
    """How a band of ``j - i - d`` in ``[lo, hi]`` reads on an ``nq x nk`` block (local i, j).

    ``None`` when the block is outside the band; else ``(causal, align, left, right, mask)``:
    the band as the op's causal/window terms when one of its two alignments expresses it,
    otherwise a dense bool ``mask`` ``[1, 1, nq, nk]``; no terms at all when the whole block is inside.
    """
    low = None if lo is None else d + lo
    high = None if hi is None else d + hi
    if (high is not None and high < -(nq - 1)) or (low is not None and low > nk - 1):
        return None
    if (low is None or low <= -(nq - 1)) and (high is None or high >= nk - 1):
        return False, Align.TOP_LEFT.value, None, None, None
    for align, shift in ((Align.TOP_LEFT, 0), (Align.BOTTOM_RIGHT, nk - nq)):
        left = None if low is None else shift - low
        right = None if high is None else high - shift
        if (left is None or left >= 0) and (right is None or right >= 0):
            causal = right == 0
            return causal, align.value, left, None if causal else right, None
    rel = torch.arange(nk, device=device)[None, :] - torch.arange(nq, device=device)[:, None]  # [nq, nk]
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if low is not None:
        keep &= rel >= low
    if high is not None:
        keep &= rel <= high
    return False, Align.TOP_LEFT.value, None, None, keep[None, None]


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything a rank needs to know about one context-parallel call; identical on every rank
    except ``rank``."""

    group: dist.ProcessGroup
    rank: int
    world: int
    q_layout: SequenceLayout
    kv_layout: SequenceLayout
    scale: float
    band: tuple[int | None, int | None]
    offset: int  # global key index on query 0's diagonal
    softcap: float | None
    fill: Fill
    kernel: str
    strategy: str
    key_padding: Tensor | None  # bool [B, Nk], global positions
    q_doc: Tensor | None  # [B or 1, Nq], global
    kv_doc: Tensor | None  # [B or 1, Nk], global
    device: torch.device

    def _visible_data(self, qs: Segment, ks: Segment) -> bool:
        """Whether the key padding and documents leave some key of ``ks`` visible to some query of ``qs``."""
        keep = None if self.key_padding is None else self.key_padding[:, ks[0]:ks[1]]  # [B, nk]
        if self.q_doc is not None:
            q_ids, kv_ids = self.q_doc[:, qs[0]:qs[1]], self.kv_doc[:, ks[0]:ks[1]]
            # ids inside the queries' range: a superset of the shared documents, exact for sorted ids
            inside = (kv_ids >= q_ids.amin(1, keepdim=True)) & (kv_ids <= q_ids.amax(1, keepdim=True))
            keep = inside if keep is None else keep & inside
        return keep is None or bool(keep.any())

    def tile(self, qs: Segment, ks: Segment) -> _Tile | None:
        """The pair's op arguments, or None when no query of ``qs`` sees a key of ``ks``."""
        lo, hi = self.band
        band = block_band(lo, hi, qs[0] + self.offset - ks[0], qs[1] - qs[0], ks[1] - ks[0], self.device)
        if band is None or not self._visible_data(qs, ks):
            return None
        causal, align, left, right, mask = band
        key_padding = None if self.key_padding is None else self.key_padding[:, ks[0]:ks[1]]
        q_doc = None if self.q_doc is None else self.q_doc[:, qs[0]:qs[1]]
        kv_doc = None if self.kv_doc is None else self.kv_doc[:, ks[0]:ks[1]]
        return _Tile(key_padding, q_doc, kv_doc, mask, causal, align, left, right)

    def pairs(self, rank: int, src: int):
        """``(query rows, key rows, tile)`` of each visible pair of ``rank``'s queries and ``src``'s keys,
        rows as local slices."""
        q_segments, kv_segments = self.q_layout.segments(rank), self.kv_layout.segments(src)
        qc, kc = self.q_layout.chunk, self.kv_layout.chunk
        for a, qs in enumerate(q_segments):
            for b, ks in enumerate(kv_segments):
                tile = self.tile(qs, ks)
                if tile is not None:
                    yield slice(a * qc, (a + 1) * qc), slice(b * kc, (b + 1) * kc), tile

    @functools.cached_property
    def needs(self) -> Tensor:
        """Bool ``[P, P]``: ``needs[r, s]`` when rank r's queries see some key of rank s."""
        return torch.tensor([
            [any(True for _ in self.pairs(r, s)) for s in range(self.world)] for r in range(self.world)
        ])

    def call(self, tile: _Tile, q: Tensor, k: Tensor, v: Tensor):
        """``(out, lse)`` of one tile, rows without a visible key giving 0 and -inf."""
        out, lse, _ = torch.ops.attnopt.attention.default(
            q, k, v, tile.key_padding, tile.q_doc, tile.kv_doc, None, tile.mask, self.scale, tile.causal,
            tile.align, tile.window_left, tile.window_right, self.softcap, 0.0, Fill.SAFE.value, self.kernel,
        )
        return out, lse

    def call_backward(self, tile: _Tile, grad_out, q, k, v, out, lse):
        dq, dk, dv, _, _ = torch.ops.attnopt.attention_backward.default(
            grad_out, q, k, v, out, lse, torch.zeros(1, dtype=torch.int64, device=q.device), tile.key_padding,
            tile.q_doc, tile.kv_doc, None, tile.mask, self.scale, tile.causal, tile.align, tile.window_left,
            tile.window_right, self.softcap, 0.0, Fill.SAFE.value, self.kernel, False, False,
        )
        return dq, dk, dv

    def peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)


# ----------------------------------------------------------------------------- exchanges
class _Pending:
    """Point-to-point transfers in flight and the buffer they fill (None when nothing comes)."""

    def __init__(self, ops: list, buffer: Tensor | None):
        self.works = dist.batch_isend_irecv(ops) if ops else []
        self.buffer = buffer

    def wait(self) -> Tensor | None:
        for work in self.works:
            work.wait()
        return self.buffer


def _shift(plan: _Plan, send: Tensor | None, to: int, recv_like: Tensor, frm: int, tag: int) -> _Pending:
    """Send ``send`` to rank ``to`` (when not None) and receive a tensor like ``recv_like`` from ``frm``
    (when ``frm`` is not None)."""
    ops, buffer = [], None
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, plan.peer(to), plan.group, tag))
    if frm is not None:
        buffer = torch.empty_like(recv_like)
        ops.append(dist.P2POp(dist.irecv, buffer, plan.peer(frm), plan.group, tag))
    return _Pending(ops, buffer)


def _visit_ring(plan: _Plan, kv_own: Tensor, needs: Tensor, compute, grads_like: Tensor | None):
    """Run ``compute(src, kv)`` on every block this rank needs, fetched step by step; with ``grads_like``
    each result is a gradient of the block, summed at its owner and returned."""
    world, rank = plan.world, plan.rank

    def fetch(step: int) -> _Pending | None:
        if step >= world:
            return None
        src, user = (rank - step) % world, (rank + step) % world
        send = kv_own if needs[user, rank] else None
        return _shift(plan, send, user, kv_own, src if needs[rank, src] else None, tag=2 * step)

    incoming = fetch(1)  # in flight while step 0 computes
    returned: list[_Pending] = []
    total = None if grads_like is None else torch.zeros_like(grads_like)
    for step in range(world):
        src, user = (rank - step) % world, (rank + step) % world
        kv = kv_own
        if step:
            kv, incoming = incoming.wait(), fetch(step + 1)
        grads = compute(src, kv) if needs[rank, src] else None
        if total is None:
            continue
        if step == 0:
            if grads is not None:
                total += grads
        else:  # the block's gradient goes back to its owner; ours comes back from the rank that used it
            returned.append(_shift(plan, grads, src, total, user if needs[user, rank] else None,
                                   tag=2 * step + 1))
    for pending in returned:
        grads = pending.wait()
        if grads is not None:
            total += grads
    return total


def _visit_gathered(plan: _Plan, kv_own: Tensor, needs: Tensor, compute, grads_like: Tensor | None):
    """``_visit_ring`` with every block gathered at once and the gradients reduce-scattered."""
    blocks = all_gather_stacked(kv_own, plan.world, plan.group)
    grads_all = None if grads_like is None else grads_like.new_zeros((plan.world, *grads_like.shape))
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        if needs[plan.rank, src]:
            grads = compute(src, blocks[src])
            if grads_all is not None:
                grads_all[src] += grads
    if grads_all is None:
        return None
    return reduce_scatter_stacked(grads_all, plan.group)


def _visit(plan: _Plan, kv_own: Tensor, needs: Tensor, compute, grads_like: Tensor | None = None):
    visit = _visit_gathered if plan.strategy == "all_gather" else _visit_ring
    return visit(plan, kv_own, needs, compute, grads_like)


# ----------------------------------------------------------------------------- forward and backward
def _merge_into(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge a block's ``(out, lse)`` into the running ``(out_acc, lse_acc)`` in place."""
    merged = torch.logaddexp(lse_acc, lse)
    seen = ~torch.isneginf(merged)  # rows with a visible key so far
    w_acc = torch.where(seen, torch.exp(lse_acc - merged), 0.0)
    w_new = torch.where(seen, torch.exp(lse.to(merged.dtype) - merged), 0.0)
    out_acc.mul_(w_acc[..., None]).add_(out.to(out_acc.dtype) * w_new[..., None])
    lse_acc.copy_(merged)


def _global_mean_v(plan: _Plan, v: Tensor) -> Tensor:
    """Mean of v over all ranks' keys, ``[B, Hkv, Dv]`` in the compute dtype (a collective)."""
    total = v.to(_compute_dtype(v.dtype)).sum(2)
    dist.all_reduce(total, group=plan.group)
    return total / plan.kv_layout.length


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor):
    """``(out, lse, visible_out, mean_v)``; ``visible_out`` is ``out`` before the fill (0 on empty rows)."""
    cdtype = _compute_dtype(q.dtype)
    out_acc = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=cdtype)  # [B, Hq, nq, Dv]
    lse_acc = q.new_full(q.shape[:-1], float("-inf"), dtype=cdtype)  # [B, Hq, nq]
    head_dim = k.shape[-1]

    def compute(src: int, kv: Tensor) -> None:
        k_blk, v_blk = kv.split([head_dim, kv.shape[-1] - head_dim], -1)
        for rows, keys, tile in plan.pairs(plan.rank, src):
            out, lse = plan.call(tile, q[:, :, rows], k_blk[:, :, keys], v_blk[:, :, keys])
            _merge_into(out_acc[:, :, rows], lse_acc[:, :, rows], out, lse)

    _visit(plan, torch.cat([k, v], -1), plan.needs, compute)  # one message per block
    visible = out_acc.to(q.dtype)
    mean_v = _global_mean_v(plan, v) if plan.fill in (Fill.FINITE, Fill.FINITE_ADDED) else None
    empty = torch.isneginf(lse_acc)
    out = visible
    if plan.fill != Fill.SAFE and bool(empty.any()):
        spec = AttentionSpec.from_tensors(q, k, v, scale=plan.scale, fill=plan.fill)
        # a one-key v whose mean is the global mean: fills.py's rule on all ranks' keys
        out = fill_empty_rows(visible, empty, None if mean_v is None else mean_v[:, :, None], spec)
    return out, lse_acc, visible, mean_v


def _uniform_row_grads(plan: _Plan, empty, q, k_blk, v_blk, grad_out, mean_v, dq, dk_blk) -> None:
    """Add to ``dq`` and ``dk_blk`` the gradient of rows empty over all keys under an *added* finite fill:
    autograd saw a softmax uniform over all ``Nk`` keys, ``dS_j = (dO . v_j - dO . mean(v)) / Nk`` with the mean
    over every rank's keys. Without a softcap, ``fills.uniform_score_grads``'s two products per key head; with
    one, row by row in ``fills.row_blocks`` (batch rows' empty rows in every head at once) against the block's
    keys: no tensor of rows x keys x D. A (head, row) of a block that sees a key takes nothing."""
    n = plan.kv_layout.length
    if plan.softcap is None:
        dq_rows, dk_rows = uniform_score_grads(q, k_blk, v_blk, grad_out, empty, plan.scale, n, mean_v[:, :, None])
        dq += dq_rows
        dk_blk += dk_rows
        return
    cdtype = dq.dtype
    width = max(k_blk.shape[2], k_blk.shape[3], v_blk.shape[3])
    for block in row_blocks(empty, q.shape[1] // k_blk.shape[1], width):
        b, kv = block.b, block.kv
        marks = block.empty[..., None].flatten(2, 3)  # [Bb, hk, G r, 1]
        keys, values = k_blk[b, kv].to(cdtype), v_blk[b, kv].to(cdtype)  # [Bb, hk, nk, D], [Bb, hk, nk, Dv]
        queries = torch.where(marks, block.gather(q).to(cdtype).flatten(2, 3), 0.0)  # [Bb, hk, G r, D]
        do = block.gather(grad_out).to(cdtype).flatten(2, 3)  # [Bb, hk, G r, Dv]
        ds = (do @ values.mT - do @ mean_v[b, kv, :, None].to(cdtype)) / n  # [Bb, hk, G r, nk]
        ds = ds * (1.0 - torch.tanh((queries @ keys.mT) * plan.scale / plan.softcap) ** 2)
        ds = torch.where(marks, ds, 0.0)  # nor a NaN of k or q: dk takes nothing of such rows
        dq_rows = torch.where(marks, (ds @ keys) * plan.scale, 0.0)  # [Bb, hk, G r, D]
        block.add_rows(dq, dq_rows.unflatten(2, block.empty.shape[2:]))
        block.add_keys(dk_blk, (ds.mT @ queries) * plan.scale)


def _empty_row_value_grads(plan: _Plan, grad_out: Tensor, empty: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """What rows empty over all keys give every key's dV (fills.py's rule, summed over all ranks' rows), and under
    an added -inf their own dq and every key's dk of the head."""
    batch, kv_heads = dv.shape[:2]
    if plan.fill in NAN_FILLS:  # NaN probabilities: NaN over dV of every key of the head
        heads = empty.reshape(batch, kv_heads, -1).any(-1).to(torch.int32)  # [B, Hkv]
        dist.all_reduce(heads, op=dist.ReduceOp.MAX, group=plan.group)
        dv.masked_fill_(heads.bool()[:, :, None, None], float("nan"))
        if plan.fill == Fill.NEG_INF_ADDED:  # the NaN scores' gradient passes the addition to q and k
            dk.masked_fill_(heads.bool()[:, :, None, None], float("nan"))
            dq.masked_fill_(empty[..., None], float("nan"))
    elif plan.fill in (Fill.FINITE, Fill.FINITE_ADDED):  # uniform softmax: dO / Nk on every key
        rows_do = torch.where(empty[..., None], grad_out.to(dv.dtype), 0.0).sum(2)  # [B, Hq, Dv]
        uniform = rows_do.reshape(batch, kv_heads, -1, rows_do.shape[-1]).sum(2)  # [B, Hkv, Dv]
        dist.all_reduce(uniform, group=plan.group)
        dv += uniform[:, :, None] / plan.kv_layout.length


def _backward(plan: _Plan, grad_out, q, k, v, visible, lse, mean_v):
    cdtype = _compute_dtype(q.dtype)
    grad_out = grad_out.contiguous()
    empty = torch.isneginf(lse)
    if bool((lse.abs() > LSE_EXACT_LIMIT)[~empty].any()):
        raise NotImplementedError(
            f"context-parallel backward with a row log-sum-exp beyond {LSE_EXACT_LIMIT:g} is not supported yet: "
            "a kernel recomputes such rows' normalizer from one key block, which would be that block's, not "
            "the row's. Scale the scores down (they exceed 1e3) or run the attention on one rank"
        )
    dq = torch.zeros(q.shape, dtype=cdtype, device=q.device)
    needs = plan.needs
    uniform_rows = None
    if plan.fill == Fill.FINITE_ADDED:  # a rank with empty rows differentiates them against every key
        flags = all_gather_stacked(empty.any().to(torch.int32).reshape(1), plan.world, plan.group)  # [P, 1]
        needs = needs | flags.bool().cpu()
        uniform_rows = empty if bool(empty.any()) else None
    head_dim = k.shape[-1]
    lse = lse.contiguous()

    def compute(src: int, kv: Tensor) -> Tensor:
        k_blk, v_blk = kv.split([head_dim, kv.shape[-1] - head_dim], -1)
        grads = torch.zeros(kv.shape, dtype=cdtype, device=kv.device)  # [B, Hkv, nk, D + Dv]
        for rows, keys, tile in plan.pairs(plan.rank, src):
            dq_t, dk_t, dv_t = plan.call_backward(
                tile, grad_out[:, :, rows], q[:, :, rows], k_blk[:, :, keys], v_blk[:, :, keys],
                visible[:, :, rows].contiguous(), lse[:, :, rows].contiguous(),
            )
            dq[:, :, rows] += dq_t
            grads[:, :, keys, :head_dim] += dk_t
            grads[:, :, keys, head_dim:] += dv_t
        if uniform_rows is not None:
            _uniform_row_grads(plan, uniform_rows, q, k_blk, v_blk, grad_out, mean_v, dq, grads[..., :head_dim])
        return grads

    kv_own = torch.cat([k, v], -1)
    grads = _visit(plan, kv_own, needs, compute, grads_like=kv_own.new_zeros(kv_own.shape, dtype=cdtype))
    dk, dv = grads[..., :head_dim].contiguous(), grads[..., head_dim:].contiguous()
    _empty_row_value_grads(plan, grad_out, empty, dq, dk, dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        out, lse, visible, mean_v = _forward(plan, q, k, v)
        ctx.save_for_backward(q, k, v, visible, lse)
        ctx.plan, ctx.mean_v = plan, mean_v
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, visible, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.plan, grad_out, q, k, v, visible, lse, ctx.mean_v)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------- public entry
def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    fill: Fill | str = Fill.SAFE,
    kernel: str = "auto",
    load_balance: bool = True,
    strategy: str = "auto",
    return_lse: bool = False,
):
    """``attnopt.attention`` of a sequence sharded over the ranks of ``mesh`` (a 1-D ``DeviceMesh``).

    q ``[B, Hq, nq, D]``, k ``[B, Hkv, nk, D]``, v ``[B, Hkv, nk, Dv]`` are this rank's rows of the
    sequence, laid out as ``attnopt.distributed.shard_sequence`` cuts it (``load_balance``: two mirrored
    chunks per rank, which evens the work of causal attention). The result is this rank's rows of
    the attention of the whole sequence, exact forward and backward: positions in ``causal`` and
    ``window`` are global. ``key_padding_mask`` (bool ``[B, nk]``) and ``document_ids``
    (``[B or 1, n]``, or a ``(q_ids, kv_ids)`` pair) are this rank's rows too; integer key padding
    lengths ``[B]`` count global positions. ``fill`` is what a row seeing no key at all gives (see
    ``attnopt.attention``). ``strategy``: "ring" passes K/V blocks rank to rank, "all_gather"
    gathers them at once, "auto" gathers grouped-query K/V (fewer heads than q) when every rank needs
    every block, else rings (``auto_strategy``).
    With ``return_lse`` the result is ``(out, lse)``, lse ``[B, Hq, nq]`` over all keys.
    """
    _check_tensors(q, k, v)
    if causal not in (False, True, "top_left", "bottom_right"):
        raise ValueError(f"causal={causal!r} is not allowed: use False, True, 'top_left' or 'bottom_right'")
    try:
        fill = Fill(fill)
    except ValueError:
        raise ValueError(f"fill={fill!r} is not allowed: use 'safe', '-inf', '-inf_added', 'finite' or "
                         "'finite_added'") from None
    if kernel != "auto":
        registry.get(kernel)
    q_doc, kv_doc = _documents(document_ids)
    plan = make_plan(
        q, k, mesh, causal=bool(causal), align=Align.BOTTOM_RIGHT if causal == "bottom_right" else Align.TOP_LEFT,
        window=_window(window), key_padding=key_padding_mask, q_doc=q_doc, kv_doc=kv_doc,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, softcap=softcap, fill=fill, kernel=kernel,
        load_balance=load_balance, strategy=strategy,
    )
    out, lse = _ContextParallelAttention.apply(q, k, v, plan)
    return (out, lse) if return_lse else out


#: kernels whose backward differentiates with the ``out`` and ``lse`` it is given: a block's gradient is then
#: the one its rows have in the merged softmax (SDPA and Flex recompute their own block's softmax instead)
BLOCKWISE_BACKWARD = ("reference", "triton_flash")


def block_kernel(kernel: str, q) -> str:
    """The kernel the blocks run: ``kernel`` when its backward takes the merged statistics, else the
    device's such kernel (the planner's choice for one process may be an SDPA backend)."""
    if kernel in BLOCKWISE_BACKWARD:
        return kernel
    if q.is_cuda:
        try:
            registry.get("triton_flash")
            return "triton_flash"
        except ValueError:  # no Triton on this install
            pass
    return "reference"


def make_plan(q, k, mesh, *, causal: bool, align: Align, window: Window | None, key_padding, q_doc, kv_doc,
              scale: float, softcap: float | None, fill: Fill, kernel: str, load_balance: bool, strategy: str) -> _Plan:
    """The plan of one call on this rank's rows (collectives: the global key padding and document ids)."""
    if fill == Fill.FINITE_REPLACED_ADDED:
        raise NotImplementedError(
            "context-parallel attention with fill='finite_replaced_added' (a band replaced by finfo.min, then "
            "key padding added) is not supported yet: run this attention outside the ContextParallel scope"
        )
    group, rank, world = _mesh_group(mesh)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed: use one of {STRATEGIES}")
    q_layout = SequenceLayout.of_local(q.shape[2], world, load_balance)
    kv_layout = SequenceLayout.of_local(k.shape[2], world, load_balance)
    kernel = block_kernel(kernel, q)
    plan = _Plan(
        group=group, rank=rank, world=world, q_layout=q_layout, kv_layout=kv_layout, scale=float(scale),
        band=band_bounds(causal, window),
        offset=kv_layout.length - q_layout.length if align == Align.BOTTOM_RIGHT else 0,
        softcap=None if softcap is None else float(softcap), fill=fill, kernel=kernel, strategy=strategy,
        key_padding=_global_key_padding(key_padding, q, k, kv_layout, group),
        q_doc=_global_ids(q_doc, "q", q.shape[2], q_layout, group),
        kv_doc=_global_ids(kv_doc, "kv", k.shape[2], kv_layout, group), device=q.device,
    )
    return plan if strategy != "auto" else replace(plan, strategy=auto_strategy(plan, k.shape[1] < q.shape[1]))


def auto_strategy(plan: _Plan, grouped: bool) -> str:
    """``"all_gather"`` when K/V are grouped (smaller than q) and every rank needs every other rank's block:
    then both move the same bytes and one collective beats P - 1 exchanges. Otherwise ``"ring"``, whose
    exchanges skip the blocks no query of the receiving rank sees (a window over many ranks needs only
    its neighbours' blocks). The same on every rank: ``needs`` is computed from global facts."""
    return "all_gather" if grouped and bool(plan.needs.all()) else "ring"


def _mesh_group(mesh):
    """``(process group, this rank's index in it, its size)`` of a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(
            f"mesh has {mesh.ndim} dimensions {mesh.mesh_dim_names}: pass the 1-D mesh of the context-parallel "
            "dimension, e.g. mesh['cp']"
        )
    return mesh.get_group(), mesh.get_local_rank(), mesh.size()


def _global_key_padding(key_padding, q, k, layout: SequenceLayout, group) -> Tensor | None:
    """Bool ``[B, Nk]`` keep mask over global key positions from this rank's rows (or global lengths)."""
    if key_padding is None:
        return None
    batch, local = q.shape[0], k.shape[2]
    if key_padding.dtype == torch.bool:
        if tuple(key_padding.shape) != (batch, local):
            raise ValueError(
                f"key_padding_mask of shape {tuple(key_padding.shape)} is not allowed: give this rank's rows, "
                f"bool [B, nk] = [{batch}, {local}] (True = keep), or integer global lengths [B]"
            )
        return gather_sequence(key_padding, 1, layout, group)
    if key_padding.is_floating_point() or tuple(key_padding.shape) != (batch,):
        raise ValueError(
            f"key_padding_mask of shape {tuple(key_padding.shape)} and dtype {key_padding.dtype} is not allowed: "
            f"give bool [B, nk] = [{batch}, {local}] rows of this rank or integer global lengths [B] = [{batch}]"
        )
    return key_padding_keep(key_padding, layout.length)


def _global_ids(ids, side: str, local: int, layout: SequenceLayout, group) -> Tensor | None:
    if ids is None:
        return None
    if ids.dim() != 2 or ids.shape[1] != local or ids.is_floating_point():
        raise ValueError(
            f"{side} document ids of shape {tuple(ids.shape)} are not allowed: give this rank's rows, integer "
            f"[B or 1, {local}]"
        )
    return gather_sequence(ids, 1, layout, group)
