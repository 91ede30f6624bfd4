"""DTensor sharding rules of ``attnopt::attention`` and its backward.

Attention is independent per (batch, head): with q, k, v sharded on the batch dim or on
the head dim, each shard is the attention of its own rows, so the op runs locally on
each shard's tensors. The terms follow: key padding and document rows are sharded with
the batch and replicated across heads; an additive bias or mask is sharded on the dim
it has (a broadcast dim stays replicated) and its gradient, summed over a broadcast dim
the shards split, is ``Partial`` (a sum over the shards). Grouped-query heads shard only
when every shard keeps whole groups: both head counts divisible by the mesh size, or one
k/v head (replicated to every shard). The sequence dim is not shardable here: that is
context parallelism (``context.py``).

The rules are registered when this module is imported (by ``attnopt.distributed``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from attnopt import ops  # noqa: F401  (registers the ops these rules are for)

def _term_dim(term, axis: int, size: int) -> int | None:
    """The dim of ``term`` (broadcastable to ``[B, H, Nq, Nk]``) that runs along ``axis`` with ``size``
    entries, or None when the term broadcasts over it."""
    if term is None:
        return None
    dim = axis - (4 - len(term.shape))
    return dim if dim >= 0 and term.shape[dim] == size and size > 1 else None


def _term_placement(term, axis: int, size: int):
    if term is None:
        return None
    dim = _term_dim(term, axis, size)
    return Replicate() if dim is None else Shard(dim)


def _strategies(q, k, key_padding, q_doc, kv_doc, bias, mask):
    """``(axis, q placement, k/v placement, [key_padding, q_doc, kv_doc, bias, mask] placements)`` per
    shardable axis (0 batch, 1 heads)."""
    batch, q_heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]
    shards = q.mesh.size()
    found = []
    rows = [None if t is None else (Shard(0) if t.shape[0] == batch and batch > 1 else Replicate())
            for t in (key_padding, q_doc, kv_doc)]
    found.append((0, Shard(0), Shard(0), [*rows, _term_placement(bias, 0, batch), _term_placement(mask, 0, batch)]))
    if q_heads % shards == 0 and (kv_heads % shards == 0 or kv_heads == 1):
        kv = Shard(1) if kv_heads % shards == 0 and kv_heads > 1 else Replicate()
        replicated = [None if t is None else Replicate() for t in (key_padding, q_doc, kv_doc)]
        found.append((1, Shard(1), kv, [*replicated, _term_placement(bias, 1, q_heads), _term_placement(mask, 1, q_heads)]))
    return found


def _forward_rule(q, k, v, key_padding, q_doc, kv_doc, bias, mask, *params):
    replicated = [Replicate(), Replicate(), Replicate()] + [None if t is None else Replicate()
                                                           for t in (key_padding, q_doc, kv_doc, bias, mask)]
    rules = [([Replicate(), Replicate(), Replicate()], replicated + [None] * len(params))]
    for _axis, q_place, kv_place, terms in _strategies(q, k, key_padding, q_doc, kv_doc, bias, mask):
        rules.append(([q_place, q_place, Replicate()], [q_place, kv_place, kv_place, *terms] + [None] * len(params)))
    return rules


def _grad_placement(term, placement, needed: bool):
    """A term's gradient: sharded like the term, a sum over shards where the term was broadcast."""
    if not needed or term is None:
        return Replicate()  # an empty placeholder tensor
    return Partial() if isinstance(placement, Replicate) else placement


def _backward_rule(grad_out, q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, *params):
    needs_bias_grad, needs_mask_grad = params[-2], params[-1]
    terms_all = [key_padding, q_doc, kv_doc, bias, mask]
    replicated_terms = [None if t is None else Replicate() for t in terms_all]
    rules = [([Replicate()] * 5, [Replicate()] * 7 + replicated_terms + [None] * len(params))]
    for axis, q_place, kv_place, terms in _strategies(q, k, key_padding, q_doc, kv_doc, bias, mask):
        outputs = [q_place, kv_place, kv_place, _grad_placement(bias, terms[3], needs_bias_grad),
                   _grad_placement(mask, terms[4], needs_mask_grad)]
        if axis == 1 and isinstance(kv_place, Replicate):
            outputs[1] = outputs[2] = Partial()  # every shard's q heads read the one k/v head
        inputs = [q_place, q_place, kv_place, kv_place, q_place, q_place, Replicate(), *terms]
        rules.append((outputs, inputs + [None] * len(params)))
    return rules


register_sharding(torch.ops.attnopt.attention.default)(_forward_rule)
register_sharding(torch.ops.attnopt.attention_backward.default)(_backward_rule)
