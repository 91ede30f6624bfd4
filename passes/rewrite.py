"""Rewrite: replace each matched attention subgraph with one ``torch.ops.attnopt.attention`` call.

For a match the pass builds the op's inputs from the analyzed mask terms
(key padding rows, document ids, dense atoms AND-ed into one keep mask,
additive terms scaled and summed), brings q, k, v to ``[B, H, N, D]`` views
and the terms added to a view of the scores to the op's ``[B, H, Nq, Nk]`` frame,
inserts the call before the old value product, hands its uses over, and
erases the attention's now-dead intermediates. The caller lints and
recompiles the graph once all sites are done.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from attnopt.kernels.spec import AttentionSpec
from attnopt.kernels.term_cache import capturing
from attnopt.ops import SiteCall

from .detect import Match
from .graph import Mutations, is_in_place, shape_of, tensor_meta
from .layouts import Operand, apply_steps, fold_windows
from .masks import fill_only_keep, half_added


def key_padding_rows(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A key-padding atom shaped ``[B or 1, 1, .., Nk]`` (or ``[Nk]``) as the ``[B, Nk]`` keep mask of the op."""
    rows = mask.reshape(-1, mask.shape[-1])  # [B or 1, Nk]: every dim but the first and last is 1
    return rows.expand(q.shape[0], mask.shape[-1])


def id_rows(ids: torch.Tensor) -> torch.Tensor:
    """Document ids shaped ``[B or 1, 1, .., N, 1]`` or ``[.., 1, N]`` (or ``[N, 1]``, ``[1, N]``) as ``[B or 1, N]``."""
    length = ids.shape[-2] * ids.shape[-1]  # one of the two is 1
    return ids.reshape(-1, length)


def spec_of(match: Match) -> AttentionSpec:
    """The AttentionSpec of a match on meta tensors of the real shapes: for planning and reports."""
    m = match.masks
    q_shape, k_shape, v_shape = match.q.shape(), match.k.shape(), match.v.shape()
    dtype = match.q.dtype()

    def meta(shape, dt):
        return torch.empty(shape, dtype=dt, device="meta")

    batch, q_len, kv_len = q_shape[0], q_shape[2], k_shape[2]
    dense = meta(_rank4(m.dense[0].shape(), match), torch.bool) if m.dense else None
    # each additive term as the kernel receives it: in the dtype eager added it at (``_additive``; an integer term
    # added to bfloat16 scores is added in bfloat16, and a kernel that adds a bfloat16 mask in float32 must say so)
    additive = [meta(_rank4(apply_steps(shape_of(t), m.term_steps.get(t, ())), match),
                     m.add_dtypes.get(t) or tensor_meta(t).dtype) for t, _ in m.additive]
    mask, bias = (dense, additive[0] if additive else None) if dense is not None else (
        additive[0] if additive else None, additive[1] if len(additive) > 1 else None)
    docs = m.documents
    spec = AttentionSpec.from_tensors(
        meta(q_shape, dtype), meta(k_shape, dtype), meta(v_shape, dtype),
        scale=_scale(match), causal=m.causal, align=m.align, window=m.window,
        key_padding=meta((batch, kv_len), torch.bool) if m.key_padding else None,
        q_doc=meta((1, q_len), torch.long) if docs else None, kv_doc=meta((1, kv_len), torch.long) if docs else None,
        bias=bias, mask=mask, softcap=match.softcap, dropout_p=match.dropout_p, fill=m.fill,
        requires_grad=any(tensor_meta(op.node).requires_grad for op in (match.q, match.k, match.v)),
    )
    return spec.with_(device=tensor_meta(match.q.node).device)


def all_kept(*keeps: torch.Tensor) -> bool:
    """Whether key-padding masks keep every key: one host sync, shared by every site of a forward.
    While a CUDA graph is captured nothing may sync: the padded kernel is always right."""
    if capturing():
        return False
    if len(keeps) == 1:
        return bool(keeps[0].all())
    return bool(torch.stack([keep.all() for keep in keeps]).all())


