"""One vocabulary for the many spellings of an op in a dynamo FX graph.

Dynamo records ``q @ k`` as ``operator.matmul``, ``torch.matmul(q, k)`` as
``torch.matmul`` and ``q.matmul(k)`` as a ``call_method``; the passes ask
``kind(node)`` instead and get ``"matmul"`` for all three. ``tensor_meta``
reads the shape and dtype dynamo stored on each node.
"""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
    # operators some dynamo versions record as Tensor methods (torch 2.11: ``a == b`` is ``a.__eq__(b)``);
    # only those whose operands keep their order (``__rsub__`` is ``other - self``: not listed)
    "__eq__": "eq", "__and__": "and", "__or__": "or", "__invert__": "not", "__mul__": "mul",
    "__truediv__": "div", "__add__": "add", "__sub__": "sub", "__matmul__": "matmul", "__getitem__": "getitem",
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
        if node.target == "view" and any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
            return None  # ``x.view(dtype)`` reinterprets the bits: no reshape, no value kept
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


def sizes_of(node: Any) -> tuple | None:
    """The shape dynamo recorded for ``node`` as it holds it: ints, and SymInts where shapes are dynamic."""
    meta = tensor_meta(node)
    return None if meta is None else tuple(meta.shape)


def same_size(x, y) -> bool:
    """Whether two sizes (ints or SymInts) are equal for every value of their symbols that the shape
    environment allows: what dynamo already guarded (its replacements and guards), never a size hint."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    return statically_known_true(x == y)


def same_sizes(a, b) -> bool:
    """``same_size`` of every dim: two shapes provably equal."""
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def static_number(x) -> int | float | None:
    """A Python number for a literal, or for a symbolic scalar whose expression the shape environment
    reduces to a number (its symbols replaced by values dynamo guarded); else None.

    The number is the scalar's hint where it has one: Python computed it from the inputs' values as eager
    does (``math.sqrt(64) ** -1`` rounds as eager rounds it, where a symbolic evaluation may differ in the
    last bit)."""
    if isinstance(x, (bool, torch.SymBool)):
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, (torch.SymInt, torch.SymFloat)) and x.node.expr.is_number:
        value = x.node.hint if x.node.has_hint() else x.node.expr
        return int(value) if isinstance(x, torch.SymInt) else float(value)
    return None


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class ArgumentError(Exception):
    """A call passes an argument the matcher does not interpret; the message names it."""


def bind(node: Node, names: tuple[str, ...], defaults: dict[str, Any] | None = None,
         ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """All arguments of a call by name: ``names`` in positional order (``self`` included for methods).

    Every keyword must be one of ``names`` (or ``ignored``: keywords that do not change the value,
    such as ``_stacklevel``); an argument the caller does not know how to read is an ``ArgumentError``,
    never silently dropped.
    """
    if len(node.args) > len(names):
        raise ArgumentError(f"{_target_name(node)} ({node.name}) has {len(node.args)} positional arguments")
    bound = dict(defaults or {})
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key in ignored:
            continue
        if key not in names:
            raise ArgumentError(f"{_target_name(node)} ({node.name}) has the argument {key}={value!r}, "
                                f"which attnopt does not interpret")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise ArgumentError(f"{_target_name(node)} ({node.name}) misses {', '.join(missing)}")
    return bound


def _target_name(node: Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def module_path(node: Node) -> str:
    """The module path that produced ``node`` (``h.0.attn``), or the node's name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "(top level)"
    return dotted_path(list(stack.values())[-1][0]) or "(top level)"


def dotted_path(path: str) -> str:
    """A path dynamo spells from the traced function's locals (``L['self'].h[0]``, ``L['args'][0].model``, a
    source's ``L['self']._modules['h']._modules['0']._parameters['weight']``) as a dotted path from that local
    (``h.0``, ``model``, ``h.0.weight``; empty for the local itself)."""
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])*", "", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.lstrip(".")


def constant_value(node: Any) -> float | None:
    """A Python number behind ``node`` (a literal), else None."""
    if isinstance(node, bool):
        return None
    if isinstance(node, (int, float)):
        return float(node)
    return None


def is_buffer(node: Node) -> bool:
    """Whether a node is a module buffer: a ``get_attr`` or a placeholder dynamo lifted from ``_buffers``."""
    if node.op == "get_attr":
        return True
    return _lifted(node, "buffers")


