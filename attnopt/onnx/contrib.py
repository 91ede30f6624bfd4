"""``fuse(..., target="onnxruntime")``: sites as ONNX Runtime's ``com.microsoft.MultiHeadAttention``.

ONNX Runtime's CPU kernel for its contrib ``MultiHeadAttention`` reads key padding as a
``[B, Nk]`` int32 mask and a causal band as an attribute, so the float mask that the standard
``Attention`` operator needs (``[B, 1, Nq, Nk]``, built per graph) and the per-site patch of rows
with no visible key are both left out; without any mask it takes a tiled (flash) path. One site of
4 heads of 16, one thread: 1.06 ms against the standard operator's 1.15 ms unmasked at 512
tokens, 21.8 against 23.3 ms with key padding at 2048.

The kernel computes ``softmax(scale * q k^T + m) v`` with ``m`` equal to ``mask_filter_value`` on
every key hidden by the padding mask or (``unidirectional``) ahead of the query, and 0 elsewhere,
so it is exact where:

* a hidden key's value is one the original's fill agrees with: with ``mask_filter_value`` the
  lowest float32, a row with no visible key holds that value on every key and averages the values,
  as a finite fill does in the original (``Fill.FINITE``, ``Fill.FINITE_ADDED``); a row with a
  visible key gives the others weight 0 either way. Rows that cannot die (no padding) take any fill;
* the mask is key padding (one bit per batch row and key) and at most a top-left causal band on
  ``Nq == Nk`` (the kernel's band has no offset and no window);
* q, k and v are the projections' ``[B, N, H * D]`` values with as many kv heads as q heads and one
  head size, in float32.

Everything else keeps the standard operator, with the reason in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx.numpy_helper import to_array as numpy_array

from attnopt.kernels.spec import NAN_FILLS, Fill

from .emit import Band, Emitter, _split_heads
from .pack import graph_index, projection

#: where ONNX Runtime's contrib operators live, and the version of that domain they are in
DOMAIN = "com.microsoft"
DOMAIN_VERSION = 1
#: what ``fuse(target=...)`` emits: the standard operator, or ONNX Runtime's where that is exact
TARGETS = ("onnx", "onnxruntime")

#: the lowest float32: a row holding it on every key averages the values, as a finite fill does
LOWEST = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class ContribSite:
    """What decides whether a site can be one ``MultiHeadAttention`` node."""

    elem_type: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    heads_merged: bool
    band: Band
    square: bool  # Nq == Nk for every input
    key_padding: bool  # the keep terms are key padding: size 1 along heads and queries
    dense: bool  # keep terms that vary along the queries, or document ids
    additive: bool
    softcap: bool
    fill: Fill


def contrib_reasons(site: ContribSite) -> list[str]:
    """Why ``MultiHeadAttention`` would not compute this site's function (empty: it would)."""
    reasons = []
    if site.elem_type != onnx.TensorProto.FLOAT:
        reasons.append("q/k/v are not float32")
    if site.q_heads != site.kv_heads:
        reasons.append(f"grouped-query attention ({site.q_heads} q heads, {site.kv_heads} kv heads)")
    if site.head_dim != site.v_head_dim:
        reasons.append(f"v's head size {site.v_head_dim} differs from q's {site.head_dim}")
    if not site.heads_merged:
        reasons.append("q/k/v are not [B, N, H * D] projections (the operator reads no [B, H, N, D] query)")
    if site.band.window is not None:
        reasons.append("a sliding window (the operator has none)")
    elif site.band.causal and not site.square:
        reasons.append("a causal band with Nq != Nk possible (the operator's band has no offset)")
    if site.dense:
        reasons.append("a mask that is not key padding")
    if site.additive:
        reasons.append("an additive mask or bias (a row it pushes to the fill would not average as the original)")
    if site.softcap:
        reasons.append("a softcap")
    rows_can_die = site.key_padding
    if rows_can_die and site.fill not in (Fill.FINITE, Fill.FINITE_ADDED):
        outcome = "NaN" if site.fill in NAN_FILLS else "zeros"
        reasons.append(f"a row with no visible key is {outcome} in the original and the mean of the values here")
    return reasons


