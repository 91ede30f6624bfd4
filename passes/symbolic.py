"""Index masks over symbolic shapes: ``arange`` comparisons read as bands without evaluating them.

When dynamo captures a graph with dynamic shapes, a causal mask built as
``arange(n)[None, :] <= arange(n)[:, None]`` has a symbolic size and cannot be
evaluated for one length. This module reads such a mask as algebra instead:
each ``arange``-derived tensor is an affine function of its positions,
``c + sum_d a_d x_d`` (``c`` may be symbolic, e.g. a cache offset), and a
comparison of two of them over the score's (query ``i``, key ``j``) positions is
a band ``lo <= j - i <= hi``. Anything outside this small vocabulary is not a
band, and the mask stays dense (exact either way).

Packed rows compare positions instead of indices: Hugging Face numbers the
documents of a row ``cumsum(diff(pos) != 1)`` and masks ``pos[kv] <= pos[q]``
within them. ``read_of`` and ``document_positions`` name the pieces, so that the
mask algebra can read such a comparison as one of indices where the document
term holds (``band_of_comparison``'s ``leaf``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .graph import ArgumentError, arg, bind, kind

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


def affine(node, leaf=None) -> Affine | None:
    """The affine form of an arange-derived index tensor, or None. ``leaf(node)`` may give the form
    of a node this vocabulary does not know (an Affine, or None)."""
    if not isinstance(node, Node):
        return None
    if leaf is not None and (found := leaf(node)) is not None:
        return found
    k = kind(node)
    if node.op == "call_function" and node.target is torch.arange:
        return _arange(node)
    if k in ("add", "sub") and len(node.args) == 2 and not node.kwargs:
        base, shift = node.args
        if _scalar(shift) is None:
            return None
        inner = affine(base, leaf)
        if inner is None:
            return None
        delta = _scalar(shift) if k == "add" else -_scalar(shift)
        return Affine(inner.coeffs, inner.offset + delta)
    if k == "cast" and _keeps_exact_integers(node):
        return affine(node.args[0], leaf)  # a device move, or a cast that keeps every index exact
    if k == "getitem":
        inner = affine(node.args[0], leaf)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if inner is None or any(i is not None and i != slice(None) for i in index):
            return None
        coeffs, source = [], list(inner.coeffs)
        for i in index:
            coeffs.append(0 if i is None else source.pop(0))
        return Affine(tuple(coeffs + source), inner.offset)
    if k == "unsqueeze":
        inner = affine(node.args[0], leaf)
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


def unshifted(node):
    """``x`` for ``x + c`` / ``x - c`` with scalars ``c`` (any number of them), as ``affine`` reads them."""
    while kind(node) in ("add", "sub") and len(node.args) == 2 and not node.kwargs and _scalar(node.args[1]) is not None:
        node = node.args[0]
    return node


def _keeps_exact_integers(node: Node) -> bool:
    """Whether a cast leaves an integer index tensor's values unchanged (same dtype, or a wider integer)."""
    before, after = node.args[0].meta.get("example_value"), node.meta.get("example_value")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    if before.dtype.is_floating_point or after.dtype.is_floating_point or after.dtype == torch.bool:
        return False
    return after.dtype.itemsize >= before.dtype.itemsize


def _comparison(node: Node) -> str | None:
    """``"le"``, ``"lt"``, ``"ge"`` or ``"gt"`` for a comparison node of two operands, else None."""
    if node.op == "call_function":
        op = _COMPARISONS.get(node.target)
    else:  # ``a <= b`` recorded as ``a.__le__(b)`` (torch 2.11), or ``a.le(b)``
        op = _METHOD_COMPARISONS.get(node.target) if node.op == "call_method" else None
    return op if op is not None and len(node.args) == 2 and not node.kwargs else None


def always_true(node: Node, negated: bool) -> bool:
    """Whether a comparison of index tensors holds at every position, whatever the sizes: ``a - b`` is
    ``c + sum(d_x x)`` over positions ``x >= 0``, so with every ``d_x >= 0`` its least value is ``c`` (at
    position 0) and ``a - b >= 0`` holds everywhere iff ``c >= 0``; with every ``d_x <= 0``, likewise for
    ``<=``. Hugging Face's bidirectional mask function is ``q_idx >= 0``: under dynamic shapes its size
    is symbolic, and this proves it keeps everything without evaluating it. ``c`` must be a static int."""
    op = _comparison(node)
    if op is None:
        return False
    a, b = (affine(x) if isinstance(x, Node) else _constant_form(x) for x in node.args)
    if a is None or b is None:
        return False
    rank = max(len(a.coeffs), len(b.coeffs))
    diff = [x - y for x, y in zip(a.align(rank), b.align(rank))]
    c = static_int(a.offset - b.offset)
    if c is None:
        return False
    if negated:
        op = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le"}[op]
    if op in ("ge", "gt"):  # least value c when no coefficient is negative
        return all(d >= 0 for d in diff) and (c >= 0 if op == "ge" else c > 0)
    return all(d <= 0 for d in diff) and (c <= 0 if op == "le" else c < 0)  # greatest value c


