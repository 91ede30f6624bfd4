"""One vocabulary for the many spellings of an op in a dynamo FX graph.

Dynamo records ``q @ k`` as ``operator.matmul``, ``torch.matmul(q, k)`` as
``torch.matmul`` and ``q.matmul(k)`` as a ``call_method``; the passes ask
``kind(node)`` instead and get ``"matmul"`` for all three. ``tensor_meta``
reads the shape and dtype dynamo stored on each node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

_FUNCTIONS: dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    torch.softmax: "softmax", F.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.permute: "permute",
    torch.tanh: "tanh",
    F.scaled_dot_product_attention: "sdpa",
    torch.logical_not: "not", operator.invert: "not",
    torch.logical_and: "and", operator.and_: "and",
}

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "bmm", "mul": "mul", "div": "div", "add": "add", "sub": "sub",
    "softmax": "softmax", "masked_fill": "masked_fill", "transpose": "transpose", "permute": "permute",
    "float": "cast", "half": "cast", "bfloat16": "cast", "to": "cast", "type_as": "cast", "type": "cast",
    "tanh": "tanh", "contiguous": "contiguous",
}


def kind(node: Node) -> str | None:
    """The canonical name of what ``node`` computes, or None when the passes do not model it."""
    if node.op == "call_function":
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
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    path = path.replace("._modules['", ".").replace("']", "").replace("['", ".")
    return path or "(top level)"


def constant_value(node: Any) -> float | None:
    """A Python number behind ``node`` (a literal), else None."""
    if isinstance(node, bool):
        return None
    if isinstance(node, (int, float)):
        return float(node)
    return None