class UnlessUnpadded:
    """A site's call with its key padding, or, when the padding keeps every key, its call without it
    (a batch with no padding runs HF's causal + key padding call as plain causal, on cuDNN say).
    Called with ``all_kept``'s answer and the site's arguments; both calls are resolved at rewrite time."""

    #: the name of the call in the graph's generated code
    __name__ = "attention_unless_unpadded"

    def __init__(self, padded: SiteCall, unpadded: SiteCall):
        self.padded, self.unpadded = padded, unpadded

    def __call__(self, unpadded: bool, q, k, v, key_padding, q_doc, kv_doc, bias, mask, dropout_p=0.0):
        if unpadded:
            return self.unpadded(q, k, v, None, q_doc, kv_doc, bias, mask, dropout_p)
        return self.padded(q, k, v, key_padding, q_doc, kv_doc, bias, mask, dropout_p)

    def __repr__(self) -> str:
        return f"<{self.padded!r}, or {self.unpadded!r} when the padding keeps every key>"


class UnlessFillOnly:
    """A site's call with its additive mask, or, when that mask holds only 0 and ``finfo.min``
    (``masks.fill_only_keep`` gives its keep mask, once per forward), the call with the boolean mask instead: the
    same function, which faster kernels take (``passes/pipeline.py: fill_only_spec``). Both calls are resolved
    at rewrite time."""

    __name__ = "attention_unless_fill_only"

    def __init__(self, additive: SiteCall, boolean: SiteCall):
        self.additive, self.boolean = additive, boolean

    def __call__(self, keep, q, k, v, key_padding, q_doc, kv_doc, bias, mask, dropout_p=0.0):
        if keep is not None:
            return self.boolean(q, k, v, key_padding, q_doc, kv_doc, bias, keep, dropout_p)
        return self.additive(q, k, v, key_padding, q_doc, kv_doc, bias, mask, dropout_p)

    def __repr__(self) -> str:
        return f"<{self.additive!r}, or {self.boolean!r} when its mask holds only 0 and finfo.min>"


#: the key in an erased site output's ``meta`` that names the node now producing that output
REPLACED_BY = "attnopt_replaced_by"


