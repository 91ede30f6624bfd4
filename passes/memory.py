"""Memory model: per attention site, and the peak of a whole captured graph.

Per site (``bytes_before`` / ``bytes_after``): what the original attention code
and the replacement hold at their peak, for the report's memory column.

Whole graph (``graph_peak``): a liveness analysis over the FX graph in
execution order on the shapes dynamo recorded. Inputs, parameters and buffers
are resident throughout. Every other node allocates its output when it runs
(views share their base's storage) and frees it after its last use, unless
it is a graph output or, when training, autograd saves it for the backward.
An attention site contributes its kernel's transient workspace at the point it
runs (or, in the original graph, its score-sized intermediates, which are
ordinary nodes). The peak is the maximum over the points of the program.

A replaced site is costed as the rewrite leaves the graph: the op reads q, k,
v and the mask terms' atoms, the tensors the rewrite prepares from those
terms are part of its workspace, and every node the rewrite erases (the
subgraph, and then what only it read: a dense mask, ``~tril``, repeated K/V)
is gone from the program (``erased``).

Training adds the backward: at its start the saved activations are alive;
the backward then adds the parameters' gradients and, transiently, the
gradient of the largest activation twice (its output and input gradients),
plus the largest site's recomputation workspace.

Which inputs autograd saves is a rule per op: products save their tensor
operands, softmax its output, elementwise adds and views nothing, anything
unknown saves its inputs (the conservative choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec

from .detect import Match
from .graph import hint, is_in_place, kind, tensor_meta

#: ops whose output shares its input's storage
ALIAS_OPS = frozenset({
    "view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "t", "narrow", "select",
    "split", "chunk", "unbind", "unflatten", "flatten", "view_as", "expand_as", "contiguous", "detach",
    "getitem", "movedim", "as_strided", "type_as", "to", "float", "half", "bfloat16",
})
#: ops whose backward needs nothing of their inputs
SAVES_NOTHING = frozenset({"add", "sub", "neg", "cat", "stack", "pad", "sum", "mean", "dropout", "iadd"})
SAVES_OUTPUT = frozenset({"softmax", "exp", "tanh", "sigmoid", "log_softmax"})


def _nbytes(node) -> int:
    meta = tensor_meta(node)
    return 0 if meta is None else _numel_bytes(meta)


def _numel(node) -> int:
    meta = tensor_meta(node)
    return 0 if meta is None else int(torch.Size([hint(s) for s in meta.shape]).numel())


def bytes_before(match: Match, spec: AttentionSpec) -> int:
    """Attention memory of the original: the score-sized tensors eager keeps alive at once.

    During training autograd keeps every intermediate for the backward; in
    inference an op's input and output are alive together. An SDPA call is
    estimated as PyTorch's math path when it has a mask on CPU (scores and
    probabilities in float32) and as a fused kernel otherwise.
    """
    if match.kind == "sdpa":
        fused = spec.device.type == "cuda" or not (match.booleans or match.additive)
        if fused:
            return 4 * spec.batch * spec.q_heads * spec.q_len
        return 2 * 4 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len
    sizes = [_nbytes(n) for n in match.intermediates]
    if spec.requires_grad:
        return sum(sizes)
    return max((a + b for a, b in zip(sizes, sizes[1:])), default=sum(sizes))


def bytes_after(spec: AttentionSpec, kernel: str) -> int:
    k = registry.get(kernel)
    return k.memory_bytes(spec) + (k.saved_bytes(spec) if spec.requires_grad else 0)


# ---------------------------------------------------------------- whole graph
@dataclass(frozen=True)
class SiteCost:
    """How one attention site is costed in the graph's liveness.

    ``removed``: nodes that no longer run (the replaced subgraph); ``inputs``:
    what the replacement reads instead of ``output``'s original arguments
    (None: the original node runs as written).
    """

    where: str
    output: Node
    workspace: int
    saved: int = 0
    removed: frozenset = frozenset()
    inputs: tuple[Node, ...] | None = None

    @property
    def replaced(self) -> bool:
        return self.inputs is not None


def site_before(where: str, match: Match, spec: AttentionSpec) -> SiteCost:
    """The original code: softmax sites are ordinary nodes; an SDPA call adds its own workspace."""
    workspace = bytes_before(match, spec) if match.kind == "sdpa" else 0
    return SiteCost(where, match.output, workspace)


def site_after(where: str, match: Match, spec: AttentionSpec, kernel: str) -> SiteCost:
    """The replacement: one op reading q, k, v and the mask terms, with the kernel's workspace."""
    k = registry.get(kernel)
    inputs = _input_nodes(match)
    removed = frozenset(match.internal) - set(inputs) - {match.output}
    saved = k.saved_bytes(spec) if spec.requires_grad else 0
    workspace = k.memory_bytes(spec) + prepared_bytes(match)
    return SiteCost(where, match.output, workspace, saved, removed, tuple(inputs))


