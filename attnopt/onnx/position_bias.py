"""Relative position biases computed once per offset (T5's bucketed bias) in ONNX graphs.

T5 adds to its scores a bias read from a ``[num_buckets, H]`` table at a bucket of the offset
``d = j - i`` between key ``j`` and query ``i``::

    d = Range(Nk)[None, :] - Range(Nq)[:, None]     # [Nq, Nk] integers
    bucket = f(d)                                   # abs or min/neg, cast, div, log, min, where
    bias = Gather(table, bucket)                    # [Nq, Nk, H]
    bias = Transpose(bias, perm=[2, 0, 1])          # [H, Nq, Nk]

Exported with dynamic sequence lengths, ONNX Runtime evaluates ``f`` on all ``Nq * Nk`` offsets and
gathers ``Nq * Nk`` rows of the table on every call. The grid holds only ``Nq + Nk - 1`` distinct
offsets, and ``f`` is elementwise, so ``rewrite_position_biases``:

1. takes the offsets from the grid's first column, bottom up, then its first row:
   ``D[m] = d[i, j]`` for any ``j - i = m - (Nq - 1)``, computed by the grid's own ``Sub`` on slices
   of its own operands;
2. runs a copy of ``f``'s nodes on ``D``: the same ops on the same values, element by element;
3. gathers the table's rows for those ``Nq + Nk - 1`` buckets once, ``R``;
4. lays ``R`` out as ``bias[i, j] = R[j - i + Nq - 1]`` with bulk copies. ``R`` padded by one row is
   repeated ``Nq`` times; read flat from ``Nq - 1`` in rows one shorter than the period, each row
   starts one offset earlier than the row above, and its first ``Nk`` entries are that query's::

       R padded (L = Nq + Nk):   r0 r1 r2 r3 r4 __              Nq = 3, Nk = 3
       repeated Nq times:        r0 r1 r2 r3 r4 __ r0 r1 r2 r3 r4 __ r0 r1 r2 r3 r4 __
       from Nq - 1, rows of 5:         [r2 r3 r4 __ r0][r1 r2 r3 r4 __][r0 r1 r2 r3 r4]
       first Nk of each row:            r2 r3 r4        r1 r2 r3        r0 r1 r2

   The result replaces the ``Gather``'s output, ``[Nq, Nk, H]``; what reads it is unchanged.

What is proven before a bias is rewritten (anything else is left as it is):

* ``d`` is a ``Sub`` of ``Unsqueeze(Range)`` at axis 1 (the rows) and ``Unsqueeze(Range)`` at axis
  0 (the columns), in either order, both ranges of an integer type with equal constant steps: then
  ``d[i, j] = (start_k - start_q) + (j - i) * step`` exactly (wrapping integer arithmetic agrees
  with itself), a function of ``j - i`` whatever the starts and lengths are at run time;
* every node between ``d`` and the ``Gather``'s indices is elementwise (``ELEMENTWISE``) and reads,
  besides values computed from ``d``, only constants of one element and rank at most 2, or fills
  ``d``'s shape with one constant (``ConstantOfShape(Shape(x))``, ``Expand(c, Shape(x))``): every
  value keeps ``d``'s shape and each element depends on the same element of ``d`` alone;
* the ``Gather`` reads along axis 0 a table whose rank the graph states.

The copies of ``f`` compute each offset's bucket with the same kernels on the same inputs; the tests
compare the bias bit for bit with the original at many lengths, encoder and decoder buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .emit import NodeEmitter, default_opset
from .pack import graph_index

#: ops whose every output element is computed from the same element of each input
ELEMENTWISE = frozenset({
    "Abs", "Neg", "Log", "Exp", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "Identity",
    "Cast", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Clip", "Where",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "And", "Or", "Xor",
})
#: element types whose ``Range`` and ``Sub`` are exact
INTEGER_TYPES = frozenset({onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64})
#: the first opset with ``Shape(start, end)`` (the rewrite reads the lengths with it)
MIN_OPSET = 15
_INT64_MAX, _INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


@dataclass(frozen=True)
class OffsetGrid:
    """``d = Sub(x, y)`` where one operand is ``[Nq, 1]`` (``rows``) and the other ``[1, Nk]`` (``cols``)."""

    sub: onnx.NodeProto
    rows: str
    cols: str


@dataclass(frozen=True)
class BucketBias:
    """A ``Gather`` of a table at a bucket that is an elementwise function of one offset grid."""

    grid: OffsetGrid
    steps: tuple[onnx.NodeProto, ...]  # from the grid to the bucket, in graph order
    gather: onnx.NodeProto
    table_rank: int

    @property
    def output(self) -> str:
        return self.gather.output[0]


def rewrite_position_biases(model: onnx.ModelProto) -> list[str]:
    """Compute, in place, every relative position bias of ``model``'s main graph once per offset.

    Returns the values now computed that way (each keeps its name, so its readers are unchanged).
    The grid-sized nodes that nothing else reads are removed. Graphs below opset 15 are left alone.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model is a {type(model).__name__}, not an onnx.ModelProto: load it with onnx.load first")
    if default_opset(model) < MIN_OPSET:
        return []
    graph = model.graph
    biases = [b for b in find_position_biases(graph).values() if isinstance(b, BucketBias)]
    taken = {o for n in graph.node for o in n.output} | {i for n in graph.node for i in n.input}
    taken |= {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for bias in biases:
        e = NodeEmitter(f"attnopt/position_bias/{bias.output}", taken.__contains__)
        assert _emit(e, bias) == e.nodes[-1].output[0], "the last node emitted computes the bias"
        e.nodes[-1].output[0] = bias.output
        taken.update(o for n in e.nodes for o in n.output)
        nodes = list(graph.node)
        at = next(i for i, n in enumerate(nodes) if bias.output in n.output)
        del graph.node[:]
        graph.node.extend(nodes[:at] + e.nodes + nodes[at + 1:])
        _drop_unread(graph, {n.output[0] for n in (bias.grid.sub, *bias.steps, bias.gather)})
    return [b.output for b in biases]


def find_position_biases(graph: onnx.GraphProto) -> dict[str, BucketBias | str]:
    """Each ``Gather`` of the graph, by its output: the position bias it computes, or why it is not one
    this rewrite can prove."""
    g = _Graph(graph)
    return {n.output[0]: _match(n, g) for n in graph.node if n.op_type == "Gather" and n.output}


def _match(gather: onnx.NodeProto, g: _Graph) -> BucketBias | str:
    """``gather`` as a table read at an elementwise function of an offset grid, or why it is not one."""
    if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") or len(gather.input) != 2:
        return f"{gather.op_type} {gather.name!r} is not a Gather"
    if any(a.name != "axis" for a in gather.attribute) or _attribute(gather, "axis", 0) != 0:
        return f"Gather {gather.name!r} reads along axis {_attribute(gather, 'axis', 0)}, not 0"
    table_rank = g.rank(gather.input[0])
    if table_rank is None or table_rank < 1:
        return f"the graph does not state the rank of the table {gather.input[0]!r}"
    walk = _Walk(g)
    if walk.kind(gather.input[1]) != _GRID:
        return f"its indices are not a function of one offset grid's j - i: {walk.why}"
    if len(walk.grids) != 1:
        return f"its indices read {len(walk.grids)} offset grids, not one"
    order = {n.output[0]: i for i, n in enumerate(g.graph.node) if n.output}
    steps = tuple(sorted(walk.steps.values(), key=lambda n: order[n.output[0]]))
    return BucketBias(grid=next(iter(walk.grids.values())), steps=steps, gather=gather, table_rank=table_rank)


# ----------------------------------------------------------------- matching
_GRID, _SCALAR, _SHAPE = "grid", "scalar", "shape"


class _Graph:
    """Producers, consumers and constants of one graph, by value name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer, _, self.initializers, _ = graph_index(graph)
        self.inputs = {v.name for v in graph.input}
        self.declared = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}

    def constant(self, value: str) -> np.ndarray | None:
        """The value of an initializer (not overridable as an input) or a ``Constant`` node's output."""
        if value in self.initializers and value not in self.inputs:
            return numpy_helper.to_array(self.initializers[value])
        node = self.producer.get(value)
        if node is None or node.op_type != "Constant" or len(node.attribute) != 1:
            return None
        attribute = node.attribute[0]
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_ints", "value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(attribute))
        return None

    def rank(self, value: str) -> int | None:
        const = self.constant(value)
        if const is not None:
            return const.ndim
        declared = self.declared.get(value)
        if declared is not None and declared.HasField("tensor_type") and declared.tensor_type.HasField("shape"):
            return len(declared.tensor_type.shape.dim)
        return None