def emit_multi_head_attention(e: Emitter, q, k, v, *, site: ContribSite, keep: list, batch, key_length,
                              scale: float):
    """``Y [B, Hq, Nq, Dv]`` for q/k/v ``[B, N, H * D]``; ``keep``: key-padding bool values, each of
    size 1 along everything but batch and keys; ``batch``, ``key_length``: 1-D int64 ``[B]``, ``[Nk]``."""
    assert not contrib_reasons(site), contrib_reasons(site)
    i64 = onnx.TensorProto.INT64
    inputs = [q, k, v]
    if keep:
        keep_all = keep[0]
        for term in keep[1:]:
            keep_all = e("And", keep_all, term)
        padding = e("Reshape", e("Cast", keep_all, to=onnx.TensorProto.INT32), e.constant([0, -1], i64))
        padding = e("Expand", padding, e("Concat", batch, key_length, axis=0))  # [B, Nk], 1 = visible
        inputs += ["", padding]
    attributes = {"num_heads": site.q_heads, "scale": float(scale), "mask_filter_value": LOWEST}
    if site.band.causal:
        attributes["unidirectional"] = 1
    y = e("MultiHeadAttention", *inputs, domain=DOMAIN, **attributes)  # [B, Nq, Hq * Dv]
    return e("Transpose", _split_heads(e, y, site.q_heads, site.v_head_dim), perm=[0, 2, 1, 3])