def prepared_bytes(match: Match) -> int:
    """The tensors the rewrite computes from the mask terms before the op, alive while it runs.

    A negated atom is inverted (``logical_not``), several dense atoms are
    AND-ed into one keep mask, an additive term is scaled or cast to the dtype
    eager added it at, and the terms beyond the first are summed. Key-padding
    rows are views.
    """
    m = match.masks
    if m is None:
        return 0
    total = sum(_nbytes(a.node) for a in (*m.key_padding, *m.dense) if a.negated)
    dense = [_numel(a.node) for a in m.dense]
    if len(dense) > 1:
        total += (len(dense) - 1) * max(dense)  # each AND makes a bool of the broadcast size
    for term, mult in m.additive:
        meta = tensor_meta(term)
        added_at = m.add_dtypes.get(term)
        if meta is not None and (mult != 1.0 or (added_at is not None and added_at != meta.dtype)):
            total += _numel(term) * (added_at or meta.dtype).itemsize
    rest = m.additive[1:] if not m.dense else m.additive
    if len(rest) > 1:
        total += (len(rest) - 1) * max(_nbytes(t) for t, _ in rest)
    return total


def _input_nodes(match: Match) -> tuple[Node, ...]:
    """The graph nodes the replacement op reads: q, k, v and the mask terms' atoms."""
    nodes = [getattr(op, "node", op) for op in (match.q, match.k, match.v)]
    m = match.masks
    if m is not None:
        nodes += [a.node for a in m.key_padding] + list(m.documents or ()) + [a.node for a in m.dense]
        nodes += [t for t, _ in m.additive]
    return tuple(n for n in nodes if isinstance(n, Node))


@dataclass(frozen=True)
class Peak:
    """Estimated peak device memory of one run of a graph."""

    bytes: int
    resident: int  # inputs, parameters and buffers
    at: str  # the node (or "backward") where the peak is reached
    site_bytes: dict[str, int] = field(default_factory=dict)  # per site: workspace + saved


def _numel_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return int(torch.Size([hint(s) for s in value.shape]).numel()) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_numel_bytes(v) for v in value)
    return 0


