"""Rewrite: replace each matched attention subgraph with one ``torch.ops.attnopt.attention`` call.

For a match the pass builds the op's inputs from the match's terms (boolean
terms AND-ed into one keep mask, additive terms scaled and summed), inserts the
call before the old value product, hands its uses over, and erases the
attention's now-dead intermediates. The graph is linted and recompiled by the
caller once all sites are done.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from attnopt.kernels.spec import AttentionSpec

from .detect import Match
from .graph import hint, shape_of, tensor_meta


def spec_of(match: Match) -> AttentionSpec:
    """The AttentionSpec of a match, on the fake tensors dynamo recorded (for planning and reports)."""
    q, k, v = (tensor_meta(n) for n in (match.q, match.k, match.v))
    keep = tensor_meta(match.booleans[0].cond) if match.booleans else None
    additive = [tensor_meta(t) for t, _ in match.additive]
    if keep is not None:
        mask, bias = keep, (additive[0] if additive else None)
    else:
        mask, bias = (additive[0] if additive else None), (additive[1] if len(additive) > 1 else None)
    head_dim = shape_of(match.q)[-1]
    spec = AttentionSpec.from_tensors(
        _concrete(q), _concrete(k), _concrete(v),
        scale=_scale(match, head_dim), causal=match.causal,
        bias=None if bias is None else _concrete(bias), mask=None if mask is None else _concrete(mask),
        softcap=match.softcap, dropout_p=match.dropout_p, fill=match.fill,
        requires_grad=any(t.requires_grad for t in (q, k, v)),
    )
    return spec.with_(device=q.device)


def replace(graph: Graph, match: Match, kernel: str) -> Node:
    """Insert the op call for ``match`` running ``kernel``; returns the node now producing the output."""
    head_dim = shape_of(match.q)[-1]
    with graph.inserting_before(match.output):
        keep = None
        for term in match.booleans:
            cond = term.cond if term.keep_when_true else graph.call_function(torch.logical_not, (term.cond,))
            keep = cond if keep is None else graph.call_function(torch.logical_and, (keep, cond))
        additive = [
            t if m == 1.0 else graph.call_function(operator.mul, (t, m)) for t, m in match.additive
        ]
        if keep is not None:
            mask, rest = keep, additive
        else:
            mask, rest = (additive[0] if additive else None), additive[1:]
        bias = None
        for term in rest:
            bias = term if bias is None else graph.call_function(operator.add, (bias, term))
        call = graph.call_function(
            torch.ops.attnopt.attention.default,
            (
                match.q, match.k, match.v, None, None, None, bias, mask,
                _scale(match, head_dim), match.causal, "top_left", None, None, match.softcap,
                match.dropout_p, match.fill.value, kernel,
            ),
        )
        out = graph.call_function(operator.getitem, (call, 0))
        want = tensor_meta(match.output).dtype
        if want != tensor_meta(match.q).dtype:
            out = graph.call_method("to", (out, want))
    match.output.replace_all_uses_with(out)
    for node in dict.fromkeys([match.output, *match.internal]):
        if node.graph is graph and not node.users:
            graph.erase_node(node)
    return out


def _scale(match: Match, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if match.scale is None else float(match.scale)


def _concrete(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of the fake tensor's concrete (hinted) shape: planning needs only metadata."""
    return torch.empty([hint(s) for s in t.shape], dtype=t.dtype, device="meta")
