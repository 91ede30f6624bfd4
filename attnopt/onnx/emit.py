"""One attention call as ONNX nodes: the ``Attention`` operator plus what makes it exact.

Both pipelines end here. ``export`` translates ``attnopt::attention`` calls
(through torch.onnx's onnxscript tracer) and ``fuse`` replaces decomposed
attention found in an ONNX graph (building NodeProtos); each hands an
``Emitter`` and the site's terms to ``emit_attention``.

ONNX ``Attention`` (opset 23) differs from AttentionSpec in three places, each
handled here rather than silently changing outputs:

* ``is_causal`` is top-left without a past cache. A bottom-right band
  (``Nk - Nq`` offset) becomes an explicit mask built from ``Range``s unless
  ``Nq == Nk`` is known (the two alignments then agree); sliding windows are
  attributes from opset 25 and an explicit mask below it.
* ONNX Runtime needs a mask whose last two dims are ``[Nq, Nk]``: key padding
  ``[B, 1, 1, Nk]`` is expanded. It also turns a bool mask into an additive one
  on every call, so the mask is handed over as floats (0 / -inf), built once
  from values every site shares (the lengths come from the graph inputs where
  the caller can read them there).
* A query row with no visible key is a zero row in ONNX Runtime (``Fill.SAFE``).
  Under ``Fill.NEG_INF`` the original row is NaN and under ``Fill.FINITE`` the
  mean of the values. A row dies only when the conjunction of all terms hides
  every key, so its "any key visible" bit needs the band: with a causal band
  over key padding it is a running count of kept keys (row i sees a key iff
  one of keys 0..i is kept, and ``is_causal`` stays an attribute), otherwise
  a reduction over the joined mask. Under a finite fill in float32 with no
  band attribute, the mask itself holds one finite value on every key of a
  dead row, so the operator averages the values there and no site patches
  its output (``is_causal`` would hide the keys ahead again, with ONNX
  Runtime's own marker, which zeroes the row). Otherwise dead rows are patched
  with a ``Where`` on that bit. An additive mask whose row is the dtype's
  lowest value on its best keys (``(1 - m) * finfo.min`` on a fully padded
  sequence) averages those keys' values in PyTorch but is a zero row in ONNX
  Runtime: in float32 that value becomes the next one up in the mask, which
  ONNX Runtime averages the same way (in half precision such a row with no
  other term is patched with the mean of all values). A row that ``-inf`` in
  the additive terms hides entirely is NaN under a NaN fill: patched too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import onnx
import torch

from attnopt.kernels.spec import NAN_FILLS, Align, Fill, Window, band_bounds

#: a float32 mask value that scores of any sane size (below 1e31) cannot move: a row holding only it
#: averages the values, as the original's finite fill does. It is one step above the lowest float32,
#: which ONNX Runtime reads as its own "masked" marker and turns such a row into zeros.
AVERAGING_FILL = float(np.nextafter(np.finfo(np.float32).min, np.float32(0)))

#: the first opset with the Attention operator, and the one with window attributes
MIN_OPSET = 23
WINDOW_OPSET = 25

TORCH_TO_ONNX = {
    torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
    torch.bool: onnx.TensorProto.BOOL, torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32,
    torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8, torch.int16: onnx.TensorProto.INT16,
}
ONNX_TO_TORCH = {v: k for k, v in TORCH_TO_ONNX.items()}


class Emitter(Protocol):
    """Adds one ONNX node and returns its (first) output value."""

    def __call__(self, op_type: str, *inputs: Any, **attributes: Any) -> Any: ...

    def constant(self, value: float | int | list, elem_type: int) -> Any: ...


@dataclass(frozen=True)
class Band:
    """The causal / window part of a site, on the diagonal chosen by ``align`` (see AttentionSpec)."""

    causal: bool = False
    window: Window | None = None
    align: Align = Align.TOP_LEFT

    @property
    def present(self) -> bool:
        return self.causal or self.window is not None

    def bounds(self) -> tuple[int | None, int | None]:
        """``(lo, hi)`` on ``j - i - offset``; None is unbounded."""
        return band_bounds(self.causal, self.window)


def emit_attention(
    e: Emitter, q, k, v, *, elem_type: int, q_heads: int, kv_heads: int, v_head_dim: int, opset: int,
    keep: list, additive: list, band: Band, scale: float, softcap: float | None, fill: Fill,
    lengths: tuple | None = None, square: bool = False, keep_by_key: bool = False, heads_merged: bool = False,
    mask_spans_scores: bool = False,
):
    """``Y [B, Hq, Nq, Dv]`` for q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D/Dv]``.

    With ``heads_merged``, q, k and v come as ``[B, N, H * D]`` (the projections' own layout): the
    operator reads the heads with strides, so no transpose is needed on the way in, and the one on the
    way out meets the consumer's inverse transpose, which ONNX Runtime cancels.

    ``keep``: bool values broadcastable to ``[B, Hq, Nq, Nk]`` (True = visible);
    ``additive``: float values of q's type, added in order.
    ``lengths``: 1-D int64 values ``[Nq]`` and ``[Nk]`` (default: read from q and k; a caller that
    reads them from the graph inputs lets every site share the mask built from them);
    ``square``: ``Nq == Nk`` holds for every input (the two band alignments then agree);
    ``keep_by_key``: every ``keep`` term has rank >= 2 and size 1 along the query axis;
    ``mask_spans_scores``: some term already has the trailing dims ``[Nq, Nk]`` (no ``Expand`` needed).
    """
    check_opset(opset)
    if square and band.align == Align.BOTTOM_RIGHT:
        band = Band(causal=band.causal, window=band.window, align=Align.TOP_LEFT)
    if lengths is None:
        axis = 1 if heads_merged else 2
        lengths = (e("Shape", q, start=axis, end=axis + 1), e("Shape", k, start=axis, end=axis + 1))
    # causal over padding that hides whole keys: row i keeps a key iff one of keys 0..i is kept, which
    # a running count over the keys answers with the band left an attribute
    count_alive = (
        fill != Fill.SAFE and bool(keep) and keep_by_key and square and band.causal and band.window is None
        and band.align == Align.TOP_LEFT
    )
    band_as_attributes = (
        band.present and band.align == Align.TOP_LEFT and (band.window is None or opset >= WINDOW_OPSET)
        # a row dies only when all terms together hide every key: the band must then join the mask
        and (fill == Fill.SAFE or (not keep and band.window is None) or count_alive)
    )
    # a finite fill averages the values on a row with no visible key: the mask itself can say so, with
    # one finite value on every key of such a row (-inf on hidden keys elsewhere), where the mask holds
    # the band too (a causal attribute hides the keys ahead again, with ONNX Runtime's own marker)
    fold = (
        fill in (Fill.FINITE, Fill.FINITE_ADDED) and elem_type == onnx.TensorProto.FLOAT and not additive
        and not band_as_attributes
    )
    band_joined = band.present and not band_as_attributes
    rows_can_die = fill != Fill.SAFE and (bool(keep) or band_joined)

    i64 = onnx.TensorProto.INT64
    keep_all = None
    for term in keep:
        keep_all = term if keep_all is None else e("And", keep_all, term)
    alive = None  # [.., Nq or 1, 1]: the row sees a key
    if rows_can_die and count_alive:
        seen = e("CumSum", e("Cast", keep_all, to=onnx.TensorProto.INT32), e.constant(-1, i64))  # [.., 1, Nk]
        alive = e("Greater", e("Unsqueeze", seen, e.constant([-1], i64)), e.constant(0, onnx.TensorProto.INT32))
        alive = e("Squeeze", alive, e.constant([-3], i64))  # [.., Nk, 1], and Nk is Nq
    if band_joined:
        band_keep = _band_mask(e, lengths, band)
        keep_all = band_keep if keep_all is None else e("And", keep_all, band_keep)
    if rows_can_die and alive is None:
        alive = e("ReduceMax", keep_all, e.constant([-1], i64), keepdims=1)
    added = None
    for term in additive:
        added = term if added is None else e("Add", added, term)
    averaged = added is not None and elem_type == onnx.TensorProto.FLOAT
    if averaged:
        # a score plus the lowest float32 rounds to that lowest value, so the original spreads a row whose best
        # keys hold it evenly over those keys (a fully padded row of ``(1 - m) * finfo.min``, also under a band,
        # a bool term or -inf on other keys); ONNX Runtime reads that value as its masked marker and zeroes
        # such a row, and reads the next float up as a plain value, which rounds the same way
        added = e("Where", e("Equal", added, e.constant(_lowest(elem_type), elem_type)),
                  e.constant(AVERAGING_FILL, elem_type), added)
    # ONNX Runtime turns a bool mask into an additive one on every call: built once here, as floats
    mask = added
    if keep_all is not None:
        visible = e.constant(0.0, elem_type) if added is None else added
        hidden = e.constant(-np.inf, elem_type)
        if rows_can_die and fold:
            hidden = e("Where", alive, hidden, e.constant(AVERAGING_FILL, elem_type))
        mask = e("Where", keep_all, visible, hidden)
    if mask is not None and not (mask_spans_scores or band_joined):  # a joined band is [Nq, Nk]
        mask = e("Expand", mask, e("Concat", e.constant([1, 1], i64), *lengths, axis=0))  # [.., Nq, Nk]

    if not scale > 0.0:
        # ONNX's Attention takes a positive scale only: any other is folded into q (a scale of 0 spreads every row
        # evenly, as the original's zero scores do)
        q = e("Mul", q, e.constant(float(scale), elem_type))
        scale = 1.0
    attributes: dict[str, Any] = {"scale": float(scale)}
    if softcap is not None:
        attributes["softcap"] = float(softcap)
    if band_as_attributes:
        lo, hi = band.bounds()
        if band.causal and band.window is None:
            attributes["is_causal"] = 1
        else:
            attributes["left_window_size"] = -1 if lo is None else -lo
            attributes["right_window_size"] = -1 if hi is None else hi
    if heads_merged:
        attributes.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    v_bhsd = v
    if heads_merged:  # the dead-row patch reads v as [B, Hkv, Nk, Dv] (dropped as dead when unused)
        v_bhsd = e("Transpose", _split_heads(e, v, kv_heads, v_head_dim), perm=[0, 2, 1, 3])
    y = e("Attention", *inputs, **attributes)
    if heads_merged:
        y = e("Transpose", _split_heads(e, y, q_heads, v_head_dim), perm=[0, 2, 1, 3])
    v = v_bhsd

    if rows_can_die and not fold:
        y = e("Where", alive, y, _dead_row_value(e, v, fill, elem_type, q_heads, kv_heads, v_head_dim))
    if added is not None and not averaged and keep_all is None:
        # half precision: a row of the lowest value averages every value (the band and -inf keys not counted)
        row_max = e("ReduceMax", added, e.constant([-1], onnx.TensorProto.INT64), keepdims=1)
        lowest = e.constant(_lowest(elem_type), elem_type)
        saturated = e("Equal", row_max, lowest)
        y = e("Where", saturated, _dead_row_value(e, v, Fill.FINITE, elem_type, q_heads, kv_heads, v_head_dim), y)
    if added is not None and fill in NAN_FILLS:
        # a row that -inf in the additive terms hides entirely (alone or with the band and bool terms) is NaN in
        # the original and 0 in ONNX Runtime
        full = mask
        if band_as_attributes:
            full = e("Where", _band_mask(e, lengths, band), full, e.constant(-np.inf, elem_type))
        row_max = e("ReduceMax", full, e.constant([-1], onnx.TensorProto.INT64), keepdims=1)
        y = e("Where", e("Equal", row_max, e.constant(-np.inf, elem_type)), e.constant(np.nan, elem_type), y)
    return y


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the standard operator set ``model`` imports (1 when it names none)."""
    return next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 1)


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"opset={opset!r} has no Attention operator: it was added in opset {MIN_OPSET} "
            f"(sliding-window attributes in {WINDOW_OPSET}); pass opset={MIN_OPSET} or higher"
        )