class _Walk:
    """Classifies the values an index is computed from, walking up from it.

    ``grid``: the offset grid's shape and an elementwise function of it; ``scalar``: a constant of one
    element and rank <= 2; ``shape``: the ``Shape`` of a grid value; None, with the first reason found
    in ``why``, for anything else.
    """

    def __init__(self, g: _Graph):
        self.g = g
        self.kinds: dict[str, str | None] = {}
        self.grids: dict[str, OffsetGrid] = {}  # the grid's value -> the grid
        self.steps: dict[str, onnx.NodeProto] = {}  # grid and shape values -> their producers
        self.why: str | None = None

    def kind(self, value: str) -> str | None:
        if value not in self.kinds:
            self.kinds[value] = None  # a value is never its own input; this only stops a malformed cycle
            self.kinds[value] = self._classify(value)
        return self.kinds[value]

    def _fail(self, why: str) -> None:
        self.why = self.why or why

    def _classify(self, value: str) -> str | None:
        const = self.g.constant(value)
        if const is not None:
            if const.size == 1 and const.ndim <= 2:
                return _SCALAR
            return self._fail(f"{value!r} is a constant of shape {list(const.shape)}, not of one element")
        node = self.g.producer.get(value)
        if node is None:
            return self._fail(f"{value!r} is a graph input")
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return self._fail(f"{value!r} is computed by {node.domain}.{node.op_type}")
        if node.op_type == "Sub" and all(_producer_op(v, self.g) == "Unsqueeze" for v in node.input):
            grid = offset_grid(node, self.g)
            if isinstance(grid, str):
                return self._fail(f"Sub {node.name!r} is not an offset grid: {grid}")
            self.grids[value] = grid
            return _GRID
        kind = self._step_kind(node)
        if kind is not None:
            self.steps[value] = node
        return kind

    def _step_kind(self, node: onnx.NodeProto) -> str | None:
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape":
            if any(a.name != "start" for a in node.attribute) or _attribute(node, "start", 0) != 0:
                return self._fail(f"Shape {node.name!r} reads part of a shape")
            return _SHAPE if self.kind(inputs[0]) == _GRID else self._fail(f"Shape {node.name!r} reads no grid")
        if node.op_type == "ConstantOfShape":
            if node.attribute and int(np.prod(node.attribute[0].t.dims)) != 1:
                return self._fail(f"ConstantOfShape {node.name!r} fills with more than one value")
            return _GRID if self.kind(inputs[0]) == _SHAPE else self._fail(f"{node.name!r} has no grid's shape")
        if node.op_type == "Expand":
            if [self.kind(i) for i in inputs] != [_SCALAR, _SHAPE]:
                return self._fail(f"Expand {node.name!r} is not a one-element constant to a grid's shape")
            return _GRID
        if node.op_type in ELEMENTWISE:
            kinds = [self.kind(i) for i in inputs]
            if None in kinds:
                return None
            if _GRID not in kinds:
                return self._fail(f"{node.op_type} {node.name!r} reads constants alone")
            return _GRID
        return self._fail(f"{node.op_type} {node.name!r} is not an elementwise op")