def replace(graph: Graph, match: Match, kernel: str, unpadded_kernel: str | None = None, lean: bool = False,
            fill_only_kernel: str | None = None, rechoice=None, register=None) -> Node:
    """Insert the op call for ``match`` running ``kernel``; returns the node now producing the output.

    ``lean`` (graphs run as Python, ``compiler="eager"``): the node calls an ``attnopt.ops.SiteCall`` made
    here, which holds the static arguments and the kernel, sends inference calls straight to the kernel
    and the others to the op. With ``unpadded_kernel`` (lean graphs only), a call whose key padding keeps
    every key runs that kernel without the padding term instead, decided at run time once per forward
    (one host sync for all sites that share the padding mask). With ``fill_only_kernel`` (lean graphs only), a
    call whose additive mask holds only 0 and ``finfo.min`` runs that kernel on the mask as a boolean one
    (``UnlessFillOnly``), decided likewise. ``rechoice`` (lean graphs with a symbolic batch size or lengths, a
    ``plan.Rechoice``): each of those calls chooses its kernel again for shape buckets other than the planned one.
    ``register`` (lean graphs): called with the ``SiteCall`` that runs ``kernel``, which a later timing may switch
    to another kernel (``SiteCall.switch``).
    """
    assert lean or (unpadded_kernel is None and fill_only_kernel is None and rechoice is None), \
        "run-time branches are for graphs run as Python"
    m = match.masks
    with graph.inserting_before(match.output):
        q, k, v = (_view(graph, op) for op in (match.q, match.k, match.v))
        key_padding = _key_padding_node(graph, m.key_padding, q, match.output) if m.key_padding else None
        unpadded = None
        if unpadded_kernel is not None and m.key_padding:
            unpadded = _all_kept_node(graph, m.key_padding, match.output)
        q_doc = kv_doc = None
        if m.documents_same:  # one vector (passes/masks.py): one tensor, so a call proves each row sees a key
            q_doc = kv_doc = _id_rows_node(graph, m.documents[0], match.output)
        elif m.documents is not None:
            q_doc, kv_doc = (_id_rows_node(graph, ids, match.output) for ids in m.documents)
        keep = _all(graph, [_in_frame(graph, _atom(graph, a), shape_of(a.node), a.steps, q, match) for a in m.dense])
        additive = [_in_frame(graph, _additive(graph, t, mult, m.add_dtypes.get(t)), shape_of(t),
                              m.term_steps.get(t, ()), q, match) for t, mult in m.additive]
        halves = [half_added(t, m.add_dtypes) for t, _ in m.additive]
        if keep is not None:  # (terms added at two precisions beside a boolean mask are refused: masks.analyze)
            mask, rest = keep, additive
        elif any(halves) and not all(halves):
            # the kernels add the bias, then the mask, each at the precision its dtype says (kernels/spec.py); eager
            # added its half-precision terms before the scores were upcast, the others after: the half ones go first
            mask = _sum(graph, [a for a, half in zip(additive, halves) if not half])
            rest = [a for a, half in zip(additive, halves) if half]
        else:
            mask, rest = (additive[0] if additive else None), additive[1:]
        bias = _sum(graph, rest)
        window = m.window
        tensors = (q, k, v, key_padding, q_doc, kv_doc, bias, mask)
        dropout = match.dropout_p if match.dropout_node is None else match.dropout_node
        static = (_scale(match), m.causal, m.align.value, None if window is None else window.left,
                  None if window is None else window.right, match.softcap)
        if not lean:
            call = graph.call_function(torch.ops.attnopt.attention.default,
                                       (*tensors, *static, dropout, m.fill.value, kernel))
        elif fill_only_kernel is not None and unpadded is None and keep is None and bias is None and mask is not None:
            term, fill, boolean_fill = m.fill_only
            checked = _shared(graph, "fill_only", (term, fill, _flat_heads(match)), match.output,
                              lambda: graph.call_function(fill_only_keep, (mask, fill)))
            branch = UnlessFillOnly(main := SiteCall(kernel, *static, m.fill.value, rechoice),
                                    SiteCall(fill_only_kernel, *static, boolean_fill.value, rechoice))
            call = graph.call_function(branch, (checked, *tensors, dropout))
        elif unpadded is None:
            call = graph.call_function(main := SiteCall(kernel, *static, m.fill.value, rechoice), (*tensors, dropout))
        else:
            branch = UnlessUnpadded(main := SiteCall(kernel, *static, m.fill.value, rechoice),
                                    SiteCall(unpadded_kernel, *static, m.fill.value, rechoice))
            call = graph.call_function(branch, (unpadded, *tensors, dropout))
        if lean and register is not None:
            register(main)
        out = graph.call_function(operator.getitem, (call, 0))
        for name, args in match.output_steps:
            out = graph.call_method(name, (out, *args))
        want = tensor_meta(match.output).dtype
        if want != match.q.dtype():
            out = graph.call_method("to", (out, want))
    match.output.replace_all_uses_with(out)
    # a later site may read this output as its q, k or v (one attention's output fed straight into the next):
    # its match holds the node erased below, which ``_view`` follows to the replacement
    match.output.meta[REPLACED_BY] = out
    freed: list[Node] = []
    for node in dict.fromkeys([match.output, *match.internal]):
        if node.graph is graph and not node.users:
            freed.extend(node.all_input_nodes)
            graph.erase_node(node)
    erase_dead(graph, freed)
    return out


def erase_dead(graph: Graph, candidates: list[Node]) -> None:
    """Erase nodes left without users by the rewrite (a causal mask the kernel no longer reads), and
    then their inputs in turn; only pure computations: never placeholders, in-place ops or side effects."""
    work = list(candidates)
    while work:
        node = work.pop()
        erased = getattr(node, "_erased", False)
        if erased or node.graph is not graph or node.users or node.op not in ("call_function", "call_method"):
            continue
        if is_in_place(node) or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


def _sum(graph: Graph, terms: list[Node]) -> Node | None:
    """The terms added up in the graph, in order (None for none)."""
    total = None
    for term in terms:
        total = term if total is None else graph.call_function(operator.add, (total, term))
    return total


def _additive(graph: Graph, term: Node, mult: float, added_at) -> Node:
    """The additive term as the kernel must add it: scaled, and in the dtype eager added it at
    (a float16 mask added to float32 scores is added in float32, and must not saturate)."""
    node = term if mult == 1.0 else graph.call_function(operator.mul, (term, mult))
    if added_at is not None and added_at != tensor_meta(term).dtype:
        node = graph.call_method("to", (node, added_at))
    return node