def _lowest(elem_type: int) -> float:
    dtype = ONNX_TO_TORCH[elem_type]
    return float(torch.finfo(dtype).min)


def _split_heads(e: Emitter, x, heads: int, head_dim: int):
    """``[B, N, H * D]`` as ``[B, N, H, D]``."""
    return e("Reshape", x, e.constant([0, 0, heads, head_dim], onnx.TensorProto.INT64))


def _band_mask(e: Emitter, lengths: tuple, band: Band):
    """Bool ``[Nq, Nk]``: ``lo <= j - i - offset <= hi``, offset 0 (top-left) or ``Nk - Nq``."""
    i64 = onnx.TensorProto.INT64
    nq, nk = (e("Squeeze", n, e.constant([0], i64)) for n in lengths)
    zero, one = e.constant(0, i64), e.constant(1, i64)
    rows = e("Range", zero, nq, one)
    if band.align == Align.BOTTOM_RIGHT:
        rows = e("Add", rows, e("Sub", nk, nq))
    cols = e("Range", zero, nk, one)
    rel = e("Sub", e("Unsqueeze", cols, e.constant([0], i64)), e("Unsqueeze", rows, e.constant([1], i64)))
    lo, hi = band.bounds()
    keep = None
    if lo is not None:
        keep = e("GreaterOrEqual", rel, e.constant(lo, i64))
    if hi is not None:
        upper = e("LessOrEqual", rel, e.constant(hi, i64))
        keep = upper if keep is None else e("And", keep, upper)
    return keep


