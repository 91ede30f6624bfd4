"""Detection: find attention subgraphs in a dynamo FX graph.

Two anchors. A **softmax** over the last dim: walk up from it to the score
matmul ``q @ k^T`` through what does not change the math (casts, scale by
multiply or divide, additive masks, ``masked_fill`` / ``where`` fills), and
down to the value matmul ``probs @ v`` (through casts and dropout). An
**SDPA call** is a site by itself.

Each anchor yields a typed ``Match`` or a ``Rejection`` that names the reason
and the node at fault, so a site left alone can be explained. A match is only
made when the subgraph is closed: the scores and probabilities feed nothing
but the next step of the attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from attnopt.kernels.spec import Fill

from .graph import arg, constant_value, kind, shape_of, tensor_meta

#: a finite fill at or below this masks a key: exp(fill - s) underflows to 0 in
#: float32 for any score s above fill + 104, i.e. any real-world score
MASKING_FILL = -1e4


@dataclass(frozen=True)
class BooleanTerm:
    """A boolean mask applied by ``masked_fill`` or ``where``."""

    cond: Node
    keep_when_true: bool  # where(cond, s, fill) keeps on True; masked_fill(cond, fill) masks on True
    fill: float  # after any later scaling


@dataclass
class Match:
    anchor: Node
    kind: str  # "softmax" or "sdpa"
    q: Node
    k: Node
    v: Node
    output: Node  # the node whose uses the replacement takes over
    scale: float | None  # None: SDPA's default 1/sqrt(D)
    additive: list[tuple[Node, float]] = field(default_factory=list)  # (term, multiplier)
    booleans: list[BooleanTerm] = field(default_factory=list)
    fill: Fill = Fill.NEG_INF
    causal: bool = False
    softcap: float | None = None
    dropout_p: float = 0.0
    internal: list[Node] = field(default_factory=list)  # erased after the rewrite, in this order
    intermediates: list[Node] = field(default_factory=list)  # [B, H, Nq, Nk] tensors eager materializes


@dataclass(frozen=True)
class Rejection:
    anchor: Node
    reason: str
    at: Node


class _Reject(Exception):
    def __init__(self, reason: str, at: Node):
        super().__init__(reason)
        self.reason, self.at = reason, at


def find_sites(graph: Graph) -> list[Match | Rejection]:
    """Every softmax and SDPA anchor of ``graph``, matched or rejected, in graph order."""
    found: list[Match | Rejection] = []
    for node in list(graph.nodes):
        anchor_kind = kind(node)
        if anchor_kind not in ("softmax", "sdpa"):
            continue
        try:
            found.append(_match_sdpa(node) if anchor_kind == "sdpa" else _match_softmax(node))
        except _Reject as r:
            found.append(Rejection(node, r.reason, r.at))
    return found


# ------------------------------------------------------------------ softmax
def _match_softmax(softmax: Node) -> Match:
    scores_in = arg(softmax, 0, "input")
    dim = arg(softmax, 1, "dim")
    shape = shape_of(softmax)
    if shape is None or not isinstance(scores_in, Node):
        raise _Reject("softmax input is not a tensor computed in the graph", softmax)
    if dim is None or dim not in (-1, len(shape) - 1):
        raise _Reject(f"softmax over dim {dim}, not the last (key) dim: not attention", softmax)
    if len(shape) != 4:
        raise _Reject(f"softmax over {len(shape)}-D scores; attention scores are [B, H, Nq, Nk]", softmax)

    chain: list[Node] = [softmax]  # from softmax up to the score matmul
    steps: list[tuple] = []  # forward-order ops applied to the raw scores, built in reverse
    node = scores_in
    while kind(node) not in ("matmul",):
        step, node = _score_step(node)
        chain.append(step[-1])
        steps.append(step[:-1])
    score_mm = node
    chain.append(score_mm)
    q, k = _split_score_matmul(score_mm)

    down: list[Node] = []
    probs, dropout_p = softmax, 0.0
    while True:
        users = list(probs.users)
        if len(users) != 1:
            raise _Reject(
                "attention probabilities are used outside the value product (e.g. returned attention weights)",
                probs,
            )
        user = users[0]
        user_kind = kind(user)
        if user_kind == "cast":
            down.append(user)
            probs = user
            continue
        if user_kind == "dropout":
            p, training = arg(user, 1, "p", 0.5), arg(user, 2, "training", True)
            if not isinstance(p, (int, float)) or not isinstance(training, bool):
                raise _Reject("dropout with a traced probability or training flag", user)
            dropout_p = float(p) if training else 0.0
            down.append(user)
            probs = user
            continue
        if user_kind == "matmul" and user.args[0] is probs:
            value_mm = user
            break
        raise _Reject(f"probabilities go to {_describe(user)}, not to a product with values", user)
    v = value_mm.args[1]

    for node in chain[1:]:
        if len(node.users) != 1:
            raise _Reject("attention scores are used outside the attention", node)

    match = Match(anchor=softmax, kind="softmax", q=q, k=k, v=v, output=value_mm, scale=1.0)
    _interpret(match, list(reversed(steps)), softmax)
    _check_layout(match, score_mm)
    match.internal = [*reversed(down), softmax, *chain[1:], score_mm.args[1]]
    match.intermediates = [n for n in chain + down if shape_of(n) == shape]
    return match


def _score_step(node: Node) -> tuple[tuple, Node]:
    """One op between the scores and the softmax: ``(step..., node), producer of the scores``."""
    k = kind(node)
    if k == "cast":
        return ("cast", node), node.args[0]
    if k in ("mul", "div"):
        a, b = node.args[0], node.args[1]
        tensor, number = (a, constant_value(b)) if isinstance(a, Node) else (b, constant_value(a))
        if number is None or not isinstance(tensor, Node) or (k == "div" and tensor is not a):
            raise _Reject(f"scores are scaled by {_describe_value(b if tensor is a else a)}, not a number", node)
        return ("scale", number if k == "mul" else 1.0 / number, node), tensor
    if k == "add":
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            raise _Reject("a constant is added to the scores (softmax ignores it, but it is not a mask)", node)
        scores, term = (a, b) if _reaches_scores(a) else (b, a)
        if not _reaches_scores(scores):
            raise _Reject("neither operand of the mask add leads to a score matmul", node)
        return ("add", term, node), scores
    if k == "masked_fill":
        scores, cond, value = node.args[0], node.args[1], arg(node, 2, "value")
        return ("fill", BooleanTerm(cond, False, _fill_value(value, node)), node), scores
    if k == "where":
        cond, a, b = node.args[0], node.args[1], node.args[2]
        if isinstance(a, Node) and _reaches_scores(a):
            return ("fill", BooleanTerm(cond, True, _fill_value(b, node)), node), a
        if isinstance(b, Node) and _reaches_scores(b):
            return ("fill", BooleanTerm(cond, False, _fill_value(a, node)), node), b
        raise _Reject("torch.where between scores and softmax that selects no scores", node)
    if k == "tanh":
        return ("tanh", node), node.args[0]
    raise _Reject(f"{_describe(node)} between the scores and the softmax is not modelled", node)


def _reaches_scores(node: Node) -> bool:
    """Whether walking up through score steps from ``node`` reaches a matmul."""
    seen = 0
    while isinstance(node, Node) and seen < 64:
        if kind(node) == "matmul":
            return True
        try:
            _, node = _score_step(node)
        except _Reject:
            return False
        seen += 1
    return False


def _fill_value(value, node: Node) -> float:
    number = constant_value(value)
    if number is None:
        raise _Reject(f"mask fill value {_describe_value(value)} is not a constant", node)
    return number


def _interpret(match: Match, steps: list[tuple], at: Node) -> None:
    """Fold the forward-order score steps into scale, softcap, additive and boolean terms."""
    scale, softcap, pending_tanh = 1.0, None, False
    additive: list[tuple[Node, float]] = []
    booleans: list[BooleanTerm] = []
    for step in steps:
        op = step[0]
        if pending_tanh and op != "scale" and op != "cast":
            raise _Reject("tanh on the scores is not followed by a multiply (softcap)", at)
        if op == "cast":
            continue
        if op == "scale":
            c = step[1]
            if c <= 0 or not math.isfinite(c):
                raise _Reject(f"scores are scaled by {c}: only positive finite scales are attention", at)
            if pending_tanh:
                softcap, scale, pending_tanh = c, scale * c, False
                continue
            scale *= c
            additive = [(t, m * c) for t, m in additive]
            booleans = [BooleanTerm(b.cond, b.keep_when_true, b.fill * c) for b in booleans]
        elif op == "tanh":
            if additive or booleans or softcap is not None:
                raise _Reject("tanh applied after masking: not a softcap", at)
            pending_tanh = True
        elif op == "add":
            if any(b.fill != float("-inf") for b in booleans):
                raise _Reject(
                    "an additive mask follows a finite masked_fill: rows masked by both would not be exact", at
                )
            additive.append((step[1], 1.0))
        elif op == "fill":
            booleans.append(step[1])
    if pending_tanh:
        raise _Reject("tanh on the scores is not followed by a multiply (softcap)", at)
    fills = {b.fill == float("-inf") for b in booleans}
    for b in booleans:
        if b.fill != float("-inf") and not b.fill <= MASKING_FILL:
            raise _Reject(f"masked_fill value {b.fill:g} is too large to mask a key", b.cond)
    if len(fills) > 1:
        raise _Reject("the scores are filled with both -inf and a finite minimum", at)
    match.scale, match.softcap = scale, softcap
    match.additive, match.booleans = additive, booleans
    match.fill = Fill.FINITE if fills == {False} else Fill.NEG_INF


def _split_score_matmul(mm: Node) -> tuple[Node, Node]:
    """``(q, k)`` of ``q @ k.transpose(-2, -1)``."""
    a, b = mm.args[0], mm.args[1]
    if not isinstance(a, Node) or not isinstance(b, Node):
        raise _Reject("score matmul with a constant operand", mm)
    ndim = len(shape_of(b) or ())
    if kind(b) == "transpose":
        dims = {d % ndim for d in b.args[1:3]} if ndim else set()
        if dims == {ndim - 1, ndim - 2}:
            return a, b.args[0]
    raise _Reject(f"the key operand of the score matmul is {_describe(b)}, not k.transpose(-2, -1)", mm)


def _check_layout(match: Match, score_mm: Node) -> None:
    q, k, v = (shape_of(n) for n in (match.q, match.k, match.v))
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) == 4):
        raise _Reject("q, k, v are not [B, H, N, D] tensors", score_mm)
    if q[0] != k[0] or k[:3] != v[:3] or q[3] != k[3]:
        raise _Reject(f"q {q}, k {k}, v {v} do not agree on batch, heads, keys or head dim", score_mm)
    if q[1] != k[1]:
        raise _Reject(f"q has {q[1]} heads and k {k[1]}: heads are not paired", score_mm)
    dtypes = {tensor_meta(n).dtype for n in (match.q, match.k, match.v)}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise _Reject("q, k, v dtypes differ or are not floating point", score_mm)


# ------------------------------------------------------------------ SDPA
def _match_sdpa(node: Node) -> Match:
    q, k, v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    attn_mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = node.kwargs.get("enable_gqa", False)
    for name, value in (("dropout_p", dropout_p), ("is_causal", is_causal), ("scale", scale),
                        ("enable_gqa", enable_gqa)):
        if isinstance(value, Node):
            raise _Reject(f"SDPA {name} is computed in the graph, not a constant", node)
    match = Match(
        anchor=node, kind="sdpa", q=q, k=k, v=v, output=node, scale=None if scale is None else float(scale),
        fill=Fill.SAFE, causal=bool(is_causal), dropout_p=float(dropout_p), internal=[node],
    )
    if attn_mask is not None:
        meta = tensor_meta(attn_mask)
        if meta is None:
            raise _Reject("SDPA attn_mask is not a tensor", node)
        if meta.dtype == torch.bool:
            match.booleans = [BooleanTerm(attn_mask, True, float("-inf"))]
        else:
            match.additive = [(attn_mask, 1.0)]
    qs, ks, vs = (shape_of(n) for n in (q, k, v))
    if qs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise _Reject("SDPA on tensors that are not [B, H, N, D]", node)
    if qs[1] != ks[1] and not (enable_gqa and qs[1] % ks[1] == 0):
        raise _Reject(f"SDPA with {qs[1]} q heads and {ks[1]} kv heads without enable_gqa", node)
    return match


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _describe_value(value) -> str:
    return _describe(value) if isinstance(value, Node) else repr(value)
