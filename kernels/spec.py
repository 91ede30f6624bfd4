"""AttentionSpec: the one description of an attention call that passes hand to kernels.

The function every spec describes, for query row i and key column j of one
(batch b, query head h) pair, with kv head ``h // (Hq // Hkv)``:

    s[i, j] = scale * <q[i], k[j]>
    s[i, j] = softcap * tanh(s[i, j] / softcap)             if softcap
    s[i, j] = s[i, j] + bias[b, h, i, j] + mask[b, h, i, j]  (additive terms, see below)
    s[i, j] = fill                                           where a boolean term masks (i, j)
    out[i]  = sum_j softmax_j(s[i, :]) * dropout[i, j] * v[j]

The boolean terms are ``causal``, ``window``, ``key_padding``, ``document`` and a
boolean ``mask``. Causal and window share one diagonal, chosen by ``align``::

    top_left (SDPA's is_causal)          bottom_right (KV cache: the last query
    query i sees keys 0..i               row sees the last key)
                                         query i sees keys 0..i + Nk - Nq
         k0 k1 k2 k3 k4                       k0 k1 k2 k3 k4
    q0    x  .  .  .  .                  q0    x  x  x  .  .
    q1    x  x  .  .  .                  q1    x  x  x  x  .
    q2    x  x  x  .  .                  q2    x  x  x  x  x

With ``window=Window(left, right)`` query i sees keys ``d - left .. d + right``
where ``d = i + offset`` is its diagonal key; causal adds ``right = 0``.

``fill`` says what a row whose keys are all masked produces, because the
model being replaced decided that by its choice of fill value:

* ``Fill.NEG_INF``: masked scores are ``-inf``; such rows are NaN (eager softmax).
* ``Fill.NEG_INF_ADDED``: the same forward, from ``-inf`` *added* to the scores
  (an additive ``-inf`` mask); the backward differs: autograd sends such rows'
  NaN gradient through the addition to q and k as well.
* ``Fill.FINITE``: masked scores are a finite minimum such as
  ``torch.finfo(dtype).min``; such rows average every value uniformly.
* ``Fill.FINITE_ADDED``: the same forward, from a finite minimum *added* to
  the scores (an additive ``finfo.min`` mask); the backward differs: autograd
  sends such rows' gradient to q and k as through a uniform softmax.
* ``Fill.SAFE``: ``-inf``, but such rows are 0 (SDPA's safe softmax).
* ``Fill.FINITE_REPLACED_ADDED``: two finite masks of the same ``m = finfo.min``,
  GPT-2's ``where(causal, s, m) + padding``: the band terms (causal, window)
  *replace* the scores they mask by ``m``, then the key padding *adds* ``m``.
  A key masked by one of the two scores ``m``, by both ``m + m = -inf``, so a
  row with no visible key averages v over the keys masked by exactly one, and
  is NaN when both mask every key. Its gradient reaches q and k only through
  the keys the band keeps (``where`` sends none to the scores it replaced).
  Without a band every key is replaced, without key padding none is added (the
  uniform row of ``FINITE``); documents and masks with it are not supported yet.

Rows with at least one visible key are identical under all of them
(kernels/fills.py implements the rows with none, for every kernel).

An additive term of the same half dtype as q is added at that precision, as
eager PyTorch adds a mask to half-precision scores: ``s + finfo(fp16).min``
then saturates to the same value on every masked key, and a row masked
entirely that way averages its values uniformly, exactly as in the original.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import torch


class Fill(str, enum.Enum):
    NEG_INF = "-inf"
    NEG_INF_ADDED = "-inf_added"
    FINITE = "finite"
    FINITE_ADDED = "finite_added"
    SAFE = "safe"
    FINITE_REPLACED_ADDED = "finite_replaced_added"


#: the fills whose rows with no visible key are NaN
NAN_FILLS = (Fill.NEG_INF, Fill.NEG_INF_ADDED)


class Align(str, enum.Enum):
    TOP_LEFT = "top_left"
    BOTTOM_RIGHT = "bottom_right"


@dataclass(frozen=True)
class Window:
    """Keys ``d - left .. d + right`` around the diagonal key ``d``; ``None`` is unbounded."""

    left: int | None
    right: int | None

    def __post_init__(self):
        for name in ("left", "right"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"window {name}={value!r} is not allowed: use a non-negative int, or None for no bound"
                )


MASK_TERM_NAMES = ("causal", "window", "key_padding", "document", "bias", "dense", "softcap")


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Shapes, dtypes, scale and mask terms of one attention call.

    Tensor-valued terms (``key_padding``, ``q_doc``/``kv_doc``, ``bias``, ``mask``)
    may be real or fake tensors: planning needs only their metadata.

    * ``key_padding``: bool ``[B, Nk]`` (True = keep) or integer ``[B]`` valid lengths.
    * ``q_doc``/``kv_doc``: integer document ids ``[B or 1, Nq]`` / ``[B or 1, Nk]``;
      a query sees only keys of its own document (block-diagonal attention).
    * ``bias``: additive float tensor broadcastable to ``[B, Hq, Nq, Nk]``.
    * ``mask``: bool (True = keep) or additive float, broadcastable likewise.
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    causal: bool = False
    align: Align = Align.TOP_LEFT
    window: Window | None = None
    key_padding: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    kv_doc: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    fill: Fill = Fill.NEG_INF
    requires_grad: bool = False

    @staticmethod
    def from_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **terms) -> AttentionSpec:
        """Spec for q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]``."""
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, kv_len, v_head_dim = k.shape[1], k.shape[2], v.shape[3]
        if terms.get("scale") is None:
            terms["scale"] = 1.0 / math.sqrt(head_dim)
        if "requires_grad" not in terms:
            terms["requires_grad"] = any(
                t is not None and t.requires_grad for t in (q, k, v, terms.get("bias"), terms.get("mask"))
            )
        return AttentionSpec(
            batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
            head_dim=head_dim, v_head_dim=v_head_dim, dtype=q.dtype, device=q.device, **terms,
        )

    def with_(self, **changes) -> AttentionSpec:
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency between shapes and terms."""
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"q has {self.q_heads} heads and k/v have {self.kv_heads}: the query head count must be a "
                "multiple of the key/value head count (grouped-query attention)"
            )
        if not 0.0 <= self.dropout_p <= 1.0:
            raise ValueError(f"dropout_p={self.dropout_p} must be in [0, 1]")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap={self.softcap} must be positive, or None for no cap")
        full = (self.batch, self.q_heads, self.q_len, self.kv_len)
        for name in ("bias", "mask"):
            term = getattr(self, name)
            if term is None:
                continue
            if term.dim() > 4 or any(
                t not in (1, f) for t, f in zip(term.shape[::-1], full[::-1])
            ):
                raise ValueError(
                    f"{name} of shape {tuple(term.shape)} does not broadcast to [B, Hq, Nq, Nk] = {full}"
                )
            if name == "bias" and not term.is_floating_point():
                raise TypeError(f"bias must be a floating tensor, got {term.dtype}")
        if self.key_padding is not None:
            kp = self.key_padding
            want = (self.batch, self.kv_len) if kp.dtype == torch.bool else (self.batch,)
            if tuple(kp.shape) != want or kp.is_floating_point():
                raise ValueError(
                    f"key_padding_mask of shape {tuple(kp.shape)} and dtype {kp.dtype} is not allowed: give a "
                    f"bool [B, Nk] = [{self.batch}, {self.kv_len}] mask (True = keep) or integer lengths "
                    f"[B] = [{self.batch}]"
                )
        if (self.q_doc is None) != (self.kv_doc is None):
            raise ValueError("document ids need both q_doc and kv_doc (pass the same tensor twice for self-attention)")
        if self.fill == Fill.FINITE_REPLACED_ADDED and any(t is not None for t in (self.q_doc, self.bias, self.mask)):
            raise ValueError("fill='finite_replaced_added' (a band replaced by finfo.min, then key padding added) "
                             "takes a band and key padding only: use fill='finite' or 'finite_added' with "
                             "documents, a bias or a mask")
        if self.q_doc is not None:
            for name, length in (("q_doc", self.q_len), ("kv_doc", self.kv_len)):
                ids = getattr(self, name)
                if ids.dim() != 2 or ids.shape[0] not in (1, self.batch) or ids.shape[1] != length:
                    raise ValueError(
                        f"{name} of shape {tuple(ids.shape)} must be [B or 1, {length}] integer document ids"
                    )

    # ----------------------------------------------------------- derived facts
    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def diagonal_offset(self) -> int:
        """Key index on query 0's diagonal: 0 top-left, ``Nk - Nq`` bottom-right."""
        return 0 if self.align == Align.TOP_LEFT else self.kv_len - self.q_len

    def band(self) -> tuple[int | None, int | None]:
        """Bounds ``(lo, hi)`` on ``j - i - offset`` from causal and window; None = unbounded."""
        return band_bounds(self.causal, self.window)

    def rows_may_be_empty(self, *, additive: bool = True) -> bool:
        """False when the terms prove every query row sees at least one key (no fill is then needed).

        With ``additive=False`` only the boolean terms count; an additive term can also mask a
        whole row, with ``-inf``, since its values are data.
        """
        if self.kv_len == 0 or self.key_padding is not None:
            return True
        if self.q_doc is not None and not self._own_document_visible():
            return True
        if self.mask is not None and (additive or self.mask.dtype == torch.bool):
            return True
        if additive and self.bias is not None:
            return True
        lo, hi = self.band()
        off = self.diagonal_offset
        # row i sees keys max(0, i + off + lo) .. min(Nk - 1, i + off + hi): rows 0 and Nq - 1 are the extremes
        first_row_empty = hi is not None and off + hi < 0
        last_row_empty = lo is not None and self.q_len - 1 + off + lo > self.kv_len - 1
        return first_row_empty or last_row_empty

    def rows_need_fill(self) -> bool:
        """Whether rows with no visible key may exist and get a value of their own (their fill is not SAFE's 0, which
        the kernels give such rows): only then does a kernel look for them and patch their output and gradients."""
        return self.fill != Fill.SAFE and self.rows_may_be_empty()

    def _own_document_visible(self) -> bool:
        """Self-attention over documents where every query sees its own key: the query and key ids are the same
        memory (two views of one id tensor, as a packed model's ``ids[:, :, None] == ids[:, None, :]`` gives
        them), so query i and key i share a document, and the band keeps the diagonal. Read from this call's
        tensors (their addresses and layouts, no values), so it holds for the call whose spec this is."""
        if not same_memory(self.q_doc, self.kv_doc):
            return False
        lo, hi = self.band()
        diagonal = -self.diagonal_offset  # j - i - offset at j = i
        return (lo is None or lo <= diagonal) and (hi is None or diagonal <= hi)

    def band_hides_nothing(self) -> bool:
        """Whether causal and window leave every key visible to every row (a decode step's one query row
        under bottom-right causal): they then mask nothing, and a kernel may drop them."""
        lo, hi = self.band()
        if self.q_len == 0 or self.kv_len == 0:
            return lo is None and hi is None
        # row i sees keys i + off + lo .. i + off + hi: row 0 must reach the last key, the last row key 0
        off = self.diagonal_offset
        reaches_last = hi is None or off + hi >= self.kv_len - 1
        reaches_first = lo is None or self.q_len - 1 + off + lo <= 0
        return reaches_last and reaches_first

    @property
    def visible_fraction(self) -> float:
        """Fraction of the score matrix the band terms leave visible (1.0 without a band), for cost models."""
        lo, hi = self.band()
        if lo is None and hi is None:
            return 1.0
        n_q, n_k, off = self.q_len, self.kv_len, self.diagonal_offset
        lo = -n_k - n_q if lo is None else lo
        hi = n_k + n_q if hi is None else hi
        # keys j with max(0, i+off+lo) <= j <= min(n_k-1, i+off+hi), summed over rows
        rows = torch.arange(n_q, dtype=torch.float64)
        first = torch.clamp(rows + off + lo, min=0)
        last = torch.clamp(rows + off + hi, max=n_k - 1)
        visible = torch.clamp(last - first + 1, min=0).sum().item()
        return max(visible / (n_q * n_k), 1e-6)

    @property
    def mask_terms(self) -> tuple[str, ...]:
        present = {
            "causal": self.causal,
            "window": self.window is not None,
            "key_padding": self.key_padding is not None,
            "document": self.q_doc is not None,
            "bias": self.bias is not None,
            "dense": self.mask is not None,
            "softcap": self.softcap is not None,
        }
        return tuple(name for name in MASK_TERM_NAMES if present[name])

    @property
    def has_boolean_mask(self) -> bool:
        bool_mask = self.mask is not None and self.mask.dtype == torch.bool
        return self.causal or self.window is not None or self.key_padding is not None or (
            self.q_doc is not None
        ) or bool_mask

    def signature(self) -> tuple:
        """Hashable description without tensor values: for caches and planning."""

        def meta(t):
            return None if t is None else (tuple(t.shape), str(t.dtype))

        return (
            self.batch, self.q_heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim,
            self.v_head_dim, str(self.dtype), self.device.type, self.causal, self.align.value,
            self.window, meta(self.key_padding), meta(self.q_doc), meta(self.bias), meta(self.mask),
            self.softcap, self.dropout_p, self.fill.value, self.requires_grad,
        )

    # --------------------------------------------------------- materialization
    def keep_tile(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        """Boolean keep mask of the boolean terms on rows ``q0:q1`` and keys ``k0:k1``.

        Shape broadcastable to ``[B, Hq, q1 - q0, k1 - k0]``; ``None`` when nothing is masked.
        """
        device = self.device
        keep = None

        def conj(term):
            nonlocal keep
            keep = term if keep is None else keep & term

        lo, hi = self.band()
        if lo is not None or hi is not None:
            rows = torch.arange(q0, q1, device=device)[:, None] + self.diagonal_offset
            cols = torch.arange(k0, k1, device=device)[None, :]
            conj(band_keep(cols - rows, lo, hi)[None, None])  # [q, k]
        if self.key_padding is not None:
            conj(key_padding_keep(self.key_padding, self.kv_len)[:, k0:k1][:, None, None, :])
        if self.q_doc is not None:
            q_ids = self.q_doc[:, q0:q1]
            kv_ids = self.kv_doc[:, k0:k1]
            conj((q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
        if self.mask is not None and self.mask.dtype == torch.bool:
            conj(_tile(self.mask, q0, q1, k0, k1))
        return keep

    def additive_tiles(self, q0: int, q1: int, k0: int, k1: int) -> list[torch.Tensor]:
        """The additive terms (bias, float mask) sliced to the tile, in the order they are added."""
        return [
            _tile(term, q0, q1, k0, k1)
            for term in (self.bias, self.mask)
            if term is not None and term.dtype != torch.bool
        ]

    def materialize(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Dense ``(keep, additive terms)`` over the whole call: the oracle for tests."""
        return (
            self.keep_tile(0, self.q_len, 0, self.kv_len),
            self.additive_tiles(0, self.q_len, 0, self.kv_len),
        )


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` read the same elements: one address, dtype, shape and (over dims longer than 1)
    strides. Tensors without memory of their own (meta, fake, other subclasses) never qualify."""
    if a is b:
        return type(a) is torch.Tensor and a.device.type != "meta"
    if type(a) is not torch.Tensor or type(b) is not torch.Tensor or a.device.type == "meta" or a.device != b.device:
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.numel() == 0 or a.data_ptr() != b.data_ptr():
        return False
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def kept_scale(dropout_p: float) -> float:
    """What dropout multiplies a kept probability by: ``1 / (1 - p)``; at ``p = 1`` nothing is kept, and the 0 it
    returns makes every multiplier 0, as ``F.dropout(x, 1.0)`` gives ``x * 0``."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def band_bounds(causal: bool, window: Window | None) -> tuple[int | None, int | None]:
    """Bounds ``(lo, hi)`` on ``j - i - offset`` kept by a causal flag and a window; None = unbounded."""
    lo = hi = None
    if window is not None:
        lo = None if window.left is None else -window.left
        hi = window.right
    if causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def band_keep(rel: torch.Tensor, lo: int | None, hi: int | None) -> torch.Tensor:
    """Bool: key offsets ``rel = j - i - offset`` within the band ``lo .. hi`` (None: unbounded)."""
    band = torch.ones_like(rel, dtype=torch.bool)
    if lo is not None:
        band &= rel >= lo
    if hi is not None:
        band &= rel <= hi
    return band


def with_fields(spec: AttentionSpec, **fields) -> AttentionSpec:
    """``spec`` with ``fields`` replaced, copied field by field: no dataclass construction, no validation (for a
    call's terms, or shapes, that a checked template already vouched for)."""
    new = object.__new__(AttentionSpec)
    new.__dict__.update(spec.__dict__)
    new.__dict__.update(fields)
    return new


def key_padding_keep(key_padding: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Bool ``[B, Nk]`` keep mask from a bool mask or from integer lengths ``[B]``."""
    if key_padding.dtype == torch.bool:
        return key_padding
    cols = torch.arange(kv_len, device=key_padding.device)
    return cols[None, :] < key_padding[:, None]


def _tile(term: torch.Tensor, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
    """Slice a term broadcastable to ``[B, H, Nq, Nk]`` to a tile, keeping broadcast dims."""
    while term.dim() < 4:
        term = term[None]
    rows = slice(None) if term.shape[2] == 1 else slice(q0, q1)
    cols = slice(None) if term.shape[3] == 1 else slice(k0, k1)
    return term[:, :, rows, cols]
