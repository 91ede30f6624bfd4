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

Only the keys that the band terms (causal, window), the key padding and the
documents leave visible to some row of the chunk are visited: a causal chunk
stops at its diagonal, a windowed chunk starts at its window's left edge, a
chunk of packed documents spans its documents' keys, and a narrow band
also narrows the query chunk (about the band's width), so a sliding window of
width w costs about ``2 w`` keys per row, not ``N``. Within that range, blocks
that the other terms prove empty (documents, a boolean mask) are skipped too,
and tiles entirely inside the band are not masked at all. Tiles are updated in
place: on a CPU each pass over a tile costs memory bandwidth, more than the
products at small head dims. Arithmetic is float32 for half inputs (float64 for
float64 inputs). Rows with no visible key follow the spec's ``fill``. The backward recomputes the
probabilities of one query chunk at a time from the saved log-sum-exp, so it too stays O(N) in memory.

On the CPU a tile is one call of ATen's fused flash attention (``aten_cpu``) wherever the spec allows it
(``fused``): the products, the masks as one additive tile, the softmax and its log-sum-exp in blocks that stay
in cache, instead of a dozen passes over a score tile in memory. The key blocks of a chunk are then merged by
their log-sum-exps, and the backward is ATen's, per tile, from the row's saved output and log-sum-exp. A
band's chunks are then narrower (about half its width: ``FUSED_BAND_CHUNK``), since a chunk costs one call,
not a dozen passes.
"""

from __future__ import annotations

import torch

from .aten_cpu import cpu_flash_reads_groups, flash_attention_cpu, flash_attention_cpu_backward
from .registry import Grads, Kernel, register
from .fills import empty_row_grads, fill_empty_rows
from .layout import repeat_groups, sum_groups
from .spec import AttentionSpec, key_padding_keep, kept_scale, same_memory

#: elements in one score tile ``[B, Hq, q_chunk, k_block]``: 4M floats = 16 MiB
TILE_ELEMENTS = 1 << 22
K_BLOCK = 1024
#: a banded call is cut into at least this many query chunks
BAND_CHUNKS = 8
#: above this magnitude a float32 lse = m + log(l) resolves log(l) only to ~1e-4 or worse
LSE_EXACT_LIMIT = 1e3
#: a CPU core pair sustains a few tens of GFLOP/s in float32 matmul
CPU_FLOPS = 5e10
# The cost model: a visited score costs its two products and ``TILE_PASSES`` elementwise passes
# over the float32 tile (scale, max, exp, sum, ...; ``MASK_PASSES`` more to build and apply masks),
# and each op one dispatch. Fitted on a 2-core CPU: 1.6-1.9 ns per visited score at D = 32 unmasked,
# 3.3-3.7 ns with masks.
TILE_PASSES, MASK_PASSES = 8, 6
OPS_PER_TILE, OPS_PER_CHUNK = 16, 14
#: (matmul FLOP/s, bytes/s of a pass over a tile, seconds of dispatch per op), by device type
RATES = {"cpu": (1.2e11, 3e10, 5e-6), "cuda": (5e13, 2e12, 1e-5)}
#: on the CPU, tiles through ATen's fused flash attention where the spec allows it (``fused``)
FUSED_CPU = True
#: a fused band's query chunk is about half the band's width, within these bounds: a chunk of c rows visits
#: c + w - 1 keys for the w each row needs, and costs one call of a few tens of us (2-core CPU, w = 128:
#: c = 64 took 11.6 ms at N = 2048, 8 heads, D = 64; c = 32, 128 and 256 took 14.2, 13.6 and 15.0 ms)
FUSED_BAND_CHUNK = (32, 256)
#: a fused chunk of packed documents has at most this many rows: its keys are its documents' span (measured on a
#: 2-core CPU, causal, 8 heads, D 64: 16 documents at N 2048, 64 and 4 at N 8192 took 17.1 / 71.4 / 184.6 ms in
#: chunks of N / 8 rows, 15.3 / 40.3 / 155.2 ms in chunks of 256, 14.9 / 36.6 / 187.4 ms in chunks of 128)
FUSED_DOCUMENT_CHUNK = 256
#: where every batch row packs the same documents, a fused chunk ends at a document's end once it has this many
#: rows, so a document's rows visit its own keys alone and no other document's; shorter documents share a chunk
#: (one call each would cost more than the keys they share). 16 documents of 128 at N 2048, 8 heads, D 64, 2-core
#: CPU: 5.4 ms in one call per document, 13.4 ms in chunks of 256 rows (two documents' keys each)
FUSED_DOCUMENT_MIN = 64
#: packed documents that are whole (``_whole_documents``: self-attention with causal or nothing else on top) and
#: of one length go through ATen in runs of up to this many rows, each document its own batch entry of the call
#: (``_document_run``); a longer document takes the chunks
FUSED_DOCUMENT_RUN = 1024
#: a run has at least this many rows: its call costs ATen's alone (2-core CPU, one thread, 8 heads, D 64, causal: 32
#: us for a document of 8 rows, 108 us for 31, 171 us for 64), where a plain chunk also builds its mask (0.3-0.5 ms)
FUSED_RUN_MIN = 16
#: the cost model's passes over a fused tile (its mask's building and reading, the softmax in cache) and ops per
#: tile (the mask, the call, the merge of key blocks)
FUSED_PASSES, FUSED_OPS_PER_TILE = 3, 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, float64 for float64 inputs (the oracle's precision)."""
    return _compute_dtype(dtype)


def band_width(spec: AttentionSpec) -> int | None:
    """Keys a row of the band sees at most (``hi - lo + 1``); None when the band is unbounded on a side."""
    lo, hi = spec.band()
    return None if lo is None or hi is None else max(0, hi - lo + 1)


def chunk_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """``(q_chunk, k_block)``, a pure function of the spec so forward and backward agree.

    A band narrows the query chunk: a chunk of ``c`` rows visits the keys of
    all its rows, ``c + w - 1`` for ``w`` each row needs, so a causal call gets
    at least ``BAND_CHUNKS`` chunks and a narrow band chunks of about its width.
    """
    k_block = max(1, min(spec.kv_len, K_BLOCK))
    rows = TILE_ELEMENTS // max(1, spec.batch * spec.q_heads * k_block)
    q_chunk = max(1, min(spec.q_len, max(16, rows)))
    lo, hi = spec.band()
    if lo is not None or hi is not None:
        # a chunk visits the keys of its last row's diagonal: eighths keep a causal chunk's waste ~6%
        q_chunk = min(q_chunk, max(16, -(-spec.q_len // BAND_CHUNKS)))
    width = band_width(spec)
    if width is not None:
        low, high = FUSED_BAND_CHUNK
        q_chunk = min(q_chunk, max(low, min(high, width // 2)) if fused(spec) else max(16, width))
    if spec.q_doc is not None and fused(spec):
        q_chunk = min(q_chunk, FUSED_DOCUMENT_CHUNK)
    return q_chunk, k_block


def _chunks(spec: AttentionSpec) -> list[tuple[int, int, int]]:
    """The query chunks ``(q0, q1, length)`` forward and backward walk: ``chunk_sizes``' rows, or for fused packed
    documents that every batch row shares, chunks that end where documents end (``FUSED_DOCUMENT_MIN``). Where the
    documents are whole (``_whole_documents``), consecutive ones of one ``length`` are a run of their own, one
    fused call (``_document_run``); ``length`` is 0 for every other chunk."""
    q_chunk, _ = chunk_sizes(spec)
    starts = _document_starts(spec) if spec.q_doc is not None and fused(spec) else None
    if starts is None:
        return [(q0, min(q0 + q_chunk, spec.q_len), 0) for q0 in range(0, spec.q_len, q_chunk)]
    docs = list(zip([0] + starts, starts + [spec.q_len]))
    whole = _whole_documents(spec, starts)
    chunks, span, ends, i = [], 0, [], 0  # ends: the documents since ``span`` that take plain chunks
    while i < len(docs):
        start, end = docs[i]
        length, j = end - start, i + 1
        while (whole and j < len(docs) and docs[j][1] - docs[j][0] == length
               and (j + 1 - i) * length <= FUSED_DOCUMENT_RUN):
            j += 1
        run_end = docs[j - 1][1]
        if whole and length <= FUSED_DOCUMENT_RUN and run_end - start >= FUSED_RUN_MIN:
            chunks += _cut(span, ends, q_chunk)
            chunks.append((start, run_end, length))
            span, ends = run_end, []
        else:
            ends += [doc[1] for doc in docs[i:j]]
        i = j
    return chunks + _cut(span, ends, q_chunk)


def _cut(q0: int, ends: list[int], q_chunk: int) -> list[tuple[int, int, int]]:
    """Plain chunks from row ``q0`` through the documents ending at ``ends``: each ends where a document ends once
    it has ``FUSED_DOCUMENT_MIN`` rows (a short document joins the next), a long one is cut at ``q_chunk``."""
    chunks = []
    for end in ends:
        while end - q0 > q_chunk:
            chunks.append((q0, q0 + q_chunk, 0))
            q0 += q_chunk
        if end > q0 and (end - q0 >= FUSED_DOCUMENT_MIN or end == ends[-1]):
            chunks.append((q0, end, 0))
            q0 = end
    return chunks


def _document_starts(spec: AttentionSpec) -> list[int] | None:
    """The rows where a new query document starts (after row 0), when every batch row has the same documents;
    else None."""
    ids = spec.q_doc
    if ids.shape[0] > 1 and not bool((ids == ids[:1]).all()):
        return None
    row = ids[0]
    return (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()


def _runs_possible(spec: AttentionSpec) -> bool:
    """What ``_whole_documents`` reads from the spec's structure alone: fused self-attention over documents
    without offset, causal or no band, no other term."""
    if spec.q_doc is None or not fused(spec) or spec.q_len != spec.kv_len or spec.diagonal_offset != 0:
        return False
    no_terms = spec.key_padding is None and spec.mask is None and spec.bias is None
    return no_terms and spec.band() in ((None, None), (None, 0))


def _whole_documents(spec: AttentionSpec, starts: list[int]) -> bool:
    """Whether each packed document attends to itself alone, so that a document is one attention of its own:
    self-attention (the query and key ids are the same ids, no offset), causal or no band, no other term, and no
    id shared by two documents apart (``ids[i] == ids[j]`` joins rows whatever lies between them)."""
    if not _runs_possible(spec):
        return False
    q_doc, kv_doc = spec.q_doc, spec.kv_doc
    if not (same_memory(q_doc, kv_doc) or (q_doc.shape == kv_doc.shape and torch.equal(q_doc, kv_doc))):
        return False
    ids = q_doc[0, [0] + starts]
    return ids.unique().numel() == ids.numel()


def fused(spec: AttentionSpec) -> bool:
    """Whether the spec's tiles go through ATen's fused CPU flash attention: on the CPU (``FUSED_CPU``), with
    one head dim for keys and values (ATen's condition), no dropout (this kernel draws its own, per tile), no
    softcap (it comes before the masks) and no additive term in a half dtype (eager adds those at that
    precision: ``add_term``)."""
    if not FUSED_CPU or spec.device.type != "cpu" or spec.dropout_p > 0.0 or spec.softcap is not None:
        return False
    if spec.head_dim != spec.v_head_dim:
        return False
    half = spec.dtype in (torch.float16, torch.bfloat16)
    return not (half and any(t is not None and t.dtype == spec.dtype for t in (spec.bias, spec.mask)))


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
    """Which keys a query chunk must visit, from the mask terms' structure.

    ``key_range``: the band terms and the key padding bound the visible keys of
    rows ``q0:q1`` to one interval; nothing outside it is visited. ``empty``:
    a block inside it that documents or a boolean mask prove empty.
    ``unmasked``: a tile that no boolean term masks (inside the band, no other
    boolean term), so its scores need no keep mask.
    """

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.lo, self.hi = spec.band()
        self.kv_end = spec.kv_len
        if spec.key_padding is not None:
            keep = key_padding_keep(spec.key_padding, spec.kv_len)
            cols = torch.arange(1, spec.kv_len + 1, device=keep.device)
            self.kv_end = int((keep * cols).amax()) if keep.numel() else 0
        self.band_only = spec.key_padding is None and spec.q_doc is None and not (
            spec.mask is not None and spec.mask.dtype == torch.bool
        )
        #: the fused tiles' band masks of this call, by (rows, keys' offset to the rows, keys, dtype)
        self.band_masks: dict[tuple, tuple] = {}

    def key_range(self, q0: int, q1: int) -> tuple[int, int]:
        """Keys ``[start, end)`` that some row of ``q0:q1`` may see: outside it the band, the padding or the
        documents mask all."""
        off = self.spec.diagonal_offset
        start, end = 0, self.kv_end
        if self.lo is not None:
            start = max(start, q0 + off + self.lo)
        if self.hi is not None:
            end = min(end, q1 - 1 + off + self.hi + 1)
        if self.spec.q_doc is not None and end > start:
            first, last = self._document_keys(q0, q1)
            start, end = max(start, first), min(end, last)
        return start, max(start, end)

    def _document_keys(self, q0: int, q1: int) -> tuple[int, int]:
        """The first and one past the last key whose document id lies within the ids of rows ``q0:q1``
        (in any batch): a key outside them shares no document with any of those rows. O(Nk) per chunk."""
        q_ids = self.spec.q_doc[:, q0:q1]  # [Bd, q]
        kv_ids = self.spec.kv_doc  # [Bd, Nk]
        inside = (kv_ids >= q_ids.amin(1, keepdim=True)) & (kv_ids <= q_ids.amax(1, keepdim=True))
        keys = inside.any(0).nonzero()
        return (0, 0) if keys.numel() == 0 else (int(keys[0]), int(keys[-1]) + 1)

    def unmasked(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        """Whether no boolean term masks any entry of the tile."""
        if not self.band_only:
            return False
        off = self.spec.diagonal_offset
        inside_lo = self.lo is None or k0 - (q1 - 1 + off) >= self.lo
        inside_hi = self.hi is None or (k1 - 1) - (q0 + off) <= self.hi
        return inside_lo and inside_hi

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


def _scores(q_g, k_t, spec: AttentionSpec, skipper: _Skipper, q0: int, q1: int, k0: int, k1: int):
    """Masked scores of one tile ``[B, Hkv, G, q, k]`` (a new tensor the caller may overwrite) and the
    softcap's tanh (None without softcap)."""
    s = q_g @ k_t.transpose(-1, -2)
    s.mul_(spec.scale)
    tanh = None
    if spec.softcap is not None:
        tanh = torch.tanh(s / spec.softcap)
        s = tanh * spec.softcap
    for term in spec.additive_tiles(q0, q1, k0, k1):
        term = _grouped(term, spec.kv_heads)
        if spec.dtype in (torch.float16, torch.bfloat16) and term.dtype == spec.dtype:
            s = add_term(s, term, spec.dtype)
        else:
            s.add_(term.to(s.dtype))  # = add_term's full-precision case, without a new tile
    if not skipper.unmasked(q0, q1, k0, k1):
        keep = spec.keep_tile(q0, q1, k0, k1)
        if keep is not None:
            s.masked_fill_(~_grouped(keep, spec.kv_heads), float("-inf"))
    return s, tanh


def _key_blocks(spec: AttentionSpec, skipper: _Skipper, q0: int, q1: int):
    """Key blocks ``(k0, k1)`` query rows ``q0:q1`` visit: the range the band and padding leave, in blocks
    of at most ``k_block``, less the blocks proven empty."""
    _, k_block = chunk_sizes(spec)
    start, end = skipper.key_range(q0, q1)
    for k0 in range(start, end, k_block):
        k1 = min(k0 + k_block, end)
        if not skipper.empty(q0, q1, k0, k1):
            yield k0, k1


def visits(spec: AttentionSpec) -> tuple[int, int, int]:
    """``(score elements, tiles, query chunks)`` the forward visits, from the band terms alone (the values of
    key padding, documents and masks are not known when planning)."""
    q_chunk, k_block = chunk_sizes(spec)
    lo, hi = spec.band()
    off = spec.diagonal_offset
    elements = tiles = chunks = 0
    for q0 in range(0, spec.q_len, q_chunk):
        q1 = min(q0 + q_chunk, spec.q_len)
        start = 0 if lo is None else max(0, q0 + off + lo)
        end = spec.kv_len if hi is None else min(spec.kv_len, q1 - 1 + off + hi + 1)
        chunks += 1
        if end > start:
            elements += (q1 - q0) * (end - start)
            tiles += -(-(end - start) // k_block)
    return elements * spec.batch * spec.q_heads, tiles, chunks


def _group_rows(x: torch.Tensor, spec: AttentionSpec, cdtype) -> torch.Tensor:
    """``[B, Hq, q, D]`` -> ``[B, Hkv, G, q, D]`` in the compute dtype."""
    b, _, n, d = x.shape
    return x.to(cdtype).reshape(b, spec.kv_heads, spec.group_size, n, d)


def _online_step(m, l, s):
    """One key block of the online softmax: new ``(m, l)``, the block's ``exp(s - m)`` (computed in ``s``'s
    storage) and the rescale factor of what was accumulated before (all-masked rows keep ``m = -inf``
    without NaNs)."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = s.sub_(m_safe[..., None]).exp_()
    alpha = torch.exp(m - m_safe)
    return m_new, l * alpha + p.sum(-1), p, alpha


def _rows(q_rows, k, v, spec: AttentionSpec, q0: int, seed: int, skipper: _Skipper):
    """Attention of query rows ``q0 : q0 + len`` against all keys: ``(out, lse)`` in compute dtype."""
    cdtype = _compute_dtype(q_rows.dtype)
    batch, q_heads, n_rows, _ = q_rows.shape
    q1 = q0 + n_rows
    q_g = _group_rows(q_rows, spec, cdtype)  # [B, Hkv, G, q, D]
    m = q_g.new_full(q_g.shape[:-1], float("-inf"))  # [B, Hkv, G, q]
    l = q_g.new_zeros(q_g.shape[:-1])
    acc = q_g.new_zeros((*q_g.shape[:-1], spec.v_head_dim))
    for k0, k1 in _key_blocks(spec, skipper, q0, q1):
        k_t = k[:, :, k0:k1].to(cdtype)[:, :, None]  # [B, Hkv, 1, k, D]
        v_t = v[:, :, k0:k1].to(cdtype)[:, :, None]  # [B, Hkv, 1, k, Dv]
        s, _ = _scores(q_g, k_t, spec, skipper, q0, q1, k0, k1)
        m, l, p, alpha = _online_step(m, l, s)
        if spec.dropout_p > 0.0:
            p.mul_(_dropout_scale(p.shape, spec, seed, q0, k0, p.device))
        acc.mul_(alpha[..., None]).add_(p @ v_t)

    empty_row = l == 0
    out = acc / torch.where(empty_row, torch.ones_like(l), l)[..., None]
    out = out.reshape(batch, q_heads, n_rows, spec.v_head_dim)
    if bool(empty_row.any()):
        out = fill_empty_rows(out, empty_row.reshape(batch, q_heads, n_rows), v, spec, q0, seed)
    lse = m + torch.log(l)
    return out, lse.reshape(batch, q_heads, n_rows)


def _row_stats(q_g, k, spec: AttentionSpec, q0: int, q1: int, skipper: _Skipper):
    """Row maximum ``m`` and ``l = sum exp(s - m)`` of a query chunk, visiting the same key blocks."""
    m = q_g.new_full(q_g.shape[:-1], float("-inf"))
    l = q_g.new_zeros(q_g.shape[:-1])
    for k0, k1 in _key_blocks(spec, skipper, q0, q1):
        s, _ = _scores(q_g, k[:, :, k0:k1].to(q_g.dtype)[:, :, None], spec, skipper, q0, q1, k0, k1)
        m, l, _, _ = _online_step(m, l, s)
    return torch.where(torch.isinf(m), torch.zeros_like(m), m), l


def _rows_backward(q_rows, k, v, out_rows, lse_rows, grad_rows, spec, q0, seed, skipper, grads):
    """Accumulate this chunk's contribution to dk, dv, dbias, dmask into ``grads``; return dq rows.

    Flash backward: with P = exp(s - lse) and D = rowsum(dO * O),
    dV += P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK += scale dS^T Q.
    Rows with no visible key contribute nothing here; ``fills.empty_row_grads``
    adds what the original's autograd gave them.
    """
    cdtype = _compute_dtype(q_rows.dtype)
    q1 = q0 + q_rows.shape[2]
    q_g = _group_rows(q_rows, spec, cdtype)
    do_g = _group_rows(grad_rows, spec, cdtype)  # [B, Hkv, G, q, Dv]
    o_g = _group_rows(out_rows, spec, cdtype)
    lse = lse_rows.to(cdtype).reshape(q_g.shape[:-1])  # [B, Hkv, G, q]
    empty_row = torch.isneginf(lse)
    lse_safe = torch.where(empty_row, torch.zeros_like(lse), lse)
    if bool((lse_safe.abs() > LSE_EXACT_LIMIT).any()):
        # a row whose scores all sit near a huge fill (s + finfo.min) has lost log(l) to rounding
        # in lse = m + log(l): recompute its normalizer in the offset form (m, log l)
        m, l = _row_stats(q_g, k, spec, q0, q1, skipper)
        lse_safe = torch.where(l > 0, m + 0.0, torch.zeros_like(m))
        log_l = torch.where(l > 0, torch.log(l), torch.zeros_like(l))
    else:
        log_l = None
    delta = (do_g * torch.where(empty_row[..., None], torch.zeros_like(o_g), o_g)).sum(-1)
    dq = torch.zeros_like(q_g)
    for k0, k1 in _key_blocks(spec, skipper, q0, q1):
        k_t = k[:, :, k0:k1].to(cdtype)[:, :, None]
        v_t = v[:, :, k0:k1].to(cdtype)[:, :, None]
        s, tanh = _scores(q_g, k_t, spec, skipper, q0, q1, k0, k1)
        p = s.sub_(lse_safe[..., None]).exp_()  # [B, Hkv, G, q, k]
        if log_l is not None:
            p.mul_(torch.exp(-log_l)[..., None])
        p.masked_fill_(empty_row[..., None], 0.0)
        dp = do_g @ v_t.transpose(-1, -2)
        if spec.dropout_p > 0.0:
            z = _dropout_scale(p.shape, spec, seed, q0, k0, p.device)
            grads["v"][:, :, k0:k1] += ((p * z).transpose(-1, -2) @ do_g).sum(2)
            dp.mul_(z)
        else:
            grads["v"][:, :, k0:k1] += (p.transpose(-1, -2) @ do_g).sum(2)
        ds = dp.sub_(delta[..., None]).mul_(p)  # gradient of the masked, biased scores
        for name in ("bias", "mask"):
            if name in grads:
                _accumulate_term(grads[name], ds, q0, q1, k0, k1)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq += (ds @ k_t) * spec.scale
        grads["k"][:, :, k0:k1] += (ds.transpose(-1, -2) @ q_g).sum(2) * spec.scale
    return dq.reshape(q_rows.shape)


def _tile_mask(spec: AttentionSpec, skipper: _Skipper, q0: int, q1: int, k0: int, k1: int, cdtype,
               closed: bool = True):
    """A tile's terms as the one additive mask ATen's fused attention takes (``-inf`` where a boolean term masks;
    None when nothing masks the tile) and, with ``closed``, the rows it masks entirely (``[b or 1, h or 1, q]``;
    None when there are none: ATen gives such a row 0 and a log-sum-exp of 0).

    A band alone masks a tile by its rows' offset to its keys only: the chunks of a call that share their
    shape and offset share one mask (``_Skipper.band_masks``)."""
    if skipper.band_only and not spec.additive_tiles(q0, q1, k0, k1):
        if skipper.unmasked(q0, q1, k0, k1):
            return None, None
        key = (q1 - q0, k0 - q0, k1 - k0, cdtype)
        if key not in skipper.band_masks:
            skipper.band_masks[key] = _mask_of(spec.keep_tile(q0, q1, k0, k1), [], cdtype, True)
        mask, rows = skipper.band_masks[key]
        return mask, rows if closed else None
    keep = None if skipper.unmasked(q0, q1, k0, k1) else spec.keep_tile(q0, q1, k0, k1)
    return _mask_of(keep, spec.additive_tiles(q0, q1, k0, k1), cdtype, closed)


def _mask_of(keep: torch.Tensor | None, additive: list[torch.Tensor], cdtype, closed: bool):
    mask = None
    for term in additive:
        mask = term.to(cdtype) if mask is None else mask + term.to(cdtype)
    if keep is not None:
        mask = (torch.zeros((), dtype=cdtype, device=keep.device) if mask is None else mask).masked_fill(
            ~keep, float("-inf"))
    if mask is None:
        return None, None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if not closed:
        return mask, None
    rows = torch.isneginf(mask).all(-1)
    return mask, rows if bool(rows.any()) else None


def _kv_tile(k, v, k0: int, k1: int, spec: AttentionSpec, cdtype):
    """Keys and values ``k0:k1`` as ATen's fused attention reads them: repeated per query head where it does not
    read groups itself (``cpu_flash_reads_groups``)."""
    k_t, v_t = k[:, :, k0:k1].to(cdtype), v[:, :, k0:k1].to(cdtype)
    return (k_t, v_t) if cpu_flash_reads_groups() else repeat_groups(k_t, v_t, spec.group_size)


def _merged(out, lse, o, l):
    """Two key blocks' attention of the same rows, merged by their log-sum-exps (rows without keys: ``-inf``)."""
    total = torch.logaddexp(lse, l)
    base = total.masked_fill(torch.isneginf(total), 0.0)
    return out * torch.exp(lse - base)[..., None] + o * torch.exp(l - base)[..., None], total


def _fused_rows(q_rows, k, v, spec: AttentionSpec, q0: int, seed: int, skipper: _Skipper):
    """``_rows`` with each tile one call of ATen's fused CPU attention, the key blocks merged by their
    log-sum-exps. None when a row's log-sum-exp is too large to merge blocks by (scores that sit near a huge
    fill, ``LSE_EXACT_LIMIT``): ``_rows`` keeps that row's normalizer in the offset form."""
    cdtype = _compute_dtype(q_rows.dtype)
    batch, q_heads, n_rows, _ = q_rows.shape
    q1 = q0 + n_rows
    q_c = q_rows.to(cdtype)
    out = lse = None
    for k0, k1 in _key_blocks(spec, skipper, q0, q1):
        k_t, v_t = _kv_tile(k, v, k0, k1, spec, cdtype)
        mask, closed = _tile_mask(spec, skipper, q0, q1, k0, k1, cdtype)
        o, l = flash_attention_cpu(q_c, k_t, v_t, 0.0, False, attn_mask=mask, scale=spec.scale)
        l = l.to(cdtype)
        if closed is not None:
            o, l = o.masked_fill(closed[..., None], 0.0), l.masked_fill(closed, float("-inf"))
        if out is not None and bool(((lse.abs() > LSE_EXACT_LIMIT) & torch.isfinite(lse)).any()
                                    | ((l.abs() > LSE_EXACT_LIMIT) & torch.isfinite(l)).any()):
            return None
        out, lse = (o, l) if out is None else _merged(out, lse, o, l)
    if out is None:  # no key block left: every row is without keys
        out = q_c.new_zeros((batch, q_heads, n_rows, spec.v_head_dim))
        lse = q_c.new_full((batch, q_heads, n_rows), float("-inf"))
    empty_row = torch.isneginf(lse)
    if bool(empty_row.any()):
        out = fill_empty_rows(out, empty_row, v, spec, q0, seed)
    return out, lse


def _fused_rows_backward(q_rows, k, v, out_rows, lse_rows, grad_rows, spec, q0, skipper, grads):
    """``_rows_backward`` through ATen's fused CPU backward, one call per tile from the rows' output and
    log-sum-exp; None (nothing accumulated) when a row's log-sum-exp is too large to give its probabilities
    exactly (``LSE_EXACT_LIMIT``), which ``_rows_backward`` recomputes in the offset form."""
    cdtype = _compute_dtype(q_rows.dtype)
    q1 = q0 + q_rows.shape[2]
    lse = lse_rows.to(cdtype)
    empty = torch.isneginf(lse)
    if bool(((lse.abs() > LSE_EXACT_LIMIT) & ~empty).any()):
        return None
    q_c, out, grad = q_rows.to(cdtype), out_rows.to(cdtype), grad_rows.to(cdtype)
    if bool(empty.any()):
        # a row without keys passes nothing here (``fills.empty_row_grads`` adds its gradient): log-sum-exp
        # +inf makes its probabilities exactly 0
        grad, out = grad.masked_fill(empty[..., None], 0.0), out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("inf"))
    dq = torch.zeros_like(q_c)
    for k0, k1 in _key_blocks(spec, skipper, q0, q1):
        k_t, v_t = _kv_tile(k, v, k0, k1, spec, cdtype)
        mask, _ = _tile_mask(spec, skipper, q0, q1, k0, k1, cdtype, closed=False)
        dq_t, dk_t, dv_t = flash_attention_cpu_backward(grad, q_c, k_t, v_t, out, lse, 0.0, False, attn_mask=mask,
                                                        scale=spec.scale)
        dq += dq_t
        grads["k"][:, :, k0:k1] += sum_groups(dk_t, spec.kv_heads)
        grads["v"][:, :, k0:k1] += sum_groups(dv_t, spec.kv_heads)
    return dq


def _run_shape(spec: AttentionSpec, q0: int, q1: int, length: int, dim: int) -> tuple[int, ...]:
    """A run of documents' rows ``[B, H, q1 - q0, dim]`` as ATen's call sees them: one batch entry per (batch row,
    head), one head per document."""
    return spec.batch * spec.q_heads, (q1 - q0) // length, length, dim


def _run_kv(k, v, spec: AttentionSpec, q0: int, q1: int, cdtype):
    """The run's keys and values, repeated per query head (the call's batch entries are the query heads)."""
    return repeat_groups(k[:, :, q0:q1].to(cdtype), v[:, :, q0:q1].to(cdtype), spec.group_size)


def _document_run(q, k, v, spec: AttentionSpec, q0: int, q1: int, length: int):
    """Output and log-sum-exp of rows ``q0:q1``, whole documents of ``length`` rows each (``_chunks``), in one call
    of ATen's fused attention with each document a batch entry of its own (causal within it where the spec is
    causal): no mask is built, and every row sees at least its own key."""
    cdtype = _compute_dtype(q.dtype)
    k_t, v_t = _run_kv(k, v, spec, q0, q1, cdtype)
    shape = _run_shape(spec, q0, q1, length, spec.head_dim)
    out, lse = flash_attention_cpu(q[:, :, q0:q1].to(cdtype).reshape(shape), k_t.reshape(shape),
                                   v_t.reshape(_run_shape(spec, q0, q1, length, spec.v_head_dim)), 0.0, spec.causal,
                                   scale=spec.scale)
    rows = (spec.batch, spec.q_heads, q1 - q0)
    return out.reshape(*rows, spec.v_head_dim), lse.reshape(rows).to(cdtype)


def _document_run_backward(q, k, v, out, lse, grad_out, spec: AttentionSpec, q0: int, q1: int, length: int, grads):
    """``_document_run``'s backward into ``grads`` (dK, dV) and its dQ; None (nothing accumulated) when a row's
    log-sum-exp passes ``LSE_EXACT_LIMIT``, as ``_fused_rows_backward``."""
    cdtype = _compute_dtype(q.dtype)
    lse = lse[:, :, q0:q1].to(cdtype)
    if bool((lse.abs() > LSE_EXACT_LIMIT).any()):
        return None
    k_t, v_t = _run_kv(k, v, spec, q0, q1, cdtype)
    shape = _run_shape(spec, q0, q1, length, spec.head_dim)
    v_shape = _run_shape(spec, q0, q1, length, spec.v_head_dim)
    rows = (spec.batch, spec.q_heads, q1 - q0, spec.head_dim)
    dq, dk, dv = flash_attention_cpu_backward(
        grad_out[:, :, q0:q1].to(cdtype).reshape(v_shape), q[:, :, q0:q1].to(cdtype).reshape(shape),
        k_t.reshape(shape), v_t.reshape(v_shape), out[:, :, q0:q1].to(cdtype).reshape(v_shape), lse.reshape(shape[:3]),
        0.0, spec.causal, scale=spec.scale)
    grads["k"][:, :, q0:q1] += sum_groups(dk.reshape(rows), spec.kv_heads)
    grads["v"][:, :, q0:q1] += sum_groups(dv.reshape(*rows[:3], spec.v_head_dim), spec.kv_heads)
    return dq.reshape(rows)


def _accumulate_term(total: torch.Tensor, ds: torch.Tensor, q0: int, q1: int, k0: int, k1: int) -> None:
    """Add the score gradient of a tile to an additive term's gradient, summed over its broadcast dims."""
    b, hkv, g, nq, nk = ds.shape
    ds = ds.reshape(b, hkv * g, nq, nk)
    target = total
    while target.dim() < 4:
        target = target[None]
    rows = slice(None) if target.shape[2] == 1 else slice(q0, q1)
    cols = slice(None) if target.shape[3] == 1 else slice(k0, k1)
    dims = [d for d in range(4) if target.shape[d] == 1 and ds.shape[d] != 1]
    target[:, :, rows, cols] += ds.sum(dims, keepdim=True) if dims else ds


def _dropout_scale(shape, spec: AttentionSpec, seed: int, q0: int, k0: int, device) -> torch.Tensor:
    """The tile's dropout multiplier (0 or 1 / (1 - p)), regenerated identically by the backward."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + q0 * 65_537 + k0) % (1 << 63))
    keep = torch.rand(shape, generator=gen, device=device) >= spec.dropout_p
    return keep * kept_scale(spec.dropout_p)


def _aten_thread_bytes(q_rows: int, keys: int, head_dim: int, itemsize: int) -> int:
    """ATen's CPU flash attention's buffers per thread: a block's scores, their row statistics and its output.
    Its blocks: 256 queries from 768 rows on (64 from 192, else 32), and up to 512 keys."""
    block_q = 256 if q_rows >= 768 else 64 if q_rows >= 192 else 32
    return block_q * (min(keys, 512) + head_dim + 2) * itemsize


def _fused_memory(spec: AttentionSpec, q_chunk: int, keys: int) -> int:
    """The fused tiles' workspace: a tile's additive mask (and the one it is built from), as wide as its terms
    (rows for a band, documents or a term per row; batch for padding, documents and batched terms; heads for
    terms per head), the rows' outputs and log-sum-exps of two key blocks and their merge, and ATen's buffers
    per thread."""
    itemsize = 8 if spec.dtype == torch.float64 else 4
    lo, hi = spec.band()
    per_row = lo is not None or hi is not None or spec.q_doc is not None
    batched = spec.key_padding is not None or spec.q_doc is not None
    per_head = False
    for term in (spec.bias, spec.mask):
        if term is not None:
            per_row = per_row or (term.dim() >= 2 and term.shape[-2] > 1)
            per_head = per_head or (term.dim() >= 3 and term.shape[-3] > 1)
            batched = batched or (term.dim() == 4 and term.shape[0] > 1)
    mask = ((q_chunk if per_row else 1) * keys * (spec.batch if batched else 1) * (spec.q_heads if per_head else 1)
            * itemsize)
    rows = spec.batch * spec.q_heads * q_chunk * (spec.v_head_dim + 1) * itemsize
    chunks = 2 * mask + 4 * rows
    if _runs_possible(spec):  # a run's dQ, dK and dV (and its K/V repeated per query head)
        run_rows = min(spec.q_len, FUSED_DOCUMENT_RUN)
        run = spec.batch * spec.q_heads * run_rows * (spec.head_dim + 1) * itemsize * (5 if spec.group_size > 1 else 3)
        chunks = max(chunks, run)
    return chunks + torch.get_num_threads() * _aten_thread_bytes(q_chunk, keys, spec.v_head_dim, itemsize)


class ReferenceKernel(Kernel):
    name = "reference"
    exact = True
    summary = "exact chunked online-softmax attention in PyTorch ops (any device, any mask)"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        return []

    def memory_bytes(self, spec: AttentionSpec) -> int:
        q_chunk, k_block = chunk_sizes(spec)
        width = band_width(spec)
        # a chunk of a band of width w sees at most q_chunk + w - 1 keys: its tiles are no wider
        keys = k_block if width is None else max(1, min(k_block, q_chunk + width - 1))
        if fused(spec):
            return _fused_memory(spec, q_chunk, keys)
        tile = spec.batch * spec.q_heads * q_chunk * keys * 4
        acc = spec.batch * spec.q_heads * q_chunk * (spec.v_head_dim + spec.head_dim + 2) * 4
        # the scores, updated in place into the probabilities, a keep mask and the product's
        # temporaries: measured at 1.2-2.7 tiles on the CPU
        return 3 * tile + 2 * acc

    def cost(self, spec: AttentionSpec) -> float:
        flops_rate, bytes_rate, op_s = RATES.get(spec.device.type, RATES["cpu"])
        elements, tiles, chunks = visits(spec)
        if fused(spec):
            passes, per_tile = FUSED_PASSES, FUSED_OPS_PER_TILE
        else:
            passes, per_tile = TILE_PASSES + (MASK_PASSES if spec.mask_terms else 0), OPS_PER_TILE
        per_element = 2.0 * (spec.head_dim + spec.v_head_dim) / flops_rate + passes * 4 / bytes_rate
        return elements * per_element + (tiles * per_tile + chunks * OPS_PER_CHUNK) * op_s

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        skipper = _Skipper(spec)
        fuse = fused(spec)
        out = q.new_empty((spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim))
        lse = q.new_empty((spec.batch, spec.q_heads, spec.q_len), dtype=lse_dtype(q.dtype))
        with torch.no_grad():
            for q0, q1, length in _chunks(spec):
                if length:
                    out_c, lse_c = _document_run(q, k, v, spec, q0, q1, length)
                else:
                    rows = _fused_rows(q[:, :, q0:q1], k, v, spec, q0, seed, skipper) if fuse else None
                    out_c, lse_c = rows or _rows(q[:, :, q0:q1], k, v, spec, q0, seed, skipper)
                out[:, :, q0:q1] = out_c
                lse[:, :, q0:q1] = lse_c
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        cdtype = _compute_dtype(q.dtype)
        skipper = _Skipper(spec)
        grads = {"k": k.new_zeros(k.shape, dtype=cdtype), "v": v.new_zeros(v.shape, dtype=cdtype)}
        if needs_bias_grad:
            grads["bias"] = torch.zeros_like(spec.bias, dtype=cdtype)
        if needs_mask_grad:
            grads["mask"] = torch.zeros_like(spec.mask, dtype=cdtype)
        dq = torch.empty_like(q)
        fuse = fused(spec) and not (needs_bias_grad or needs_mask_grad)  # ATen's backward gives no score gradient
        with torch.no_grad():
            q_chunk, _ = chunk_sizes(spec)
            for c0, c1, length in _chunks(spec):
                dq_run = _document_run_backward(q, k, v, out, lse, grad_out, spec, c0, c1, length, grads) if (
                    length) else None
                if dq_run is not None:
                    dq[:, :, c0:c1] = dq_run
                    continue
                # a plain chunk, or a run that falls back: cut into plain chunks
                parts = [(a, min(a + q_chunk, c1)) for a in range(c0, c1, q_chunk)] if length else [(c0, c1)]
                for q0, q1 in parts:
                    rows = (q[:, :, q0:q1], k, v, out[:, :, q0:q1], lse[:, :, q0:q1], grad_out[:, :, q0:q1])
                    dq_rows = _fused_rows_backward(*rows, spec, q0, skipper, grads) if fuse else None
                    dq[:, :, q0:q1] = dq_rows if dq_rows is not None else _rows_backward(
                        *rows, spec, q0, seed, skipper, grads)
            if spec.rows_need_fill():  # else no row is empty or its output is 0: nothing to look for
                extra = empty_row_grads(q, k, v, grad_out, torch.isneginf(lse), spec, needs_bias_grad,
                                        needs_mask_grad, seed)
                for name, grad in zip(("q", "k", "v", "bias", "mask"), extra):
                    if grad is not None:
                        target = dq if name == "q" else grads[name]
                        target += grad.to(target.dtype)
        dbias = grads["bias"].to(spec.bias.dtype) if needs_bias_grad else None
        dmask = grads["mask"].to(spec.mask.dtype) if needs_mask_grad else None
        return dq, grads["k"].to(k.dtype), grads["v"].to(v.dtype), dbias, dmask


register(ReferenceKernel())