def _value(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _op_name(node: Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        known = kind(node)
        return known or getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module":
        return "module"
    return node.op


def _saved_inputs(node: Node, args: list[Node]) -> list[Node]:
    """The argument nodes autograd keeps for this op's backward."""
    name = _op_name(node)
    if name in ALIAS_OPS or name in SAVES_NOTHING:
        return []
    if name in SAVES_OUTPUT:
        return [node]
    if name in ("mul", "div"):
        tensors = [a for a in args if tensor_meta(a) is not None]
        return tensors if len(tensors) > 1 else []
    return list(args)


def erased(sites: list[SiteCost]) -> set[Node]:
    """The nodes the rewrite of the replaced ``sites`` erases (``rewrite.replace`` and ``erase_dead``).

    Each replaced site's subgraph goes, and then, in turn, every pure
    computation left without users: what only the attention read (a dense
    ``[1, 1, N, N]`` mask, ``~tril``, the scores and probabilities, repeated
    keys and values). A node something else still reads stays: the
    replacement's own inputs, a mask shared with a site kept as it was.
    """
    replaced = [s for s in sites if s.replaced]
    outputs = {s.output for s in replaced}
    internal = set().union(*(s.removed for s in replaced)) if replaced else set()
    users: dict[Node, set[Node]] = {}

    def users_of(node: Node) -> set[Node]:
        if node not in users:
            users[node] = set(node.users)
        return users[node]

    work: list[Node] = []
    for s in replaced:  # the site's output node stands for the op that replaces it, reading ``inputs``
        for a in s.output.all_input_nodes:
            users_of(a).discard(s.output)
            work.append(a)
        for a in s.inputs:
            users_of(a).add(s.output)
    work.extend(internal)
    dead: set[Node] = set()
    while work:
        node = work.pop()
        if node in dead or node in outputs or users_of(node) or node.op not in ("call_function", "call_method"):
            continue
        if node not in internal and (is_in_place(node) or node.is_impure()):
            continue
        dead.add(node)
        for a in node.all_input_nodes:
            users_of(a).discard(node)
            work.append(a)
    return dead


def graph_peak(graph: Graph, sites: list[SiteCost], *, training: bool) -> Peak:
    """Peak bytes of one forward (and backward when ``training``) of ``graph`` with ``sites`` costed.

    The graph is costed as the rewrite leaves it: without the nodes it erases (``erased``).
    """
    by_output = {s.output: s for s in sites}
    removed = erased(sites)
    nodes = [n for n in graph.nodes if n not in removed]
    index = {n: i for i, n in enumerate(nodes)}

    def args_of(node: Node) -> list[Node]:
        site = by_output.get(node)
        if site is not None and site.inputs is not None:
            return list(site.inputs)
        return [a for a in node.all_input_nodes if a not in removed]

    base: dict[Node, Node] = {}  # node -> the node owning its storage
    size: dict[Node, int] = {}
    last_use: dict[Node, int] = {}
    keep: set[Node] = set()
    resident = 0
    for node in nodes:
        args = args_of(node)
        if node.op in ("placeholder", "get_attr"):
            resident += _numel_bytes(_value(node))
            base[node] = node
            keep.add(node)
            continue
        if node.op == "output":
            for a in args:
                keep.add(base.get(a, a))
            continue
        owner = None
        if _op_name(node) in ALIAS_OPS and args and node not in by_output:
            owner = base.get(args[0], args[0])
            value_bytes = _numel_bytes(_value(node))
            if _op_name(node) in ("contiguous", "to", "float", "half", "bfloat16", "type_as", "reshape"):
                src = _value(args[0])
                value = _value(node)
                copies = isinstance(src, torch.Tensor) and isinstance(value, torch.Tensor) and (
                    src.dtype != value.dtype or (not src.is_contiguous() and value.is_contiguous())
                )
                if copies:
                    owner = None
            if owner is not None and value_bytes == 0 and _value(node) is None:
                owner = None
        if owner is None:
            base[node] = node
            size[node] = _numel_bytes(_value(node))
        else:
            base[node] = owner
        for a in args:
            last_use[base.get(a, a)] = index[node]
        if training and _requires_grad(node, args):
            keep.update(base.get(a, a) for a in _saved_inputs(node, args))
            if node in by_output:
                keep.update(base.get(a, a) for a in args)
                keep.add(node)

    live = 0
    peak, at = 0, "(inputs)"
    frees: dict[int, list[Node]] = {}
    for owner, i in last_use.items():
        if owner in size and owner not in keep:
            frees.setdefault(i, []).append(owner)
    saved_extra = 0
    for node in nodes:
        if node in size:
            live += size[node]
            if node not in last_use and node not in keep:
                frees.setdefault(index[node], []).append(node)
        site = by_output.get(node)
        transient = site.workspace if site is not None else _op_transient(node)
        if site is not None and training:
            saved_extra += site.saved
            live += site.saved
        if live + transient > peak:
            peak, at = live + transient, node.name
        for owner in frees.get(index[node], []):
            live -= size[owner]
    total = resident + peak
    if training:
        params = sum(_numel_bytes(_value(n)) for n in nodes if n.op in ("placeholder", "get_attr")
                     and _is_param(_value(n)))
        largest = max(size.values(), default=0)
        recompute = max((s.workspace for s in sites), default=0)
        backward = resident + live + params + 2 * largest + recompute
        if backward > total:
            total, at = backward, "backward"
    site_bytes = {s.where: s.workspace + s.saved for s in sites}
    return Peak(total, resident, at, site_bytes)


def _op_transient(node: Node) -> int:
    """Scratch memory an op allocates and frees inside itself.

    ``softmax(x, dtype=float32)`` converts ``x`` to float32 first (ATen's
    ``softmax`` calls ``x.toType(dtype)``, except for float16 on CUDA, which has a
    fused half-to-float kernel), so a float32 copy of the scores lives beside the
    output while it runs.
    """
    if kind(node) != "softmax":
        return 0
    source, out = _value(node.args[0]) if node.args else None, _value(node)
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)) or source.dtype == out.dtype:
        return 0
    if source.dtype == torch.float16 and out.dtype == torch.float32 and source.device.type == "cuda":
        return 0
    return _numel_bytes(out)


def _is_param(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _requires_grad(node: Node, args: list[Node]) -> bool:
    value = _value(node)
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    return any(isinstance(_value(a), torch.Tensor) and _value(a).requires_grad for a in args)
