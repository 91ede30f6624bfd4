"""``export``: a PyTorch model to ONNX with one standard ``Attention`` node per attention site.

The model is captured by dynamo (``torch._dynamo.export``: one graph, the
model's own signature, parameters as attributes), rewritten by attnopt's
pipeline so that every attention site is one ``attnopt::attention`` call, and
handed to ``torch.onnx.export(dynamo=True)`` with a translation of that op
into ONNX (``emit.emit_attention``). Sites that cannot be replaced stay
decomposed and are listed in the report.
"""

from __future__ import annotations

import os
from typing import Any

import onnx
import torch

from attnopt.config import Options
from attnopt.passes.pipeline import optimize_graph
from attnopt.passes.plan import EXPORT_META

from attnopt.kernels.spec import Align, Fill, Window

from .emit import MIN_OPSET, Band, ScriptEmitter, check_opset, emit_attention
from .report import OnnxReport


def export(
    model: torch.nn.Module, args: tuple = (), f: str | os.PathLike | None = None, *, kwargs: dict | None = None,
    opset: int = MIN_OPSET, dynamic_shapes: Any = None, verify: bool = False, report: OnnxReport | None = None,
) -> onnx.ModelProto:
    """Export ``model(*args, **kwargs)`` to ONNX, attention as ``Attention`` nodes; save to ``f`` if given.

    ``dynamic_shapes`` is torch.export's (e.g. ``{"x": {0: Dim("B"), 1: Dim("N")}}``).
    ``verify=True`` runs ONNX Runtime on ``args`` and records the largest
    difference to the model's own output in ``report.max_diff``. Pass an
    ``OnnxReport()`` as ``report`` to see every site.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"export takes a torch.nn.Module, got {type(model).__name__}")
    check_opset(opset)
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    report = OnnxReport() if report is None else report
    report.opset = opset

    gm = capture(model, args, kwargs, dynamic_shapes)
    gm.train(model.training)
    gm.meta[EXPORT_META] = True  # inference only: no site is kept for its gradients
    # an export replaces every supported site: this machine's timings say nothing of the runtime's
    optimize_graph(gm, Options.build(tune=False, keep_original=False), report)
    report.sanitize()
    _check_inference(gm)
    program = torch.onnx.export(
        gm, args, kwargs=kwargs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        custom_translation_table={torch.ops.attnopt.attention.default: translation(opset)},
        verbose=False, report=False,
    )
    proto = program.model_proto
    _broadcast_rotary_caches(proto.graph)
    report.attention_nodes = sum(n.op_type == "Attention" for n in proto.graph.node)
    if f is not None:
        onnx.save(proto, os.fspath(f))
    if verify:
        from .verify import compare_torch

        report.max_diff = compare_torch(model, proto, args, kwargs)
    return proto


def _broadcast_rotary_caches(graph: onnx.GraphProto) -> None:
    """Expand the cos/sin caches of ``RotaryEmbedding`` nodes without position ids to the batch of ``x``.

    The exporter's rotary fusion passes caches computed for one row of positions (``[1, N, D/2]``, HF's
    ``position_ids`` of batch 1); ONNX Runtime requires their batch to equal the input's. Expanding is
    exact: every row uses the same positions.
    """
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type == "RotaryEmbedding" and node.domain in ("", "ai.onnx") and len(
                [i for i in node.input if i]) == 3:
            count += 1
            prefix = f"attnopt/rotary{count}"
            batch = onnx.helper.make_node("Shape", [node.input[0]], [f"{prefix}/batch"], start=0, end=1)
            nodes.append(batch)
            for slot in (1, 2):
                rest = onnx.helper.make_node("Shape", [node.input[slot]], [f"{prefix}/{slot}/rest"], start=1)
                target = onnx.helper.make_node("Concat", [batch.output[0], rest.output[0]],
                                               [f"{prefix}/{slot}/shape"], axis=0)
                expanded = onnx.helper.make_node("Expand", [node.input[slot], target.output[0]],
                                                 [f"{prefix}/{slot}/cache"])
                nodes.extend([rest, target, expanded])
                node.input[slot] = expanded.output[0]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.fx.GraphModule:
    """One dynamo graph of ``model`` (an optimized model's code as written) with the model's calling convention and
    fake-tensor metadata.

    Convolution backends are off while tracing, as torch.export has them: choosing one reads the batch
    size (oneDNN below 16), and that choice would become a guard bounding a dynamic batch dim.
    """
    from attnopt.api import written_forward  # (attnopt.api imports this package's users)

    try:
        with (torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False),
              torch.backends.cudnn.flags(enabled=False), written_forward(model)):
            return torch._dynamo.export(
                model, dynamic_shapes=dynamic_shapes, assume_static_by_default=True,
            )(*args, **kwargs).graph_module
    except torch._dynamo.exc.UserError as err:
        raise ValueError(f"the model cannot be captured as one graph for export: {err}") from err


def _check_inference(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.target is torch.ops.attnopt.attention.default and node.args[14] > 0.0:
            raise ValueError(
                f"attention site {node.name} applies dropout p={node.args[14]}: ONNX Attention has no dropout; "
                "call model.eval() before exporting"
            )


def translation(opset: int):
    """The torch.onnx translation of ``attnopt::attention`` at ``opset`` (a trace-only onnxscript function)."""

    def attention(q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                  window_right, softcap, dropout_p, fill, kernel):
        e = ScriptEmitter(opset)
        i64 = onnx.TensorProto.INT64
        keep, additive = [], []
        if key_padding is not None:
            if key_padding.dtype == onnx.TensorProto.BOOL:
                keep_bk = key_padding  # [B, Nk]
            else:  # valid lengths [B]
                nk = e("Squeeze", e("Shape", k, start=2, end=3), e.constant([0], i64))
                cols = e("Range", e.constant(0, i64), nk, e.constant(1, i64))
                keep_bk = e("Less", e("Unsqueeze", cols, e.constant([0], i64)),
                            e("Unsqueeze", e("Cast", key_padding, to=i64), e.constant([1], i64)))
            keep.append(e("Unsqueeze", keep_bk, e.constant([1, 2], i64)))  # [B, 1, 1, Nk]
        if q_doc is not None:
            keep.append(e("Equal", e("Unsqueeze", q_doc, e.constant([1, 3], i64)),
                          e("Unsqueeze", kv_doc, e.constant([1, 2], i64))))  # [B, 1, Nq, Nk]
        for term in (bias, mask):
            if term is None:
                continue
            if term.dtype == onnx.TensorProto.BOOL:
                keep.append(term)
            else:
                additive.append(term if term.dtype == q.dtype else e("Cast", term, to=int(q.dtype)))
        window = None if window_left is None and window_right is None else Window(window_left, window_right)
        keep_by_key = q_doc is None and all(t is None or t.dtype != onnx.TensorProto.BOOL for t in (bias, mask))
        y = emit_attention(
            e, q, k, v, elem_type=int(q.dtype), q_heads=int(q.shape[1]), kv_heads=int(k.shape[1]),
            v_head_dim=int(v.shape[3]), opset=opset, keep=keep, additive=additive,
            band=Band(causal=bool(causal), window=window, align=Align(align)), scale=scale, softcap=softcap,
            fill=Fill(fill), keep_by_key=keep_by_key,
        )
        # the rewritten graphs use only the output; lse and seed are placeholders (NaN, 0) for the op's arity
        lse_type = onnx.TensorProto.DOUBLE if q.dtype == onnx.TensorProto.DOUBLE else onnx.TensorProto.FLOAT
        lse = e("ConstantOfShape", e("Shape", q, end=3),
                value=onnx.helper.make_tensor("value", lse_type, [1], [float("nan")]))
        seed = e.constant([0], i64)
        return y, lse, seed

    return attention