def is_parameter(node: Node) -> bool:
    """Whether a placeholder is a module parameter that dynamo lifted to a graph input."""
    return _lifted(node, "parameters")


def _lifted(node: Node, kind_: str) -> bool:
    # the source dynamo recorded (L['self']._modules['attn']._buffers['bias']), never the node's name:
    # a user input may be called anything, `x_buffers_mask` included
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
    return f"._{kind_}[" in name


# Ops the analysis may evaluate at capture time: pure and deterministic. Anything else (random draws,
# in-place writes, I/O, ops this list does not know) is never run, and its result is not a constant.
_PURE_FUNCTIONS = frozenset({
    torch.arange, torch.ones, torch.zeros, torch.full,
    torch.ones_like, torch.zeros_like, torch.full_like, torch.tril, torch.triu, torch.eye,
    torch.logical_not, torch.logical_and, torch.logical_or, torch.logical_xor,
    torch.bitwise_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor,
    torch.eq, torch.ne, torch.le, torch.lt, torch.ge, torch.gt, torch.where, torch.masked_fill,
    torch.abs, torch.neg, torch.add, torch.sub, torch.mul, torch.div, torch.clamp, torch.minimum, torch.maximum,
    torch.pow, torch.exp, torch.log, torch.sqrt, torch.floor, torch.ceil,
    torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten, torch.cat,
    torch.stack, torch.outer, torch.cumsum, torch.diff, torch.tensor, torch.as_tensor, torch.clone,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.pow, operator.mod, operator.abs, operator.invert, operator.and_, operator.or_, operator.xor,
    operator.eq, operator.ne, operator.le, operator.lt, operator.ge, operator.gt, operator.getitem,
})
_PURE_METHODS = frozenset({
    "new_ones", "new_zeros", "new_full", "new_tensor", "tril", "triu", "logical_not", "logical_and",
    "logical_or", "bitwise_not", "bitwise_and", "bitwise_or", "eq", "ne", "le", "lt", "ge", "gt",
    "masked_fill", "abs", "neg", "add", "sub", "mul", "div", "clamp", "pow", "exp", "log", "sqrt",
    "to", "float", "double", "half", "bfloat16", "bool", "int", "long", "type_as", "type",
    "view", "reshape", "view_as", "reshape_as", "expand", "expand_as", "transpose", "permute", "unsqueeze",
    "squeeze", "flatten", "contiguous", "repeat", "size", "dim", "cumsum", "all", "any", "sum", "clone", "detach",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__or__", "__xor__", "__invert__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
    "__getitem__", "__abs__", "__pow__", "__floordiv__", "__mod__",
})

#: ops whose result may share memory with their first argument (a write to one is a write to the other)
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
    torch.flatten, torch.swapaxes, torch.narrow, torch.select, torch.diagonal, torch.as_strided,
    torch.split, torch.chunk, torch.unbind, torch.movedim, torch.t,
})
_VIEW_METHODS = frozenset({
    "__getitem__",
    "view", "reshape", "view_as", "reshape_as", "expand", "expand_as", "transpose", "permute", "unsqueeze",
    "squeeze", "flatten", "unflatten", "contiguous", "narrow", "select", "diagonal", "as_strided", "split",
    "chunk", "unbind", "movedim", "swapaxes", "t", "detach", "to", "type_as", "type", "float", "double",
    "half", "bfloat16", "bool", "int", "long",
})
_IN_PLACE_FUNCTIONS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})


_IN_PLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
})


def is_in_place(node: Node) -> bool:
    """Whether ``node`` writes into its first argument (``x.masked_fill_``, ``x[i] = v``, ``x += y``, ``out=``)."""
    if node.op == "call_method":
        if node.target in _IN_PLACE_DUNDERS:
            return True
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _IN_PLACE_FUNCTIONS or "out" in node.kwargs:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # operator.and_ / or_ are not in place
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")  # torch.relu_, Tensor.add_
    return False