def _dead_row_value(e: Emitter, v, fill: Fill, elem_type: int, q_heads: int, kv_heads: int, v_head_dim: int):
    """What a row with no visible key holds in the original: NaN, or the mean of the values."""
    if fill in NAN_FILLS:
        return e.constant(np.nan, elem_type)
    assert fill in (Fill.FINITE, Fill.FINITE_ADDED), fill  # both average the values on such rows
    i64 = onnx.TensorProto.INT64
    mean = e("ReduceMean", v, e.constant([2], i64), keepdims=1)  # [B, Hkv, 1, Dv]
    group = q_heads // kv_heads
    if group == 1:
        return mean
    mean = e("Unsqueeze", mean, e.constant([2], i64))  # [B, Hkv, 1, 1, Dv]
    mean = e("Expand", mean, e.constant([1, 1, group, 1, 1], i64))
    return e("Reshape", mean, e.constant([0, q_heads, 1, v_head_dim], i64))  # [B, Hq, 1, Dv]


# ----------------------------------------------------------------- emitters
class NodeEmitter:
    """Builds NodeProtos with fresh value names (the ``fuse`` pipeline).

    Emitters given one ``shared`` dict build each distinct node once: a second site asking for the same
    op on the same values (the mask of every layer, its row-alive bits) gets the first one's output.
    """

    def __init__(self, prefix: str, taken: Callable[[str], bool], shared: dict[bytes, str] | None = None):
        self.prefix, self.taken = prefix, taken
        self.nodes: list[onnx.NodeProto] = []
        self.shared = {} if shared is None else shared
        self._count = 0

    def fresh(self) -> str:
        while True:
            self._count += 1
            name = f"{self.prefix}/{self._count}"
            if not self.taken(name):
                return name

    def __call__(self, op_type: str, *inputs, domain: str = "", **attributes):
        names = [("" if x is None else x) for x in inputs]
        node = onnx.helper.make_node(op_type, names, [""], domain=domain or None, **attributes)
        key = node.SerializeToString()
        if key in self.shared:
            return self.shared[key]
        node.output[0] = node.name = self.fresh()
        self.nodes.append(node)
        self.shared[key] = node.output[0]
        return node.output[0]

    def constant(self, value, elem_type: int):
        dims = [len(value)] if isinstance(value, list) else []
        values = value if isinstance(value, list) else [value]
        tensor = onnx.helper.make_tensor("value", elem_type, dims, values)
        return self("Constant", value=tensor)


class ScriptEmitter:
    """Calls an onnxscript opset under torch.onnx's tracer (the ``export`` pipeline)."""

    def __init__(self, opset: int):
        import onnxscript

        self.op = onnxscript.values.Opset("", opset)

    def __call__(self, op_type: str, *inputs, **attributes):
        out = getattr(self.op, op_type)(*inputs, **attributes)
        return out[0] if isinstance(out, (tuple, list)) else out

    def constant(self, value, elem_type: int):
        dims = [len(value)] if isinstance(value, list) else []
        values = value if isinstance(value, list) else [value]
        return self.op.Constant(value=onnx.helper.make_tensor("value", elem_type, dims, values))
