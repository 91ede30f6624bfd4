"""One attention call as ONNX nodes: the ``Attention`` operator plus what makes it exact.

Both pipelines end here. ``export`` translates ``attnopt::attention`` calls
(through torch.onnx's onnxscript tracer) and ``fuse`` replaces decomposed
attention found in an ONNX graph (building NodeProtos); each hands an
``Emitter`` and the site's terms to ``emit_attention``.

ONNX ``Attention`` (opset 23) differs from AttentionSpec in three places, each
handled here rather than silently changing outputs:

* ``is_causal`` is top-left without a past cache. A bottom-right band
  (``Nk - Nq`` offset) becomes an explicit mask built from ``Range``s; sliding
  windows are attributes from opset 25 and an explicit mask below it.
* ONNX Runtime needs a mask whose last two dims are ``[Nq, Nk]``: key padding
  ``[B, 1, 1, Nk]`` is expanded.
* A query row with no visible key is a zero row in ONNX (``Fill.SAFE``).
  Under ``Fill.NEG_INF`` the original row is NaN and under ``Fill.FINITE`` the
  mean of the values, so those rows are patched with a ``Where`` on the row's
  "any key visible" bit; the band then joins the explicit mask, because a row
  dies only when the conjunction of all terms hides every key. An additive
  mask whose row is the dtype's lowest value everywhere (``(1 - m) *
  finfo.min`` on a fully padded sequence) averages the values in PyTorch but
  is a zero row in ONNX Runtime: patched the same way. (A row mixing that
  lowest value with ``-inf`` is not patched: it averages only its finite keys.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import onnx
import torch

from attnopt.kernels.spec import Align, Fill, Window, band_bounds

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
):
    """``Y [B, Hq, Nq, Dv]`` for q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D/Dv]``.

    ``keep``: bool values broadcastable to ``[B, Hq, Nq, Nk]`` (True = visible);
    ``additive``: float values of q's type, added in order.
    """
    check_opset(opset)
    keep = list(keep)
    band_as_attributes = (
        band.present and band.align == Align.TOP_LEFT and (band.window is None or opset >= WINDOW_OPSET)
        # a row dies only when all terms together hide every key: the band must then join the mask
        and (fill == Fill.SAFE or (not keep and band.window is None))
    )
    if band.present and not band_as_attributes:
        keep.append(_band_mask(e, q, k, band))
    rows_can_die = fill != Fill.SAFE and bool(keep)

    keep_all = None
    for term in keep:
        keep_all = term if keep_all is None else e("And", keep_all, term)
    added = None
    for term in additive:
        added = term if added is None else e("Add", added, term)
    mask = keep_all
    if added is not None:
        mask = added if keep_all is None else e("Where", keep_all, added, e.constant(-np.inf, elem_type))
    if mask is not None:
        mask = e("Expand", mask, _score_shape(e, q, k))

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
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    y = e("Attention", *inputs, **attributes)

    if rows_can_die:
        alive = e("ReduceMax", keep_all, e.constant([-1], onnx.TensorProto.INT64), keepdims=1)  # [.., Nq, 1]
        y = e("Where", alive, y, _dead_row_value(e, v, fill, elem_type, q_heads, kv_heads, v_head_dim))
    if added is not None and keep_all is None:
        row_max = e("ReduceMax", added, e.constant([-1], onnx.TensorProto.INT64), keepdims=1)
        lowest = e.constant(_lowest(elem_type), elem_type)
        saturated = e("Equal", row_max, lowest)
        y = e("Where", saturated, _dead_row_value(e, v, Fill.FINITE, elem_type, q_heads, kv_heads, v_head_dim), y)
    return y


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"opset={opset!r} has no Attention operator: it was added in opset {MIN_OPSET} "
            f"(sliding-window attributes in {WINDOW_OPSET}); pass opset={MIN_OPSET} or higher"
        )


def _lowest(elem_type: int) -> float:
    dtype = ONNX_TO_TORCH[elem_type]
    return float(torch.finfo(dtype).min)


def _dim(e: Emitter, x, axis: int):
    """Scalar int64 size of ``x`` along ``axis``."""
    return e("Squeeze", e("Shape", x, start=axis, end=axis + 1), e.constant([0], onnx.TensorProto.INT64))


def _score_shape(e: Emitter, q, k):
    """``[1, 1, Nq, Nk]``: what a mask is expanded to (ONNX Runtime needs both trailing dims)."""
    return e("Concat", e.constant([1, 1], onnx.TensorProto.INT64), e("Shape", q, start=2, end=3),
             e("Shape", k, start=2, end=3), axis=0)


def _band_mask(e: Emitter, q, k, band: Band):
    """Bool ``[Nq, Nk]``: ``lo <= j - i - offset <= hi``, offset 0 (top-left) or ``Nk - Nq``."""
    i64 = onnx.TensorProto.INT64
    nq, nk = _dim(e, q, 2), _dim(e, k, 2)
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
    if fill == Fill.NEG_INF:
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

    def __call__(self, op_type: str, *inputs, **attributes):
        names = [("" if x is None else x) for x in inputs]
        node = onnx.helper.make_node(op_type, names, [""], **attributes)
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