def _constant_form(x) -> Affine | None:
    """A Python int operand as the affine form of a constant (no positions)."""
    value = _scalar(x)
    return None if value is None else Affine((), value)


def band_of_comparison(node: Node, negated: bool, rank: int, leaf=None) -> tuple[object, object] | None:
    """``(lo, hi)`` bounds on ``j - i`` (None unbounded, possibly symbolic) kept by a comparison atom.
    ``leaf``: see ``affine``."""
    op = _comparison(node)
    if op is None:
        return None
    a, b = affine(node.args[0], leaf), affine(node.args[1], leaf)
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


@dataclass(frozen=True)
class Read:
    """A tensor read elementwise from ``source``: element ``x`` is ``source[coords[0](x), coords[1](x), ..]``,
    each coordinate an affine form over the read's positions (dims right-aligned)."""

    source: Node
    coords: tuple[Affine, ...]  # one per dim of ``source``


def read_of(node) -> Read | None:
    """``node`` as a Read: ``src[i, j]`` with arange-derived index tensors (HF's mask functions gather
    ``pos[batch_idx, q_idx]``), or a view ``src[:, None, :, None]``; else None."""
    if kind(node) != "getitem" or len(node.args) != 2 or node.kwargs or not isinstance(node.args[0], Node):
        return None
    source, index = node.args
    index = index if isinstance(index, tuple) else (index,)
    source_meta, meta = source.meta.get("example_value"), node.meta.get("example_value")
    if not isinstance(source_meta, torch.Tensor) or not isinstance(meta, torch.Tensor):
        return None
    if all(isinstance(i, Node) for i in index) and len(index) == source_meta.dim():
        coords = tuple(affine(i) for i in index)  # the result broadcasts the index tensors, right-aligned
        return None if None in coords else Read(source, coords)
    if not all(i is None or i == slice(None) for i in index) or len(index) - index.count(None) > source_meta.dim():
        return None
    rank, coords, position = meta.dim(), [], 0
    for i in (*index, *[slice(None)] * (source_meta.dim() + index.count(None) - len(index))):
        if i is not None:  # this source dim is output dim ``position``
            coords.append(Affine(tuple(int(d == position) for d in range(rank)), 0))
        position += 1
    return Read(source, tuple(coords))


def document_positions(ids, mutated=lambda node: False) -> Node | None:
    """``pos`` when ``ids`` numbers the documents of packed rows from their positions as Hugging Face does,
    ``cumsum(diff(pos, prepend=<one column>) != 1, -1)``, else None.

    Two tokens of a row then share an id only when every step from one to the other adds exactly 1 to
    the position, so ``pos[u] - pos[w] == u - w`` for any two of them (one exception, not guarded: a
    step from the largest int64 to the smallest also counts as 1, positions near 2**63). ``pos`` must
    be int64 and the cumsum's dtype int64 (a narrower one could wrap and merge two documents); none of
    the chain may be written in place (``mutated``).
    """
    if not isinstance(ids, Node):
        return None
    try:
        if not ((ids.op == "call_method" and ids.target == "cumsum")
                or (ids.op == "call_function" and ids.target is torch.cumsum)):
            return None
        call = bind(ids, ("input", "dim", "dtype"), {"dtype": None})
        flags = call["input"]
        if call["dtype"] not in (None, torch.int64) or not _is_last_dim(ids, call["dim"]) or not isinstance(flags, Node):
            return None
        steps = _not_one(flags)
        if steps is None or steps.op != "call_function" or steps.target is not torch.diff:
            return None
        call = bind(steps, ("input", "n", "dim", "prepend", "append"),
                    {"n": 1, "dim": -1, "prepend": None, "append": None})
    except ArgumentError:
        return None
    pos, first = call["input"], _meta(call["prepend"])
    if call["n"] != 1 or call["append"] is not None or not _is_last_dim(steps, call["dim"]):
        return None
    pos_meta = _meta(pos)
    if pos_meta is None or first is None or pos_meta.dtype != torch.int64 or first.dim() != pos_meta.dim():
        return None
    if any(mutated(n) for n in (ids, flags, steps, pos)):
        return None
    # one prepended column: the diff (so the ids) then index the positions as ``pos`` does
    return pos if static_int(first.shape[-1]) == 1 else None


_NOT_EQUAL = (operator.ne, torch.ne)


def _not_one(flags: Node) -> Node | None:
    """``x`` when ``flags`` is ``x != 1``, else None."""
    if not ((flags.op == "call_function" and flags.target in _NOT_EQUAL)
            or (flags.op == "call_method" and flags.target in ("ne", "__ne__"))):
        return None
    call = bind(flags, ("input", "other"))
    x, y = call["input"], call["other"]
    one = y if isinstance(x, Node) else x
    x = x if isinstance(x, Node) else y
    return x if isinstance(x, Node) and type(one) in (int, float) and one == 1 else None


def _is_last_dim(node: Node, dim) -> bool:
    meta = node.meta.get("example_value")
    return isinstance(meta, torch.Tensor) and isinstance(dim, int) and dim in (-1, meta.dim() - 1)


def _meta(x) -> torch.Tensor | None:
    value = x.meta.get("example_value") if isinstance(x, Node) else None
    return value if isinstance(value, torch.Tensor) else None


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
