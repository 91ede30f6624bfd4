"""Normalize fused module calls into forms detection understands.

Dynamo keeps ``nn.MultiheadAttention`` (and the ``nn.Transformer*`` layers built
on it) as one opaque ``F.multi_head_attention_forward`` call. This pass inlines
each such call as PyTorch computes it — input projections, heads split to
``[B, H, N, D]``, the masks, attention, output projection — with the attention
written as ``F.scaled_dot_product_attention`` (what PyTorch runs when the
weights are not needed) or, when ``need_weights=True`` but the weights are
never used, as the explicit ``softmax(q k^T) v`` PyTorch then computes (whose
fully-masked rows are NaN, not 0). Detection then finds the attention like any
other, with its key padding and masks.

Calls this pass cannot inline exactly (``bias_k``/``bias_v``, ``add_zero_attn``,
``static_k``/``static_v``, unbatched inputs, returned weights) are left alone
and reported with the reason.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node
from torch._dispatch.python import enable_python_dispatcher

from .graph import tensor_meta

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass(frozen=True)
class Skipped:
    node: Node
    reason: str


class _Builder:
    """Creates graph nodes and records their fake values, so later passes see shapes."""

    def __init__(self, graph: Graph, fake_mode):
        self.graph, self.fake_mode = graph, fake_mode

    def call(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        self._meta(node, target, args, kwargs)
        return node

    def method(self, name: str, *args, **kwargs) -> Node:
        node = self.graph.call_method(name, args, kwargs)
        self._meta(node, lambda self_, *a, **k: getattr(self_, name)(*a, **k), args, kwargs)
        return node

    def _meta(self, node, fn, args, kwargs):
        def value(a):
            return a.meta.get("example_value") if isinstance(a, Node) else a

        # under the Python dispatcher, as dynamo computes its fake values: composite ops (F.linear on a strided
        # input) then keep symbolic sizes, where their C++ decomposition asks for concrete ones and guards on them
        with self.fake_mode, enable_python_dispatcher():
            node.meta["example_value"] = fn(*torch.fx.node.map_aggregate(args, value),
                                            **torch.fx.node.map_aggregate(kwargs, value))


def inline_multi_head_attention(graph: Graph) -> list[Skipped]:
    """Inline every ``F.multi_head_attention_forward`` call that can be inlined exactly."""
    skipped = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        call = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
        call.apply_defaults()
        reason = _unsupported(node, call.arguments)
        if reason:
            skipped.append(Skipped(node, reason))
            continue
        fake_mode = tensor_meta(call.arguments["query"]).fake_mode
        with graph.inserting_before(node):
            out = _inline(_Builder(graph, fake_mode), node, call.arguments)
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
    return skipped


def _unsupported(node: Node, a: dict) -> str | None:
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"nn.MultiheadAttention with {name} is not supported yet"
    if a["add_zero_attn"]:
        return "nn.MultiheadAttention with add_zero_attn is not supported yet"
    if any(not isinstance(a[n], (bool, int, float)) for n in ("training", "need_weights", "dropout_p", "is_causal")):
        return "nn.MultiheadAttention with traced flags"
    meta = tensor_meta(a["query"])
    if meta is None or meta.dim() != 3:
        return "nn.MultiheadAttention on unbatched inputs"
    if not isinstance(meta.shape[2], int):
        return "nn.MultiheadAttention with a symbolic embedding size"
    if a["is_causal"] and a["attn_mask"] is None:
        return "nn.MultiheadAttention with is_causal=True and no attn_mask (PyTorch raises: it needs the mask)"
    weights_used = any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)
    if a["need_weights"] and weights_used:
        return "attention weights are returned (need_weights=True and used)"
    return None


def _size(b: _Builder, x: Node, dim: int):
    """``x``'s size along ``dim``: the number where it is static, else a ``size`` node. A symbolic size taken from
    the fake value would print as its symbol, which after dynamo's automatic-dynamic recompile is not always one the
    graph binds (its placeholder may be another symbol found equal): the graph would fail with a NameError."""
    size = tensor_meta(x).shape[dim]
    return size if isinstance(size, int) else b.method("size", x, dim)


def _times(b: _Builder, x, y):
    return x * y if isinstance(x, int) and isinstance(y, int) else b.call(operator.mul, x, y)


def _inline(b: _Builder, node: Node, a: dict) -> Node:
    """PyTorch's multi_head_attention_forward for [L, N, E] inputs, attention left for detection."""
    query, key, value = a["query"], a["key"], a["value"]
    tgt_len, bsz = _size(b, query, 0), _size(b, query, 1)
    embed_dim = tensor_meta(query).shape[2]  # static: _unsupported leaves symbolic ones alone
    src_len = _size(b, key, 0)
    heads = a["num_heads"]
    head_dim = embed_dim // heads
    # one projection per input (PyTorch packs them when q, k, v are one tensor; the products are the
    # same), so that each of q, k, v depends only on its own input and cross-attention is visible
    if a["use_separate_proj_weight"]:
        weights = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        weights = _chunks(b, a["in_proj_weight"])
    biases = _chunks(b, a["in_proj_bias"]) if a["in_proj_bias"] is not None else (None, None, None)
    q, k, v = (b.call(F.linear, x, w, bias) for x, w, bias in zip((query, key, value), weights, biases))

    def heads_first(x, length):  # [L, N, E] -> [N, H, L, D]
        x = b.method("view", x, length, _times(b, bsz, heads), head_dim)
        return b.method("view", b.method("transpose", x, 0, 1), bsz, heads, length, head_dim)

    q, k, v = heads_first(q, tgt_len), heads_first(k, src_len), heads_first(v, src_len)
    # PyTorch's is_causal hint: without key padding and weights, SDPA runs causal (top-left) and attn_mask is
    # dropped, whatever it holds; otherwise the hint is dropped and attn_mask used
    causal = bool(a["is_causal"]) and a["key_padding_mask"] is None and not a["need_weights"]
    mask = None if causal else _merged_mask(b, a, bsz, heads, tgt_len, src_len, tensor_meta(query).dtype)
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    if a["need_weights"]:  # weights unused: the explicit softmax path, whose masked rows are NaN
        scores = b.call(operator.matmul, b.call(operator.mul, q, head_dim ** -0.5), b.method("transpose", k, -2, -1))
        if mask is not None:
            scores = (b.call(operator.add, scores, mask) if tensor_meta(mask).is_floating_point()
                      else b.method("masked_fill", scores, b.call(torch.logical_not, mask), float("-inf")))
        probs = b.call(F.softmax, scores, dim=-1)
        if dropout_p > 0.0:
            probs = b.call(F.dropout, probs, p=dropout_p, training=True)
        attn = b.call(operator.matmul, probs, v)
    else:
        attn = b.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    attn = b.method("reshape", b.method("permute", attn, 2, 0, 1, 3), _times(b, tgt_len, bsz), embed_dim)
    out = b.call(F.linear, attn, a["out_proj_weight"], a["out_proj_bias"])
    return b.method("view", out, tgt_len, bsz, embed_dim)