def offset_grid(sub: onnx.NodeProto, g: _Graph) -> OffsetGrid | str:
    """``sub`` as ``cols - rows`` or ``rows - cols`` of two integer ranges with equal constant steps, or
    why it is not that."""
    if sub.op_type != "Sub" or len(sub.input) != 2:
        return f"{sub.op_type} is not Sub"
    found = [_unsqueezed_range(v, g) for v in sub.input]
    if any(isinstance(f, str) for f in found):
        return next(f for f in found if isinstance(f, str))
    if {axis for axis, _ in found} != {0, 1}:
        return "its operands are not one column [N, 1] and one row [1, N]"
    steps = [g.constant(r.input[2]) for _, r in found]
    if any(s is None or s.size != 1 or onnx.helper.np_dtype_to_tensor_dtype(s.dtype) not in INTEGER_TYPES
           for s in steps):
        return "the ranges' steps are not integer constants"
    if steps[0].dtype != steps[1].dtype or steps[0].item() != steps[1].item():
        return f"the ranges' steps differ ({steps[0].item()} and {steps[1].item()})"
    rows, cols = sub.input if found[0][0] == 1 else reversed(sub.input)
    return OffsetGrid(sub=sub, rows=rows, cols=cols)


def _unsqueezed_range(value: str, g: _Graph) -> tuple[int, onnx.NodeProto] | str:
    """``(axis, range)`` when ``value`` is ``Unsqueeze(range, [axis])`` of a ``Range``: [N, 1] or [1, N]."""
    node = g.producer[value]
    axes = g.constant(node.input[1]) if len(node.input) == 2 else None
    if axes is None or axes.size != 1 or not -2 <= int(axes.item()) <= 1:
        return f"{value!r} is not an Unsqueeze at one constant axis"
    if _producer_op(node.input[0], g) != "Range":
        return f"{value!r} unsqueezes {node.input[0]!r}, which is not computed by Range"
    return int(axes.item()) % 2, g.producer[node.input[0]]


