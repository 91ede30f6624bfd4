"""One vocabulary for the many spellings of an op in a dynamo FX graph.

Dynamo records ``q @ k`` as ``operator.matmul``, ``torch.matmul(q, k)`` as
``torch.matmul`` and ``q.matmul(k)`` as a ``call_method``; the passes ask
``kind(node)`` instead and get ``"matmul"`` for all three. ``tensor_meta``
reads the shape and dtype dynamo stored on each node.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

_FUNCTIONS: dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    torch.einsum: "einsum", torch.baddbmm: "baddbmm",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", operator.itruediv: "div",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
    torch.softmax: "softmax", F.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.permute: "permute", torch.swapaxes: "transpose",
    torch.tanh: "tanh",
    F.scaled_dot_product_attention: "sdpa",
    torch.logical_not: "not", operator.invert: "not", torch.bitwise_not: "not",
    torch.logical_and: "and", operator.and_: "and", torch.bitwise_and: "and",
    torch.logical_or: "or", operator.or_: "or", torch.bitwise_or: "or",
    operator.eq: "eq", torch.eq: "eq",
    torch.repeat_interleave: "repeat_interleave", torch.flatten: "flatten", torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze", operator.getitem: "getitem", torch.isnan: "isnan",
    torch._transformer_encoder_layer_fwd: "fused_layer", torch._native_multi_head_attention: "fused_layer",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "baddbmm": "baddbmm",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "add": "add", "add_": "add", "sub": "sub",
    "softmax": "softmax", "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    "transpose": "transpose", "permute": "permute", "swapaxes": "transpose",
    "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "to": "cast", "type_as": "cast",
    "type": "cast", "bool": "cast",
    "tanh": "tanh", "contiguous": "contiguous",
    "logical_not": "not", "bitwise_not": "not", "logical_and": "and", "bitwise_and": "and",
    "logical_or": "or", "bitwise_or": "or", "eq": "eq",
    "expand": "expand", "expand_as": "expand", "view": "reshape", "reshape": "reshape", "flatten": "flatten",
    "repeat_interleave": "repeat_interleave", "unsqueeze": "unsqueeze", "isnan": "isnan",
}


def kind(node: Any) -> str | None:
    """The canonical name of what ``node`` computes, or None when the passes do not model it."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        if node.target is getattr and node.args[1] == "mT":
            return "mT"
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for ``node`` (None for non-tensors and constants)."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def hint(size) -> int:
    """A concrete int for a possibly symbolic size (its example value)."""
    if isinstance(size, int):
        return size
    return int(size.node.hint)


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    return None if meta is None else tuple(hint(s) for s in meta.shape)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_path(node: Node) -> str:
    """The module path that produced ``node`` (``h.0.attn``), or the node's name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "(top level)"
    path = list(stack.values())[-1][0]
    # dynamo spells paths from the traced function's locals: L['self'].h[0] or L['args'][0].model
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])?\.?", "", path)
    path = path.replace("._modules['", ".").replace("']", "").replace("['", ".")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path or "(top level)"


def constant_value(node: Any) -> float | None:
    """A Python number behind ``node`` (a literal), else None."""
    if isinstance(node, bool):
        return None
    if isinstance(node, (int, float)):
        return float(node)
    return None


def is_buffer(node: Node) -> bool:
    """Whether a placeholder is a module buffer that dynamo lifted to a graph input."""
    if node.op == "get_attr":
        return True
    return _lifted(node, "buffers")


def is_parameter(node: Node) -> bool:
    """Whether a placeholder is a module parameter that dynamo lifted to a graph input."""
    return _lifted(node, "parameters")


def _lifted(node: Node, kind_: str) -> bool:
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
    return f"._{kind_}[" in name or f"_{kind_}_" in node.name


class Constants:
    """Evaluates nodes that depend only on constants: literals, aranges, shapes and module buffers.

    Module buffers (a causal ``tril`` buffer, rotary frequencies) count as
    constants: attnopt assumes a model does not rewrite its registered buffers
    between calls. ``inputs`` gives the real values of the graph's placeholders.
    """

    def __init__(self, graph, inputs: dict[Node, torch.Tensor] | None):
        self.graph = graph
        self.inputs = inputs or {}
        self._constant: dict[Node, bool] = {}
        self._values: dict[Node, Any] = {}

    def is_constant(self, node: Any) -> bool:
        if not isinstance(node, Node):
            return not isinstance(node, torch.SymInt)
        if node in self._constant:
            return self._constant[node]
        if node.op == "placeholder":
            result = is_buffer(node) and node in self.inputs
        elif node.op == "get_attr":
            result = True
        elif node.op in ("call_function", "call_method"):
            result = _has_concrete_meta(node) and all(self.is_constant(a) for a in _flat_args(node))
        else:
            result = False
        self._constant[node] = result
        return result

    def value(self, node: Any) -> Any:
        """The concrete value of a constant node (call ``is_constant`` first)."""
        if not isinstance(node, Node):
            return node
        if node not in self._values:
            if node.op == "placeholder":
                self._values[node] = self.inputs[node]
            elif node.op == "get_attr":
                target = self.graph.owning_module
                for part in node.target.split("."):
                    target = getattr(target, part)
                self._values[node] = target
            else:
                args = torch.fx.node.map_arg(node.args, self.value)
                kwargs = torch.fx.node.map_arg(node.kwargs, self.value)
                if node.op == "call_function":
                    self._values[node] = node.target(*args, **kwargs)
                else:
                    self._values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        return self._values[node]

    def number(self, x: Any) -> float | None:
        """A Python number for a literal or a constant one-element tensor, else None."""
        number = constant_value(x)
        if number is not None or not isinstance(x, Node) or not self.is_constant(x):
            return number
        meta = tensor_meta(x)
        if meta is None or meta.numel() != 1:
            return None
        return float(self.value(x).reshape(()).item())


def _flat_args(node: Node) -> list:
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _has_concrete_meta(node: Node) -> bool:
    meta = tensor_meta(node)
    return meta is None or all(isinstance(s, int) for s in meta.shape)