def _chunks(b: _Builder, packed: Node) -> tuple[Node, Node, Node]:
    chunks = b.method("chunk", packed, 3)
    return tuple(b.call(operator.getitem, chunks, i) for i in range(3))


def _bool_source(mask):
    """The bool mask behind nn.MultiheadAttention's float conversion ``zeros_like(m).masked_fill_(m, -inf)``."""
    if (isinstance(mask, Node) and mask.op == "call_method" and mask.target in ("masked_fill", "masked_fill_")
            and isinstance(mask.args[0], Node) and mask.args[0].target is torch.zeros_like
            and mask.args[0].args[0] is mask.args[1] and mask.args[2] == float("-inf")):
        return mask.args[1]
    return mask


def _merged_mask(b: _Builder, a: dict, bsz: int | Node, heads: int, tgt_len: int | Node, src_len: int | Node, dtype):
    """The SDPA mask of ``[N, H or 1, L or 1, S]``: bool keep masks AND-ed, float masks added as PyTorch does."""
    kpm, attn_mask = _bool_source(a["key_padding_mask"]), _bool_source(a["attn_mask"])
    terms = []
    if attn_mask is not None:
        meta = tensor_meta(attn_mask)
        if meta.dim() == 3:  # [N * H, L, S]
            attn_mask = b.method("view", attn_mask, bsz, heads, tgt_len, src_len)
        terms.append(attn_mask)
    if kpm is not None:
        terms.append(b.method("view", kpm, bsz, 1, 1, src_len))
    if not terms:
        return None
    if all(tensor_meta(t).dtype == torch.bool for t in terms):
        keeps = [b.call(torch.logical_not, t) for t in terms]  # MHA's True means "masked"
        mask = keeps[0]
        for keep in keeps[1:]:
            mask = b.call(torch.logical_and, mask, keep)
        return mask
    floats = [
        b.call(torch.where, t, float("-inf"), 0.0) if tensor_meta(t).dtype == torch.bool
        else b.method("to", t, dtype)
        for t in terms
    ]
    mask = floats[0]
    for f in floats[1:]:
        mask = b.call(operator.add, mask, f)
    return mask