def _producer_op(value: str, g: _Graph) -> str | None:
    node = g.producer.get(value)
    return None if node is None or node.domain not in ("", "ai.onnx") else node.op_type


# ----------------------------------------------------------------- rewriting
def _emit(e: NodeEmitter, bias: BucketBias) -> str:
    """The nodes computing ``bias.output`` from the distinct offsets; returns the last one's output."""
    grid, i64 = bias.grid, onnx.TensorProto.INT64

    def c(values):
        return e.constant(values, i64)

    def sub(rows, cols):  # the grid's own Sub, operands in its order
        return e("Sub", rows, cols) if grid.sub.input[0] == grid.rows else e("Sub", cols, rows)

    flat = c([1, -1])
    up_first_column = sub(e("Slice", grid.rows, c([-1]), c([int(_INT64_MIN)]), c([0]), c([-1])),
                          e("Slice", grid.cols, c([0]), c([1]), c([1])))  # d[Nq-1::-1, :1]: [Nq, 1]
    first_row_rest = sub(e("Slice", grid.rows, c([0]), c([1]), c([0])),
                         e("Slice", grid.cols, c([1]), c([int(_INT64_MAX)]), c([1])))  # d[:1, 1:]: [1, Nk - 1]
    offsets = e("Concat", e("Reshape", up_first_column, flat), e("Reshape", first_row_rest, flat),
                axis=1)  # [1, Nq + Nk - 1]

    renamed = {grid.sub.output[0]: offsets}
    for node in bias.steps:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(i, i) for i in node.input]
        copy.output[0] = copy.name = e.fresh()
        e.nodes.append(copy)
        renamed[node.output[0]] = copy.output[0]
    buckets = e("Reshape", renamed[bias.gather.input[1]], c([-1]))  # [M], M = Nq + Nk - 1
    rows = e("Gather", bias.gather.input[0], buckets, axis=0)  # [M, *rest]
    lengths = (e("Shape", grid.rows, start=0, end=1), e("Shape", grid.cols, start=1, end=2), e("Shape", buckets))
    return _toeplitz(e, rows, bias.table_rank, *lengths)  # [Nq, Nk, *rest]


def _toeplitz(e: NodeEmitter, rows: str, rank: int, nq: str, nk: str, m: str) -> str:
    """``out[i, j] = rows[j - i + Nq - 1]`` (``[Nq, Nk, *rest]``) from ``rows`` (``[M, *rest]``,
    ``M = Nq + Nk - 1``) by the copies drawn in the module's docstring."""
    i64 = onnx.TensorProto.INT64

    def c(values):
        return e.constant(values, i64)

    one, axis0, rest = c([1]), c([0]), e("Shape", rows, start=1)
    padded = e("Pad", rows, c([0] * rank + [1] + [0] * (rank - 1)))  # [L, *rest], L = M + 1
    repeated = e("Expand", e("Unsqueeze", padded, axis0), e("Concat", nq, *[one] * rank, axis=0))  # [Nq, L, *rest]
    flat = e("Reshape", repeated, e("Concat", c([-1]), rest, axis=0))  # [Nq * L, *rest]
    start = e("Sub", nq, one)
    window = e("Slice", flat, start, e("Add", start, e("Mul", nq, m)), axis0)  # [Nq * M, *rest]
    square = e("Reshape", window, e("Concat", nq, m, rest, axis=0), allowzero=1)  # [Nq, M, *rest]
    cut = e("Slice", square, axis0, nk, one)  # [Nq, min(M, Nk), *rest]
    # an empty grid (Nq = 0) has no offsets, so M = 0 there: the shape says Nk
    return e("Reshape", cut, e("Concat", nq, nk, rest, axis=0), allowzero=1)


def _drop_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the nodes whose first output is in ``candidates`` and that nothing reads any more."""
    in_bodies = read_in_bodies(graph)
    while True:
        read = {o.name for o in graph.output} | {i for n in graph.node for i in n.input} | in_bodies
        kept = [n for n in graph.node if n.output[0] not in candidates or any(o in read for o in n.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def read_in_bodies(graph: onnx.GraphProto) -> set[str]:
    """The values read inside the graph's ``If`` / ``Loop`` / ``Scan`` bodies, at any depth."""
    bodies = [b for n in graph.node for a in n.attribute for b in ([a.g] if a.HasField("g") else a.graphs)]
    return {i for b in bodies for n in b.node for i in n.input}.union(*map(read_in_bodies, bodies))


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)
