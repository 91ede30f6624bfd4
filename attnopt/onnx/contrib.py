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

import numpy as np
import onnx

from attnopt.kernels.spec import Fill

from .emit import Band, Emitter, _split_heads

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
        outcome = "NaN" if site.fill == Fill.NEG_INF else "zeros"
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
