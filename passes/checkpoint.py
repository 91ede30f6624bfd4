"""Activation-checkpointed regions: their attention is analysed with the masks the region receives.

Dynamo captures a ``torch.utils.checkpoint`` region as a higher-order op whose body is a subgraph. The
body receives its inputs as placeholders, so a mask built outside it (Hugging Face builds one 4D mask per
forward and hands it to every layer) reaches the body's attention as an opaque tensor: read alone, the body
sees a dense mask.

``lift_producers`` copies into the body the pure computation that makes such an input from the outer
graph's tensors (the ``aranges``, comparisons and ``torch.where`` of a causal padding mask), and passes the
tensors it starts from (the 2D ``attention_mask``) as new inputs of the region. The body's attention is then
analysed as if the mask were built in the layer. ``settle`` undoes what the rewrite did not use: every
remaining use of a copied mask goes back to the input the region received, copies nothing reads are
erased, and inputs nothing reads are dropped from the body and from the op; the outer mask is erased when
no region reads it any more. The checkpoint's recomputation in the backward runs the same body, so it
computes the same small tensors from the same inputs.

In a graph run as Python (``compiler="eager"``), ``run_as_python`` also replaces each region's higher-order op
by ``torch.utils.checkpoint`` on the body's own code. torch's eager implementation of that op runs the body
through an ``fx.Interpreter`` under a dispatch mode, and with ``preserve_rng_state=False`` (inductor restores
random state its own way): run eagerly, a dropout inside the region drew other masks in the backward's
recomputation than in the forward, so the gradients were not the original model's.

Only what is safe to run again is copied: ops on the analysis's list of pure functions, none written in
place anywhere in the graph, none requiring grad, at most ``MAX_COPIED`` of them per input. Anything else is
a boundary: passed in as it is.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from .graph import Mutations, _is_pure, is_in_place, tensor_meta
from .rewrite import erase_dead

#: the most nodes copied into a body for one of its inputs (a mask's construction takes a few dozen)
MAX_COPIED = 256
#: the placeholder meta a new input of a body takes from the outer node it receives (not dynamo's source of a
#: graph input, which would make it read as a module buffer)
_META_KEYS = ("example_value", "val", "tensor_meta")


@dataclasses.dataclass
class Lifted:
    """What ``lift_producers`` changed in one region, for ``settle``."""

    node: Node  # the higher-order op in the outer graph
    body: GraphModule
    roots: dict[Node, Node]  # copied root in the body -> the body's placeholder it stands for
    copied: list[Node]  # every node copied into the body, in order
    added: list[Node]  # new placeholders of the body (appended after the original ones)
    operands: dict[Node, Node]  # the body's placeholder -> the outer node the op passes to it


def lift_producers(gm: GraphModule, node: Node, body: GraphModule) -> Lifted | None:
    """Copy into ``body`` the pure producers of the inputs ``node`` (a checkpoint op of ``gm``) passes it.
    None when the op's operands do not line up with the body's placeholders (nothing is changed then)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = list(node.args[1:])
    if len(placeholders) != len(operands) or node.kwargs.keys() - {"use_reentrant", "preserve_rng_state",
                                                                    "context_fn", "determinism_check", "debug"}:
        return None
    first = next((n for n in body.graph.nodes if n.op != "placeholder"), None)
    if first is None:
        return None
    mutations = Mutations(gm.graph)
    lifted = Lifted(node, body, {}, [], [], dict(zip(placeholders, operands)))
    # an outer node the op already passes in is read through its placeholder, not copied
    outer_to_body: dict[Node, Node] = {o: p for p, o in zip(placeholders, operands) if isinstance(o, Node)}
    for placeholder, operand in zip(placeholders, operands):
        if not isinstance(operand, Node) or not _copyable(operand, mutations):
            continue
        closure = _closure(operand, mutations)
        if closure is None:
            continue
        for outer in closure:  # topological: an outer graph's node order
            if outer in outer_to_body and (outer is not operand or outer_to_body[outer] is not placeholder):
                continue
            for leaf in _inputs(outer):
                if leaf not in outer_to_body:
                    outer_to_body[leaf] = _add_input(lifted, leaf, placeholders[-1] if not lifted.added
                                                     else lifted.added[-1])
            with body.graph.inserting_before(first):
                copy = body.graph.node_copy(outer, lambda n: outer_to_body[n])
            outer_to_body[outer] = copy
            lifted.copied.append(copy)
        root = outer_to_body[operand]
        placeholder.replace_all_uses_with(root)
        lifted.roots[root] = placeholder
    return lifted if lifted.copied else None