def _shared(graph: Graph, kind: str, key, before: Node, make, sources: tuple = ()) -> Node:
    """A node made once by ``make()`` at the first site that needs it and reused by the later sites whose
    insertion point it precedes (HF computes one padding mask for every layer). Not shared when one of the
    ``sources`` it is computed from is written in place in the graph: a later site may read it after a write,
    and must then see the write (each site's own reads are ordered by ``detect._check_read_order``)."""
    mutations = graph.__dict__.get("_attnopt_mutations")
    if mutations is None:  # the graph's writes, found once: the nodes the rewrite inserts write nothing
        mutations = graph.__dict__["_attnopt_mutations"] = Mutations(graph)
    if any(mutations.is_mutated(n) for n in sources):
        return make()
    cache = graph.__dict__.setdefault(f"_attnopt_{kind}", {})
    node = cache.get(key)
    if node is None or node.graph is not graph or getattr(node, "_erased", False) or not node < before:
        node = cache[key] = make()
    return node


def _all_kept_node(graph: Graph, atoms, before: Node) -> Node:
    """The ``all_kept`` node for these key-padding atoms: one host sync per forward for every layer."""
    key = tuple((a.node, a.negated) for a in atoms)
    return _shared(graph, "all_kept", key, before,
                   lambda: graph.call_function(all_kept, tuple(_atom(graph, a) for a in atoms)),
                   tuple(a.node for a in atoms))


def _key_padding_node(graph: Graph, atoms, q: Node, before: Node) -> Node:
    """The op's ``[B, Nk]`` key padding for these atoms, shared by the sites of one batch size: the layers
    then hand their kernels one and the same tensor, and a kernel's per-mask work (the Triton kernels'
    tile lists) is done once per forward."""
    key = (tuple((a.node, a.negated) for a in atoms), str((shape_of(q) or (None,))[0]))
    return _shared(graph, "key_padding", key, before, lambda: _all(
        graph, [graph.call_function(key_padding_rows, (_atom(graph, a), q)) for a in atoms]),
        tuple(a.node for a in atoms))


def _id_rows_node(graph: Graph, ids: Node, before: Node) -> Node:
    """The op's ``[B, N]`` document ids from ``ids``, shared by the sites that read the same ids (a packed
    model's layers): one tensor per forward, so a kernel's per-document work (the tile lists) is done once."""
    return _shared(graph, "id_rows", ids, before, lambda: graph.call_function(id_rows, (ids,)), (ids,))


def _view(graph: Graph, op: Operand) -> Node:
    node = op.node
    while REPLACED_BY in node.meta:  # an earlier site's output, replaced and erased since this site matched
        node = node.meta[REPLACED_BY]
    for name, args in op.steps:
        node = graph.call_method(name, (node, *args))
    return node


def _atom(graph: Graph, atom) -> Node:
    return graph.call_function(torch.logical_not, (atom.node,)) if atom.negated else atom.node


def _all(graph: Graph, nodes: list[Node]) -> Node | None:
    result = None
    for node in nodes:
        result = node if result is None else graph.call_function(torch.logical_and, (result, node))
    return result


def _flat_heads(match: Match) -> bool:
    """Whether the site's scores are [B*H, Nq, Nk] throughout: the op reads them as [B*H, 1, Nq, Nk]."""
    return match.frame is None and len(shape_of(match.anchor) or ()) == 3


def _rank4(shape: tuple[int, ...], match: Match) -> tuple[int, ...]:
    """A mask shape against [B*H, Nq, Nk] scores as a shape against the op's [B*H, 1, Nq, Nk]."""
    if _flat_heads(match) and len(shape) == 3:
        return apply_steps(shape, [("unsqueeze", (1,))])
    return shape


def _in_frame(graph: Graph, node: Node, shape: tuple, steps, q: Node, match: Match) -> Node:
    """A term ``node`` of ``shape`` brought to broadcast against the op's 4-D scores: its layout steps
    (a fold of windows reads the batch from ``q``), or unsqueezed against [B*H, 1, Nq, Nk]."""
    for name, args in steps:
        if name == "fold_windows":
            batch = graph.call_method("size", (q, 0))
            node = graph.call_function(fold_windows, (node, args[0], batch))
        else:
            node = graph.call_method(name, (node, *args))
    if not steps and _flat_heads(match) and len(shape or ()) == 3:
        return graph.call_method("unsqueeze", (node, 1))
    return node


def _scale(match: Match) -> float:
    if match.scale is not None:
        return float(match.scale)
    head_dim = tensor_meta(match.q.node).shape[-1]
    assert isinstance(head_dim, int), "detection rejects SDPA's default scale over a dynamic head dim"
    return 1.0 / math.sqrt(head_dim)
