"""Index masks over symbolic shapes: ``arange`` comparisons read as bands without evaluating them.

When dynamo captures a graph with dynamic shapes, a causal mask built as
``arange(n)[None, :] <= arange(n)[:, None]`` has a symbolic size and cannot be
evaluated for one length. This module reads such a mask as algebra instead:
each ``arange``-derived tensor is an affine function of its positions,
``c + sum_d a_d x_d`` (``c`` may be symbolic, e.g. a cache offset), and a
comparison of two of them over the score's (query ``i``, key ``j``) positions is
a band ``lo <= j - i <= hi``. Anything outside this small vocabulary is not a
band, and the mask stays dense (exact either way).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .graph import arg, kind

_COMPARISONS = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
                torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt"}


_METHOD_COMPARISONS = {"__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt",
                       "le": "le", "lt": "lt", "ge": "ge", "gt": "gt"}


@dataclass(frozen=True)
class Affine:
    """``offset + sum(coeffs[d] * x_d)`` over a tensor's positions ``x_d`` (dims right-aligned)."""

    coeffs: tuple[int, ...]  # one per dim
    offset: object  # int or SymInt

    def align(self, rank: int) -> tuple[int, ...]:
        return (0,) * (rank - len(self.coeffs)) + self.coeffs


def affine(node) -> Affine | None:
    """The affine form of an arange-derived index tensor, or None."""
    if not isinstance(node, Node):
        return None
    k = kind(node)
    if node.op == "call_function" and node.target is torch.arange:
        return _arange(node)
    if k in ("add", "sub") and len(node.args) == 2 and not node.kwargs:
        base, shift = node.args
        if _scalar(shift) is None:
            return None
        inner = affine(base)
        if inner is None:
            return None
        delta = _scalar(shift) if k == "add" else -_scalar(shift)
        return Affine(inner.coeffs, inner.offset + delta)
    if k == "cast" and _keeps_exact_integers(node):
        return affine(node.args[0])  # a device move, or a cast that keeps every index exact
    if k == "getitem":
        inner = affine(node.args[0])
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if inner is None or any(i is not None and i != slice(None) for i in index):
            return None
        coeffs, source = [], list(inner.coeffs)
        for i in index:
            coeffs.append(0 if i is None else source.pop(0))
        return Affine(tuple(coeffs + source), inner.offset)
    if k == "unsqueeze":
        inner = affine(node.args[0])
        dim = arg(node, 1, "dim")
        if inner is None or not isinstance(dim, int):
            return None
        coeffs = list(inner.coeffs)
        coeffs.insert(dim % (len(coeffs) + 1), 0)
        return Affine(tuple(coeffs), inner.offset)
    return None


def _arange(node: Node) -> Affine | None:
    """``torch.arange(end)`` / ``(start, end)`` / ``(start, end, step)`` in an integer dtype."""
    names = ("start", "end", "step")
    args = list(node.args)
    if len(args) == 1:
        args = [0, args[0]]
    bound = dict(zip(names, args))
    for key, value in node.kwargs.items():
        if key in names:
            bound[key] = value
        elif key == "dtype":
            if value is not None and (value.is_floating_point or value.is_complex):
                return None  # float positions round (bfloat16 above 256)
        elif key not in ("device", "layout", "pin_memory", "requires_grad"):
            return None
    if "end" not in bound:
        return None
    start, step = _scalar(bound.get("start", 0)), bound.get("step", 1)
    meta = node.meta.get("example_value")
    if start is None or not isinstance(step, int) or isinstance(step, bool) or step == 0:
        return None
    if isinstance(meta, torch.Tensor) and meta.dtype.is_floating_point:
        return None
    return Affine((step,), start)


def _keeps_exact_integers(node: Node) -> bool:
    """Whether a cast leaves an integer index tensor's values unchanged (same dtype, or a wider integer)."""
    before, after = node.args[0].meta.get("example_value"), node.meta.get("example_value")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    if before.dtype.is_floating_point or after.dtype.is_floating_point or after.dtype == torch.bool:
        return False
    return after.dtype.itemsize >= before.dtype.itemsize


def band_of_comparison(node: Node, negated: bool, rank: int) -> tuple[object, object] | None:
    """``(lo, hi)`` bounds on ``j - i`` (None unbounded, possibly symbolic) kept by a comparison atom."""
    if node.op == "call_function":
        op = _COMPARISONS.get(node.target)
    else:  # ``a <= b`` recorded as ``a.__le__(b)`` (torch 2.11), or ``a.le(b)``
        op = _METHOD_COMPARISONS.get(node.target) if node.op == "call_method" else None
    if op is None or len(node.args) != 2:
        return None
    a, b = affine(node.args[0]), affine(node.args[1])
    if a is None or b is None:
        return None
    diff = [x - y for x, y in zip(a.align(rank), b.align(rank))]  # a - b = d_i * i + d_j * j + c
    c = a.offset - b.offset
    if any(diff[:-2]) or (diff[-2], diff[-1]) not in ((-1, 1), (1, -1)):
        return None
    if negated:
        op = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le"}[op]
    if diff[-1] == -1:  # (i - j) + c  op 0  ->  (j - i)  flipped-op  c
        op = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
        bound = c
    else:  # (j - i) + c  op 0  ->  (j - i)  op  -c
        bound = -c
    bound = static_int(bound)
    if bound is None:  # a symbolic offset (a KV cache length): left dense, still exact
        return None
    if op == "le":
        return None, bound
    if op == "lt":
        return None, bound - 1
    if op == "ge":
        return bound, None
    return bound + 1, None


def static_int(x) -> int | None:
    """An int for a constant, or for a symbolic expression that simplifies to one; else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        return x.node.maybe_as_int()
    return None


def _scalar(x):
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, torch.SymInt)):
        return x
    if isinstance(x, Node):
        value = x.meta.get("example_value")
        if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            return value
    return None