def settle(gm: GraphModule, lifted: Lifted) -> None:
    """After the body's rewrite: the remaining uses of each copied root go back to the input it stands for,
    dead copies and unread new inputs are erased, and inputs the body no longer reads leave the body and the
    op; outer nodes that fed only those inputs are erased."""
    body = lifted.body
    for root, placeholder in lifted.roots.items():
        root.replace_all_uses_with(placeholder)
    erase_dead(body.graph, lifted.copied)
    touched = set(lifted.roots.values()) | set(lifted.added)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = [lifted.operands[p] for p in placeholders]
    keep = [not (p in touched and not p.users) for p in placeholders]
    for placeholder, kept in zip(placeholders, keep):
        if not kept:
            body.graph.erase_node(placeholder)
    node = lifted.node
    node.args = (node.args[0], *(o for o, kept in zip(operands, keep) if kept))
    erase_dead(gm.graph, [o for o, kept in zip(operands, keep) if not kept and isinstance(o, Node)])


def _copyable(node: Node, mutations: Mutations) -> bool:
    if node.op not in ("call_function", "call_method") or not _is_pure(node) or is_in_place(node):
        return False
    if node.is_impure() or mutations.is_mutated(node):
        return False
    meta = tensor_meta(node)
    return meta is None or not meta.requires_grad


def _closure(root: Node, mutations: Mutations) -> list[Node] | None:
    """The copyable ancestors of ``root`` (itself included) in graph order; None past ``MAX_COPIED`` or when a
    boundary input is written in place (the body would read it at another time than the original)."""
    seen: set[Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > MAX_COPIED:
            return None
        for arg in _inputs(node):
            if arg in seen:
                continue
            if _copyable(arg, mutations):
                stack.append(arg)
            elif mutations.is_mutated(arg):
                return None
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _inputs(node: Node) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return list(dict.fromkeys(found))


def _add_input(lifted: Lifted, outer: Node, after: Node) -> Node:
    """A new placeholder of the body, after ``after``, that the op fills with ``outer``."""
    body = lifted.body
    with body.graph.inserting_after(after):
        placeholder = body.graph.placeholder(f"lifted_{outer.name}")
    placeholder.meta.update({k: outer.meta[k] for k in _META_KEYS if k in outer.meta})
    lifted.added.append(placeholder)
    lifted.operands[placeholder] = outer
    node = lifted.node
    node.args = (*node.args, outer)
    return placeholder


def run_checkpointed(body, *args, **kwargs):
    """A checkpointed region of a graph run as Python: ``torch.utils.checkpoint`` of the body's own code, with
    the arguments the original call gave (random state preserved unless it said otherwise)."""
    return torch.utils.checkpoint.checkpoint(body, *args, **kwargs)


def run_as_python(gm: GraphModule, node: Node, body: GraphModule) -> None:
    """Make the checkpoint op ``node`` of ``gm`` (a graph run as Python) a ``run_checkpointed`` call: non-reentrant,
    as the op is, with the selective-checkpoint policy dynamo recorded on the body, if any."""
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("preserve_rng_state", "determinism_check", "debug")}
    kwargs["use_reentrant"] = False
    context_fn = body.meta.get("_checkpoint_context_fn")
    node.target = run_checkpointed if context_fn is None else _with_context(context_fn)
    node.kwargs = kwargs


def _with_context(context_fn):
    """``run_checkpointed`` with a selective-checkpoint policy bound: a named function, not a keyword argument of
    the node, since the graph's generated code cannot spell the policy (a ``functools.partial``) as a literal."""
    def run_checkpointed_selectively(body, *args, **kwargs):
        return run_checkpointed(body, *args, context_fn=context_fn, **kwargs)

    return run_checkpointed_selectively
