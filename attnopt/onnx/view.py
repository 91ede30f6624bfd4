"""An ONNX graph seen as the FX graph that ``passes/detect.py`` already understands.

``import_onnx`` builds one FX node per ONNX node, spelled the way dynamo
spells the same op (``MatMul`` -> ``operator.matmul``, ``Transpose`` ->
``x.permute(*perm)``, ``Softmax`` -> ``F.softmax(x, dim=axis)``, ``Reshape`` ->
``x.reshape(*shape)``, ...), so detection, GQA folding and the mask algebra
run unchanged on it. Every node carries ``meta["example_value"]``: a fake
tensor of the shape and dtype the value has when the graph runs on example
inputs (symbolic dims get distinct sizes), found by ONNX's reference
evaluator.

Constants: initializers, ``Constant`` nodes and everything computed only from
them (or from shapes that the model declares static) become ``get_attr``
buffers of the view's module, and one-element constants used in arithmetic
become Python numbers, as dynamo folds them. A value computed from a dynamic
dim stays a graph node, so a mask built from it is kept as a dense mask
rather than proven causal at one length.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule, Node

from .emit import ONNX_TO_TORCH
from .shapes import SymbolicShapes

#: sizes for symbolic dims: the batch dim, then distinct sizes so that unrelated dims never coincide
BATCH_HINT = 2
DIM_HINTS = (7, 11, 13, 17, 19, 23)

_BINARY = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
    "And": torch.logical_and, "Or": torch.logical_or, "Equal": operator.eq, "Less": operator.lt,
    "LessOrEqual": operator.le, "Greater": operator.gt, "GreaterOrEqual": operator.ge,
}
_UNARY = {"Not": torch.logical_not, "Tanh": torch.tanh, "IsNaN": torch.isnan}
_PASS_THROUGH = ("Identity", "Dropout")  # Dropout without training_mode is the identity in inference


class Opaque:
    """The target of an ONNX op the passes do not model: named for the op, never evaluated."""

    def __init__(self, op_type: str):
        self.__name__ = f"onnx_{op_type}"

    def __call__(self, *args):
        raise NotImplementedError(f"{self.__name__} is not evaluated in the FX view of an ONNX graph")


@dataclass
class OnnxView:
    model: onnx.ModelProto
    gm: GraphModule | None  # set once the graph is built
    onnx_name: dict[Node, str] = field(default_factory=dict)  # FX node -> ONNX value it mirrors
    node_of: dict[str, onnx.NodeProto] = field(default_factory=dict)  # ONNX value -> its producer
    dtypes: dict[str, int] = field(default_factory=dict)  # ONNX value -> element type
    dim_sources: dict = field(default_factory=dict)  # symbol of an input dim -> (graph input, axis)


def import_onnx(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> OnnxView:
    """The FX view of ``model``'s main graph; ``dims`` sets sizes of symbolic input dims."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    sizes = input_dims(model, dims)
    values = _example_values(model, sizes)
    inits = {t.name for t in graph.initializer}
    static = _static_values(graph)

    root = torch.nn.Module()
    fx = Graph()
    view = OnnxView(model=model, gm=None)
    shapes = SymbolicShapes(model, sizes)
    mode = FakeTensorMode(shape_env=shapes.env)
    for inp in graph.input:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param and inp.name not in inits:
                view.dim_sources.setdefault(shapes.symbols[d.dim_param], (inp.name, axis))
    env: dict[str, Node] = {}
    const: set[str] = set(inits)

    def shape(name: str) -> tuple:
        return shapes.shape(name, tuple(values[name].shape))

    def meta(node: Node, name: str) -> Node:
        value = values.get(name)
        if value is not None:
            with mode:
                node.meta["example_value"] = torch.empty(shape(name), dtype=value.dtype)
        view.onnx_name[node] = name
        return node

    def constant_node(name: str) -> Node:
        if name not in env:
            attr = f"c{len(root._buffers)}"
            root.register_buffer(attr, values[name].clone())
            env[name] = meta(fx.get_attr(attr), name)
        return env[name]

    def number_or_node(name: str):
        value = values[name]
        # a one-element bool stays a tensor: the mask algebra reads masks as tensors (HF's new_ones start)
        if name in const and value.numel() == 1 and value.dtype != torch.bool:
            return value.reshape(()).item()
        return constant_node(name) if name in const else env[name]

    for inp in graph.input:
        if inp.name not in inits:
            env[inp.name] = meta(fx.placeholder(_identifier(inp.name)), inp.name)
    for n in graph.node:
        for out in n.output:
            view.node_of[out] = n
        present = [i for i in n.input if i]
        if n.op_type == "Constant" or all(i in const for i in present):
            const.update(o for o in n.output if o)
            continue
        if n.op_type == "Shape" and n.input[0] in static:
            const.add(n.output[0])
            continue
        if n.op_type in _PASS_THROUGH:
            env[n.output[0]] = number_or_node(n.input[0]) if n.input[0] in const else env[n.input[0]]
            continue
        args = [number_or_node(i) if i else None for i in n.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        out_name = n.output[0]
        if n.op_type in _BINARY and _always_true(n.op_type, args):
            # ``position >= 0`` (HF's vmapped masks): true everywhere, the way the algebra reads new_ones
            node = fx.call_method("new_ones", (args[0], tuple(values[out_name].shape)), {"dtype": torch.bool})
        elif n.op_type in _BINARY:
            node = fx.call_function(_BINARY[n.op_type], tuple(args[:2]))
        elif n.op_type in _UNARY:
            node = fx.call_function(_UNARY[n.op_type], (args[0],))
        elif n.op_type == "MatMul":
            node = fx.call_function(operator.matmul, tuple(args))
        elif n.op_type == "Softmax":
            node = fx.call_function(F.softmax, (args[0],), {"dim": attrs.get("axis", -1)})
        elif n.op_type == "Transpose":
            perm = attrs.get("perm", list(range(len(values[out_name].shape)))[::-1])
            node = fx.call_method("permute", (args[0], *perm))
        elif n.op_type == "Where":
            node = fx.call_function(torch.where, tuple(args))
        elif n.op_type == "Cast":
            node = fx.call_method("to", (args[0], ONNX_TO_TORCH.get(attrs["to"], torch.float32)))
        elif n.op_type in ("Reshape", "Expand") and isinstance(args[0], Node):
            method = "reshape" if n.op_type == "Reshape" else "expand"
            node = fx.call_method(method, (args[0], *values[out_name].shape))
        elif n.op_type == "Range" and _integer_steps(args, values[out_name]):
            # positions 0..n-1 of a symbolic length: the mask algebra reads comparisons of them as bands
            node = fx.call_function(torch.arange, tuple(args))
        elif n.op_type == "Unsqueeze" and isinstance(args[0], Node) and n.input[1] in const:
            node = args[0]
            rank = len(values[out_name].shape)
            for axis in sorted(int(a) % rank for a in values[n.input[1]].reshape(-1).tolist()):
                node = fx.call_method("unsqueeze", (node, axis))
                with mode:
                    unsqueezed = list(node.args[0].meta["example_value"].shape)
                    unsqueezed.insert(axis, 1)
                    node.meta["example_value"] = torch.empty(unsqueezed, dtype=values[out_name].dtype)
        elif n.op_type == "Einsum" and len(args) == 2:
            node = fx.call_function(torch.einsum, (attrs["equation"].decode(), *args))
        else:
            for index, out in enumerate(o for o in n.output if o):
                env[out] = meta(fx.call_function(Opaque(f"{n.op_type}_{index}"), tuple(args)), out)
            continue
        env[out_name] = meta(node, out_name)

    outputs = [number_or_node(o.name) if o.name in const else env[o.name] for o in graph.output]
    fx.output(tuple(outputs))
    view.gm = GraphModule(root, fx)
    view.dtypes = {vi.name: vi.type.tensor_type.elem_type
                   for vi in (*graph.input, *graph.value_info, *graph.output)}
    view.dtypes.update({t.name: t.data_type for t in graph.initializer})
    return view


def _always_true(op_type: str, args: list) -> bool:
    """``x >= c`` / ``x > c`` where ``x`` holds positions of an increasing ``Range`` that starts above ``c``."""
    if op_type not in ("GreaterOrEqual", "Greater") or isinstance(args[1], (bool, Node)):
        return False
    start = _range_start(args[0])
    return start is not None and (start >= args[1] if op_type == "GreaterOrEqual" else start > args[1])


def _range_start(node) -> int | None:
    """The smallest value of a tensor that only rearranges an increasing integer ``Range``'s values."""
    while isinstance(node, Node) and node.op == "call_method" and node.target in ("unsqueeze", "reshape", "expand"):
        node = node.args[0]
    if isinstance(node, Node) and node.op == "call_function" and node.target is torch.arange and node.args[2] > 0:
        return node.args[0]
    return None


def _integer_steps(args: list, value: torch.Tensor) -> bool:
    """``Range(start, limit, delta)`` with constant integer start and delta, producing integers."""
    start, _, delta = args
    return (
        not value.is_floating_point() and isinstance(start, int) and isinstance(delta, int)
        and not isinstance(start, bool) and delta != 0
    )


def input_dims(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict[str, int]:
    """A size for every symbolic input dim: ``dims`` where given, else distinct hints."""
    sizes = dict(dims or {})
    hints = iter(DIM_HINTS)
    for inp in model.graph.input:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param and d.dim_param not in sizes:
                sizes[d.dim_param] = BATCH_HINT if axis == 0 else next(hints)
    return sizes


def _example_values(model: onnx.ModelProto, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every value of the graph on random inputs of the given sizes (ONNX Runtime, all values as outputs)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tt.shape.dim]
        np_type = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(np_type, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(np_type)
        else:  # ids and 0/1 masks
            feeds[inp.name] = np.ones(shape, dtype=np_type)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    typed = {vi.name: vi for vi in (*model.graph.value_info, *model.graph.output)}
    declared = {o.name for o in model.graph.output}
    for n in model.graph.node:
        for out in n.output:
            if out in typed and out not in declared:
                probe.graph.output.append(typed[out])
    names = [o.name for o in probe.graph.output]
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = {name: _tensor(v) for name, v in zip(names, sess.run(names, feeds))}
    values.update({name: _tensor(v) for name, v in feeds.items()})
    for t in model.graph.initializer:
        values.setdefault(t.name, _tensor(onnx.numpy_helper.to_array(t)))
    for n in model.graph.node:  # constants that ONNX Runtime folded away
        if n.op_type == "Constant" and n.output[0] not in values:
            values[n.output[0]] = _tensor(onnx.numpy_helper.to_array(n.attribute[0].t))
    return values


def _tensor(value) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).astype(np.int32)).to(torch.int16).view(torch.bfloat16)
    # initializers come back as read-only views of the protobuf's bytes: torch needs its own writable copy
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def _static_values(graph: onnx.GraphProto) -> set[str]:
    """Values whose shape the model declares fully static."""
    return {
        vi.name for vi in (*graph.input, *graph.value_info)
        if vi.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
    }


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"v_{cleaned}"
