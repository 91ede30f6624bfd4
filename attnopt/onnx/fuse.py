"""``fuse``: replace decomposed attention in an existing ONNX graph with ``Attention`` nodes.

Detection is attnopt's own: the ONNX graph is imported as an FX view
(``view.import_onnx``), ``find_sites`` runs on it exactly as on a dynamo
graph, and each match is mapped back to ONNX values. The replacement is built
by the same ``emit_attention`` as the exporter's, placed where the value
product was (its output name is kept, so consumers are unchanged), and the
now-dead score chain is removed.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os

import onnx
import onnx.version_converter
import torch
from torch.fx import Node as FxNode

from attnopt.kernels.spec import Align, Fill
from attnopt.passes.detect import Match, Rejection, find_sites
from attnopt.passes.graph import shape_of, tensor_meta
from attnopt.passes.layouts import apply_steps
from attnopt.report import Site

from .contrib import (
    DOMAIN,
    DOMAIN_VERSION,
    TARGETS,
    ContribSite,
    absorb_projections,
    contrib_reasons,
    emit_multi_head_attention,
)
from .emit import MIN_OPSET, TORCH_TO_ONNX, Band, NodeEmitter, check_opset, default_opset, emit_attention
from .pack import pack_projections
from .position_bias import read_in_bodies, rewrite_position_biases
from .report import OnnxReport
from .runtime_fusions import fuse_for_onnxruntime
from .view import OnnxView, import_onnx

#: q/k/v element types the Attention operator takes
ATTENTION_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
#: the operators a fused site becomes
ATTENTION_OPS = ("Attention", "MultiHeadAttention")  # standard or com.microsoft Attention


def fuse(model_or_path: onnx.ModelProto | str | os.PathLike, *, opset: int = MIN_OPSET,
         dims: dict[str, int] | None = None, verify: bool = False, pack_qkv: bool = False,
         target: str = "onnx", runtime_fusions: bool | None = None,
         report: OnnxReport | None = None) -> onnx.ModelProto:
    """A copy of the model with every attention site found replaced by one ``Attention`` node.

    ``dims`` sets the sizes of symbolic input dims used to analyze (and, with
    ``verify=True``, to run) the graph. Sites that are found but cannot be
    replaced stay decomposed and are listed, with the reason, in ``report``.
    ``pack_qkv=True`` also merges the projections of a fused site's q, k and v
    that read the same input into one ``MatMul`` and a ``Split`` (``pack.py``).
    ``target="onnxruntime"`` emits ONNX Runtime's ``com.microsoft.MultiHeadAttention`` where it
    computes the site's function exactly (``com.microsoft.Attention``, projections included, where q,
    k and v are projections of one input), and the standard operator elsewhere (``contrib.py``); the
    report names the operator of each site and, for the standard one, why. With that target the rest
    of the graph also goes through onnxscript's ONNX Runtime fusions that are exact and measured faster
    (Gelu, BiasGelu, RMS normalization: ``runtime_fusions.py``); ``runtime_fusions=False`` leaves it as
    it was. A relative position bias that provably depends on ``j - i`` alone (T5's buckets) is computed
    once per offset, not once per query/key pair (``position_bias.py``).
    """
    check_opset(opset)
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {', '.join(map(repr, TARGETS))}: pass \"onnx\" for "
                         "the standard Attention operator or \"onnxruntime\" for ONNX Runtime's where exact")
    if runtime_fusions is None:
        runtime_fusions = target == "onnxruntime"
    elif not isinstance(runtime_fusions, bool):
        raise TypeError(f"runtime_fusions={runtime_fusions!r} is not a bool: pass True, False or leave it out")
    elif runtime_fusions and target != "onnxruntime":
        raise ValueError("runtime_fusions=True emits ONNX Runtime's own operators, which target=\"onnx\" "
                         "(standard operators only) rules out: pass target=\"onnxruntime\" with it")
    source = model_or_path if isinstance(model_or_path, onnx.ModelProto) else _load(model_or_path)
    report = OnnxReport() if report is None else report
    report.opset, report.graphs = opset, report.graphs + 1
    source = at_opset(source, opset)
    view = import_onnx(source, dims)
    model = onnx.ModelProto()
    model.CopyFrom(view.model)

    replacements: dict[str, list[onnx.NodeProto]] = {}  # ONNX value of a site's output -> nodes producing it
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    shared: dict[bytes, str] = {}  # mask work built once per graph, whichever site asks first
    operands: list[tuple[str, ...]] = []  # q, k and v as each replaced site's attention node reads them
    contrib_sites: dict[str, int] = {}  # MultiHeadAttention node -> its row in report.sites
    for found in find_sites(view.gm.graph):
        anchor = view.onnx_name.get(found.anchor, found.anchor.name)
        where = view.node_of[anchor].name or anchor if anchor in view.node_of else anchor
        if isinstance(found, Rejection):
            report.sites.append(Site(where=where, node=anchor, graph=0, replaced=False,
                                     reason=f"{found.reason} [at {view.onnx_name.get(found.at, found.at.name)}]"))
            continue
        site, nodes = _replace(view, found, opset, where, anchor, taken, shared, target)
        report.sites.append(site)
        contrib_sites.update((n.name, len(report.sites) - 1) for n in nodes if n.op_type == "MultiHeadAttention")
        if nodes:
            replacements[view.onnx_name[found.output]] = nodes
            operands.append(tuple(next(n for n in nodes if n.op_type in ATTENTION_OPS).input[:3]))

    _splice(model.graph, replacements)
    _remove_dead(model.graph)  # the decomposed chains no longer read q, k and v
    for name in absorb_projections(model.graph, taken, _rows_of(view)):
        row = contrib_sites[name]
        report.sites[row] = dataclasses.replace(
            report.sites[row], kernel=f"onnx:{DOMAIN}.Attention",
            reason=f"fused with its q/k/v projections into one {DOMAIN}.Attention node")
    _remove_dead(model.graph)  # the projections now computed inside com.microsoft.Attention nodes
    if pack_qkv:
        report.packed = pack_projections(model.graph, operands, taken)
    report.position_biases = rewrite_position_biases(model)  # T5's bucketed bias computed once per offset
    _remove_dead(model.graph)
    _sort(model.graph)  # a site may use mask work placed with a later site
    _set_opset(model, opset)
    if runtime_fusions:
        model, report.runtime_fusions = fuse_for_onnxruntime(model)
    report.attention_nodes = sum(n.op_type in ATTENTION_OPS for n in model.graph.node)
    if verify:
        from .verify import compare_onnx

        report.max_diff = compare_onnx(source, model, dims=dims)
    return model


def _load(path) -> onnx.ModelProto:
    try:
        return onnx.load(os.fspath(path))
    except FileNotFoundError:
        raise ValueError(f"input model {os.fspath(path)!r} is not a file") from None
    except Exception as err:  # protobuf's DecodeError and friends
        raise ValueError(f"cannot read {os.fspath(path)!r} as an ONNX model ({type(err).__name__}: "
                         f"{str(err).strip()[:80]})") from None


def _replace(view: OnnxView, match: Match, opset: int, where: str, anchor: str, taken: set[str],
             shared: dict[bytes, str], target: str = "onnx"):
    """The report row of ``match`` and the nodes computing its output (none when it stays decomposed)."""
    m = match.masks
    q_shape, k_shape, v_shape = match.q.shape(), match.k.shape(), match.v.shape()
    q_meta = tensor_meta(match.q.node)
    elem_type = TORCH_TO_ONNX.get(q_meta.dtype)
    described = dict(
        where=where, node=anchor, graph=0, causal=match.causal or m.causal, mask_terms=m.mask_terms,
        cross=q_shape[2] != k_shape[2], q_heads=q_shape[1], kv_heads=k_shape[1], q_len=q_shape[2],
        kv_len=k_shape[2], head_dim=q_shape[3], dtype=str(q_meta.dtype),
    )
    reason = None
    if elem_type not in ATTENTION_TYPES:
        reason = f"q/k/v are {q_meta.dtype}: the Attention operator takes float32, float16 or bfloat16"
    elif match.dropout_p > 0.0:
        reason = f"dropout p={match.dropout_p} in training mode: the Attention operator has no dropout"
    elif any(step in ("unflatten", "flatten") for step, _ in
             [s for op in (match.q, match.k, match.v) for s in op.steps] + list(match.output_steps)):
        reason = "scores viewed between [B*H, N, N] and [B, H, N, N] are not fused in ONNX yet"
    elif m.viewed:
        reason = "mask terms added to a view of the scores ([B*H] or per-window) are not fused in ONNX yet"
    elif Fill(m.fill) == Fill.FINITE_REPLACED_ADDED:
        reason = ("a band replaced by finfo.min, then key padding added (GPT-2's masks): rows that see no key "
                  "average the keys masked once, which the Attention operator's mask cannot say; not fused yet")
    elif (m.causal or m.window is not None) and not _band_spans_scores(match):
        reason = ("the causal/window band is read from index ranges whose lengths are not provably the "
                  "query and key lengths (a range of length 1 broadcasts to every position)")
    if reason is not None:
        return Site(replaced=False, reason=reason, **described), []

    output = view.onnx_name[match.output]
    e = NodeEmitter(f"attnopt/{output}", lambda name: name in taken, shared)
    name = view.onnx_name.__getitem__
    merged = [_heads_merged(op, heads) for op, heads in ((match.q, q_shape[1]), (match.k, k_shape[1]),
                                                         (match.v, v_shape[1]))]
    if None in merged:
        q, k, v = (_operand(e, name(op.node), op.steps, len(shape_of(op.node))) for op in (match.q, match.k, match.v))
    else:
        q, k, v = (name(node) for node in merged)
    rank3 = len(shape_of(match.anchor) or ()) == 3

    def rank4(value, source):
        if rank3 and len(shape_of(source) or ()) == 3:
            return e("Unsqueeze", value, e.constant([1], onnx.TensorProto.INT64))
        return value

    def atom(a):
        return e("Not", name(a.node)) if a.negated else name(a.node)

    keep = [rank4(atom(a), a.node) for a in [*m.key_padding, *m.dense]]
    if m.documents is not None:
        keep.append(e("Equal", name(m.documents[0]), name(m.documents[1])))
    additive = []
    for node, mult in m.additive:
        term = name(node)
        if view.dtypes.get(term, elem_type) != elem_type:
            term = e("Cast", term, to=elem_type)
        if mult != 1.0:
            term = e("Mul", term, e.constant(float(mult), elem_type))
        additive.append(rank4(term, node))
    scale = match.scale if match.scale is not None else 1.0 / math.sqrt(q_shape[3])
    nq, nk = _length(match.q), _length(match.k)
    lengths = tuple(_length_value(e, view, n) for n in (nq, nk))
    keep_by_key = not m.dense and m.documents is None and all(
        (meta := tensor_meta(a.node)) is not None and meta.dim() >= 2 and _same(meta.shape[-2], 1)
        for a in m.key_padding
    )
    mask_spans_scores = any(
        (meta := tensor_meta(node)) is not None and meta.dim() >= 2
        and _same(meta.shape[-2], nq) and _same(meta.shape[-1], nk)
        for node in [a.node for a in [*m.key_padding, *m.dense]] + [node for node, _ in m.additive]
    )
    band = Band(causal=match.causal or m.causal, window=m.window, align=Align(m.align))
    contrib = ContribSite(
        elem_type=elem_type, q_heads=q_shape[1], kv_heads=k_shape[1], head_dim=q_shape[3], v_head_dim=v_shape[3],
        heads_merged=None not in merged, band=band, square=_same(nq, nk), key_padding=bool(m.key_padding),
        dense=not keep_by_key or not all(_by_batch_and_key(a.node) for a in m.key_padding),
        additive=bool(additive), softcap=match.softcap is not None, fill=Fill(m.fill),
    )
    declined = contrib_reasons(contrib) if target == "onnxruntime" else []
    if target == "onnxruntime" and not declined:
        key_length = lengths[1] if lengths[1] is not None else e("Shape", k, start=1, end=2)  # k: [B, Nk, H * D]
        y = emit_multi_head_attention(e, q, k, v, site=contrib, keep=keep, batch=e("Shape", q, start=0, end=1),
                                      key_length=key_length, scale=scale)
        kernel, how = f"onnx:{DOMAIN}.MultiHeadAttention", f"fused into one {DOMAIN}.MultiHeadAttention node"
    else:
        y = emit_attention(
            e, q, k, v, elem_type=elem_type, q_heads=q_shape[1], kv_heads=k_shape[1], v_head_dim=v_shape[3],
            opset=opset, keep=keep, additive=additive, band=band,
            scale=scale, softcap=match.softcap, fill=Fill(m.fill),
            lengths=None if None in lengths else lengths, square=_same(nq, nk), keep_by_key=keep_by_key,
            heads_merged=None not in merged, mask_spans_scores=mask_spans_scores,
        )
        kernel, how = "onnx:Attention", "fused into one ONNX Attention node"
        if target == "onnxruntime":
            how += f" ({DOMAIN}.MultiHeadAttention would not be exact: {'; '.join(declined)})"
    y = _operand(e, y, match.output_steps, 4)
    want = TORCH_TO_ONNX[tensor_meta(match.output).dtype]
    if want != elem_type:
        y = e("Cast", y, to=want)
    assert e.nodes[-1].output[0] == y, "the last node emitted computes the site's output"
    del e.shared[next(k for k, v in e.shared.items() if v == y)]  # renamed: no longer reusable by that name
    e.nodes[-1].output[0] = output
    taken.update(o for n in e.nodes for o in n.output)
    site = Site(replaced=True, reason=how, kernel=kernel, **described)
    return site, e.nodes


def _rows_of(view: OnnxView):
    """``same_rows(x, y, width)``: whether x is ``[B, N, width]`` and y ``[B, N, ..]``, symbolically."""
    fx_node = {name: node for node, name in view.onnx_name.items()}

    def same_rows(x: str, y: str, width: int) -> bool:
        shapes = [shape_of(fx_node[v]) if v in fx_node else None for v in (x, y)]
        if any(s is None or len(s) != 3 for s in shapes):
            return False
        (b, n, e), (b2, n2, _) = shapes
        return _same(b, b2) and _same(n, n2) and _same(e, width)

    return same_rows


def _band_spans_scores(match: Match) -> bool:
    """Whether every mask term built from ``Range`` positions spans the scores' ``[Nq, Nk]``, symbolically.

    The mask algebra reads ``Range(0, n)`` as the position along the axis it sits on; that holds when
    ``n`` is that axis' length for every input, not when a length-1 range broadcasts. A term's inferred
    shape keeps a range's symbolic length unless it was broadcast against a different one.
    """
    nq, nk = _length(match.q), _length(match.k)
    for term in [b.cond for b in match.booleans] + [node for node, _ in match.additive]:
        if not _reads_positions(term):
            continue
        meta = tensor_meta(term)
        if meta is None or meta.dim() < 2 or not (_same(meta.shape[-2], nq) and _same(meta.shape[-1], nk)):
            return False
    return True


def _by_batch_and_key(node) -> bool:
    """Whether a key-padding term, read against the scores' ``[B, H, Nq, Nk]``, has size 1 along heads
    and queries (its batch size, when it has one, is then q's or 1)."""
    meta = tensor_meta(node)
    return meta is not None and 2 <= meta.dim() <= 4 and all(_same(d, 1) for d in meta.shape[-3:-1])


def _length(op) -> object:
    return apply_steps(tuple(tensor_meta(op.node).shape), op.steps)[2]


def _heads_merged(op, heads: int) -> FxNode | None:
    """The ``[B, N, H * D]`` value an operand ``[B, H, N, D]`` is a reshape and transpose of, if it is one."""
    perm, node = [0, 1, 2, 3], op.node
    if len(shape_of(node) or ()) != 4:
        return None
    for step, args in reversed(op.steps):
        if step == "permute":
            perm = [int(args[0][i]) for i in perm]
        elif step == "transpose":
            swap = list(range(4))
            a, b = (int(d) % 4 for d in args)
            swap[a], swap[b] = swap[b], swap[a]
            perm = [swap[i] for i in perm]
        else:
            return None
    while node.op == "call_method" and node.target == "permute" and len(node.args) == 5:
        perm = [int(node.args[1 + i]) for i in perm]
        node = node.args[0]
    if perm != [0, 2, 1, 3] or node.op != "call_method" or node.target != "reshape":
        return None
    source = node.args[0]
    split, merged = shape_of(node), shape_of(source) if isinstance(source, FxNode) else None
    if split is None or merged is None or len(split) != 4 or len(merged) != 3:
        return None
    if not (_same(split[2], heads) and all(_same(a, b) for a, b in zip(merged, (split[0], split[1],
                                                                                 split[2] * split[3])))):
        return None
    return source


def _length_value(e: NodeEmitter, view: OnnxView, size) -> str | None:
    """``[size]`` as a 1-D int64 value read from a graph input (or a constant), so that every site of
    that length shares it and the mask work built from it; None where no input has that dim."""
    static = size if isinstance(size, int) else size.node.maybe_as_int()
    if static is not None:
        return e.constant([static], onnx.TensorProto.INT64)
    source = view.dim_sources.get(size.node.expr)
    if source is None:
        return None
    name, axis = source
    return e("Shape", name, start=axis, end=axis + 1)


def _same(a, b) -> bool:
    difference = a - b
    return (difference if isinstance(difference, int) else difference.node.maybe_as_int()) == 0


def _reads_positions(node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, FxNode):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.arange:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _operand(e: NodeEmitter, value: str, steps, rank: int) -> str:
    """Apply layout steps (``transpose``, ``permute``, ``unsqueeze``, ``squeeze``) to a rank-``rank`` value."""
    i64 = onnx.TensorProto.INT64
    for step, args in steps:
        if step == "unsqueeze":
            value = e("Unsqueeze", value, e.constant([int(args[0])], i64))
            rank += 1
        elif step == "squeeze":
            value = e("Squeeze", value, e.constant([int(args[0])], i64))
            rank -= 1
        elif step == "permute":
            value = e("Transpose", value, perm=[int(d) for d in args[0]])
        elif step == "transpose":
            perm = list(range(rank))
            a, b = (d % rank for d in args)
            perm[a], perm[b] = perm[b], perm[a]
            value = e("Transpose", value, perm=perm)
        else:
            raise AssertionError(f"unknown layout step {step}")
    return value


def _splice(graph: onnx.GraphProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each site's nodes where its value product was, in place of that product."""
    nodes = []
    for node in graph.node:
        site = next((replacements[o] for o in node.output if o in replacements), None)
        nodes.extend(site if site is not None else [node])
    del graph.node[:]
    graph.node.extend(nodes)


def _sort(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each follows its inputs' producers, keeping the given order where it can."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits = [{producer[x] for x in _reads(n) if x in producer} - {i} for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waits):
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waits) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users.get(i, ()):
            waits[u].discard(i)
            if not waits[u]:
                heapq.heappush(ready, u)
    assert len(order) == len(nodes), "the fused graph has a cycle"
    del graph.node[:]
    graph.node.extend(order)


def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, those its subgraphs (If / Loop bodies) read from outside included."""
    names = set(node.input)
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in sub.node:
                names |= _reads(inner)
    return names


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes (and initializers) whose outputs nothing uses any more, reads inside ``If`` / ``Loop`` /
    ``Scan`` bodies included (a body reads the outer graph's values by name, not as node inputs)."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input} | read_in_bodies(graph)
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [vi for vi in graph.value_info if vi.name in used]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` with its standard ops converted to ``opset`` (a graph mixing opsets does not load:
    ``ReduceMean`` takes its axes as an input from opset 18)."""
    current = default_opset(model)
    if current > opset:
        raise ValueError(f"the model is at opset {current}, above opset={opset}: pass opset={current} or higher")
    if current == opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as err:  # the converter raises its own error types
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot convert the model from opset {current} to {opset} ({message}); convert it "
                         f"with onnx.version_converter or re-export it at opset {opset}") from err


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
            break
    else:
        model.opset_import.append(onnx.helper.make_opsetid("", opset))
    if any(n.domain == DOMAIN for n in model.graph.node) and all(e.domain != DOMAIN for e in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
        list(model.opset_import), ignore_unknown=True))