def _aliases(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS or is_in_place(node)
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or is_in_place(node)
    return False


def _storage_refs(node: Node) -> set:
    """Weak references to the storages of the tensors ``node`` recorded as its example value (a tensor, or a
    tuple or list of them): equal for two views of one memory."""
    value = node.meta.get("example_value", node.meta.get("val"))
    values = value if isinstance(value, (tuple, list)) else (value,)
    refs = set()
    for v in values:
        if isinstance(v, torch.Tensor):
            try:
                refs.add(StorageWeakRef(v.untyped_storage()))
            except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
                pass
    return refs


def _node_args(node: Node) -> list:
    """The nodes among ``node``'s arguments, nested ones included."""
    found: list = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


class Mutations:
    """Which tensors of a graph are written in place, and where.

    Nodes that may share memory (a tensor, its views, the result of an in-place op on it) form one
    alias class; a class with an in-place write is *mutated*. A mutated tensor's value depends on
    when it is read, so nothing in its class is a constant, and a rewrite that would read it later
    than the original did must not happen.
    """

    def __init__(self, graph):
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self._root: dict[Node, Node] = {}
        writes: list[Node] = []
        storages: dict[Node, set] = {}
        for node in graph.nodes:
            if _aliases(node) and node.args and isinstance(node.args[0], Node):
                self._union(node, node.args[0])
            # any other op whose result shares memory with an argument, as the fake tensors recorded it (``.mT``,
            # ``broadcast_to``, ``moveaxis``, ``ravel``, ``tensor_split``...: views no list above names)
            mine = storages[node] = _storage_refs(node)
            if mine:
                for arg in _node_args(node):
                    if arg in storages and mine & storages[arg]:
                        self._union(node, arg)
            if is_in_place(node) and node.args and isinstance(node.args[0], Node):
                writes.append(node)
        self.writes: dict[Node, list[int]] = {}  # alias root -> positions of in-place writes
        for node in writes:
            self.writes.setdefault(self._find(node.args[0]), []).append(self.position[node])

    def _find(self, node: Node) -> Node:
        root = node
        while self._root.get(root, root) is not root:
            root = self._root[root]
        self._root[node] = root
        return root

    def _union(self, a: Node, b: Node) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self._root[ra] = rb

    def is_mutated(self, node: Node) -> bool:
        return self._find(node) in self.writes

    def written_between(self, node: Node, start: Node, end: Node) -> bool:
        """Whether ``node`` (or a tensor sharing its memory) is written after ``start`` and before ``end``."""
        lo, hi = self.position.get(start, -1), self.position.get(end, len(self.position))
        return any(lo < p < hi for p in self.writes.get(self._find(node), ()))


#: a computed constant whose storage is larger is not kept, but computed again when read again: a mask built
#: in each layer (``torch.ones(n, n).tril()``) would otherwise stay in memory once per layer during the
#: capture (a 32-layer model at 32k tokens: 32 GiB of boolean masks)
UNCACHED_BYTES = 16 << 20


def written_inputs(gm) -> set[int]:
    """Positions of the placeholders that ``gm``'s graph writes in place (a buffer, a cache, a counter)."""
    mutations = Mutations(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {i for i, n in enumerate(placeholders) if mutations.is_mutated(n)}


def private_inputs(inputs, written: set[int]) -> list:
    """``inputs`` with the tensors at ``written`` copied: a trial run of the graph leaves the caller's as they
    were (a counter counts once, a running statistic moves once, per real call)."""
    return [x.clone() if i in written and isinstance(x, torch.Tensor) else x for i, x in enumerate(inputs)]


@contextlib.contextmanager
def seeded(inputs, seed: int):
    """Torch's generators (the CPU one, and those of the CUDA devices of ``inputs``) seeded with ``seed`` inside,
    restored after: runs compared with each other draw the same random numbers (dropout), and the caller's own
    stream goes on as it would have."""
    devices = sorted({x.device.index for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda} - {None})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Constants:
    """Evaluates nodes that depend only on constants: literals, aranges, shapes and module buffers.

    Every buffer value a proof reads is a fact that can change after capture (``load_state_dict``,
    ``fill_``): ``used`` collects the buffers read since the last ``begin``, so the caller can guard
    them. Buffers the graph itself writes, and anything computed from a tensor written in place, are
    not constants. Only pure, deterministic ops (``_PURE_FUNCTIONS`` / ``_PURE_METHODS``) are
    evaluated: nothing random, nothing in place, nothing with a side effect ever runs during analysis.
    ``inputs`` gives the real values of the graph's placeholders.
    """

    def __init__(self, graph, inputs: dict[Node, torch.Tensor] | None):
        self.graph = graph
        self.inputs = inputs or {}
        self.mutations = Mutations(graph)
        self._constant: dict[Node, bool] = {}
        self._values: dict[Node, Any] = {}
        self._reads: dict[Node, frozenset] = {}  # node -> buffers its value was computed from
        self.used: dict[Node, None] = {}

    def begin(self) -> None:
        """Start collecting the buffers read by one site's proof."""
        self.used = {}

    def is_constant(self, node: Any) -> bool:
        if not isinstance(node, Node):
            return not isinstance(node, (torch.SymInt, torch.SymFloat, torch.SymBool))
        if node in self._constant:
            return self._constant[node]
        if self.mutations.is_mutated(node):
            result = False
        elif node.op == "placeholder":
            result = is_buffer(node) and node in self.inputs
        elif node.op == "get_attr":
            result = True
        elif node.op in ("call_function", "call_method") and _is_pure(node):
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
                self._reads[node] = frozenset((node,))
            elif node.op == "get_attr":
                target = self.graph.owning_module
                for part in node.target.split("."):
                    target = getattr(target, part)
                self._values[node] = target
                self._reads[node] = frozenset((node,)) if isinstance(target, torch.Tensor) else frozenset()
            else:
                args = torch.fx.node.map_arg(node.args, self.value)
                kwargs = torch.fx.node.map_arg(node.kwargs, self.value)
                with torch.no_grad():
                    if node.op == "call_function":
                        value = node.target(*args, **kwargs)
                    else:
                        value = getattr(args[0], node.target)(*args[1:], **kwargs)
                self._reads[node] = frozenset().union(*(self._reads.get(a, frozenset()) for a in node.all_input_nodes))
                self.used.update(dict.fromkeys(self._reads[node]))
                if not (isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > UNCACHED_BYTES):
                    self._values[node] = value
                return value
        self.used.update(dict.fromkeys(self._reads[node]))
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


class ExampleValues(Constants):
    """Evaluates nodes computed by pure ops from the graph's example inputs (placeholders with a value in
    ``inputs``, not only buffers): the values one call took. A hint for performance decisions only (which rows a
    captured batch's padding leaves without a key, to time kernels on), never a fact a rewrite relies on: the
    next call's inputs differ. A node above ``UNCACHED_BYTES`` (a ``[B, 1, N, N]`` mask at a long length) is not
    evaluated, nor anything computed from it: a hint is not worth that memory in the first call."""

    def is_constant(self, node: Any) -> bool:
        if isinstance(node, Node):
            meta = tensor_meta(node)
            if meta is not None and _has_concrete_meta(node) and meta.numel() * meta.element_size() > UNCACHED_BYTES:
                return False
            if node.op == "placeholder":
                return node in self.inputs and not self.mutations.is_mutated(node)
        return super().is_constant(node)

    def example(self, node: Node) -> Any:
        """``node``'s value on the example inputs, or None when it is not computed from them by pure ops."""
        try:
            return self.value(node) if self.is_constant(node) else None
        except (RuntimeError, ValueError, TypeError, IndexError):  # an op that fails on these values: no hint
            return None


def placeholder_values(gm, example_inputs, volatile: frozenset = frozenset()) -> dict | None:
    """The real example inputs by placeholder (all but the ``volatile`` positions: buffers seen changing between
    calls), so that the mask analysis can evaluate buffer-built masks; None without example inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None or len(example_inputs) != len(placeholders):
        return None
    return {n: x for i, (n, x) in enumerate(zip(placeholders, example_inputs))
            if isinstance(x, torch.Tensor) and i not in volatile}


def erase_dead_copies(graph) -> int:
    """Erase pure computations nothing reads (x-transformers keeps ``sim.clone()`` in its graph): a dead
    copy of the scores is not a use of them. Returns how many nodes went."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method") or is_in_place(node):
            continue
        if _is_pure(node) and not node.is_impure():
            graph.erase_node(node)
            erased += 1
    return erased


def _is_pure(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    return node.target in _PURE_FUNCTIONS


def _flat_args(node: Node) -> list:
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _has_concrete_meta(node: Node) -> bool:
    meta = tensor_meta(node)
    return meta is None or all(isinstance(s, int) for s in meta.shape)