def absorb_projections(graph: onnx.GraphProto, taken: set[str],
                       same_rows: Callable[[str, str, int], bool]) -> list[str]:
    """Each ``MultiHeadAttention`` node whose q, k and v are projections of one ``x [B, N, E]`` by
    constant weights, as one ``com.microsoft.Attention`` node that computes the three with one GEMM by
    the weights side by side (the bias, zeros when there is none, added in that GEMM). The projections
    are three ``x @ W (+ b)``, or one ``Gemm`` of ``x`` viewed as ``[B * N, E]`` split in three equal
    parts (GPT-2's ``c_attn``), where ``same_rows(x, q, E)`` proves x is ``[B, N, E]`` and q ``[B, N, ..]``. ONNX Runtime
    runs the same attention kernel on both; one site of 4 heads of 16 with key padding at 512 tokens,
    one thread: 1.47 against 1.52 ms for the projections and ``MultiHeadAttention``, 1.52 against 1.65
    with a causal band.

    Returns the names of the nodes replaced (each keeps its name and output).
    """
    producer, consumers, inits, outputs = graph_index(graph)
    absorbed, replacements = [], {}
    for node in graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != DOMAIN:
            continue
        assert len(node.input) < 4 or not node.input[3], "attnopt's MultiHeadAttention nodes take no bias"
        q, k, v = node.input[:3]
        if not all(_read_by_alone(value, node, consumers, outputs) for value in (q, k, v)):
            continue
        packed = (_separate_projections(q, k, v, producer, consumers, inits, outputs)
                  or _split_projection(q, k, v, producer, consumers, inits, outputs))
        if packed is None or packed[1].dtype != np.float32 or not same_rows(packed[0], q, packed[1].shape[0]):
            continue
        x, weight_qkv, bias_qkv = packed
        stem = f"{node.name}/qkv"
        weight, bias = f"{stem}/weight", f"{stem}/bias"
        assert weight not in taken and bias not in taken, "attnopt names its own nodes uniquely"
        taken.update((weight, bias))
        graph.initializer.append(onnx.numpy_helper.from_array(weight_qkv, weight))
        graph.initializer.append(onnx.numpy_helper.from_array(bias_qkv, bias))
        for value in (q, k, v):  # Shape over [B, N] reads x, whose leading dims are the projection's
            for reader in consumers.get(value, []):
                if reader is not node:
                    reader.input[0] = x
        padding = node.input[4] if len(node.input) > 4 else ""
        merged = onnx.helper.make_node("Attention", [x, weight, bias, padding], list(node.output), name=node.name,
                                       domain=DOMAIN)
        merged.attribute.extend(node.attribute)  # num_heads, scale, mask_filter_value, unidirectional
        replacements[node.name] = merged
        absorbed.append(node.name)
    nodes = [replacements.get(n.name, n) if n.op_type == "MultiHeadAttention" else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return absorbed


def _read_by_alone(value: str, reader: onnx.NodeProto, consumers, outputs) -> bool:
    """Whether ``reader`` and ``Shape`` nodes over ``value``'s first two axes are all that read it."""
    if value in outputs:
        return False
    for other in consumers.get(value, []):
        span = {a.name: a.i for a in other.attribute}
        if other is not reader and (other.op_type != "Shape" or span.get("start", 0) not in (0, 1)
                                    or span.get("end") not in (1, 2)):
            return False
    return True


def _separate_projections(q, k, v, producer, consumers, inits, outputs):
    """``(x, W [E, 3 E'], b [3 E'])`` when q, k and v are ``x @ W (+ b)`` of one ``x``."""
    found = []
    for value in (q, k, v):
        node = producer.get(value)
        if node is not None and node.op_type == "Add":  # a bias add after the MatMul
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
        p = projection(node, consumers, inits, outputs) if node is not None and node.op_type == "MatMul" else None
        if p is None or p.output != value:
            return None
        found.append(p)
    if len({p.matmul.input[0] for p in found}) != 1 or len({(p.weight.shape, p.weight.dtype) for p in found}) != 1:
        return None  # cross attention, or projections of different sizes
    biases = [p.bias if p.bias is not None else np.zeros(p.weight.shape[1], p.weight.dtype) for p in found]
    return found[0].matmul.input[0], np.concatenate([p.weight for p in found], axis=1), np.concatenate(biases)


def _split_projection(q, k, v, producer, consumers, inits, outputs):
    """``(x, W, b)`` when q, k and v are the three equal parts of ``Gemm(x viewed as [B * N, E], W, b)``
    viewed back as ``[B, N, 3 E']`` (whether those views keep x's ``[B, N]`` is the caller's to prove)."""
    split = producer.get(q)
    if split is None or split.op_type != "Split" or list(split.output) != [q, k, v]:
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in split.attribute}
    sizes = None
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in inits:
            return None
        sizes = numpy_array(inits[split.input[1]])
    if attributes.get("axis", 0) not in (2, -1) or (sizes is None and attributes.get("num_outputs") != 3):
        return None
    unflatten = producer.get(split.input[0])
    gemm = producer.get(unflatten.input[0]) if unflatten is not None and unflatten.op_type == "Reshape" else None
    if gemm is None or gemm.op_type != "Gemm" or gemm.input[1] not in inits:
        return None
    flatten = producer.get(gemm.input[0])
    gemm_attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    if (flatten is None or flatten.op_type != "Reshape" or gemm_attributes.get("transA", 0)
            or gemm_attributes.get("alpha", 1.0) != 1.0 or gemm_attributes.get("beta", 1.0) != 1.0):
        return None
    weight = numpy_array(inits[gemm.input[1]])
    weight = weight.T if gemm_attributes.get("transB", 0) else weight  # [E, 3 E']
    if weight.ndim != 2 or weight.shape[1] % 3 or (sizes is not None and sizes.tolist() != [weight.shape[1] // 3] * 3):
        return None
    bias = np.zeros(weight.shape[1], weight.dtype)
    if len(gemm.input) > 2 and gemm.input[2]:
        if gemm.input[2] not in inits:
            return None
        bias = numpy_array(inits[gemm.input[2]])
        if bias.size == 1 or bias.shape[-1] != weight.shape[1] or bias.size != weight.shape[1]:
            return None
        bias = bias.reshape(-1)
    for value in (gemm.output[0], unflatten.output[0]):
        if value in outputs or len(consumers.get(value, [])) != 1:
            return None
    return flatten.input[0], weight, bias.astype(weight.dtype)
