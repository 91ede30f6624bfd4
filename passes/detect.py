"""Detection: find attention subgraphs in a dynamo FX graph.

Two anchors. A **softmax** over the last dim: walk up from it to the score
product ``q @ k^T`` (matmul, bmm, baddbmm or einsum, any layout) through what
does not change the math (casts, scale by multiply or divide, softcap's
``tanh(s / c) * c``, additive masks, ``masked_fill`` / ``where`` fills), and
down to the value product ``probs @ v`` (through casts and dropout). An **SDPA
call** is a site by itself.

Each anchor yields a typed ``Match`` or a ``Rejection`` that names the reason
and the node at fault, so a site left alone can be explained. A match is only
made when the subgraph is closed: the scores and probabilities feed nothing
but the next step of the attention. The masks of a match are then classified
by ``masks.analyze`` into AttentionSpec terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch._guards import TracingContext
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_bool, statically_known_true

from attnopt.kernels.spec import NAN_FILLS, Fill

from . import masks
from .graph import (ArgumentError, Constants, bind, constant_value, hint, kind, same_sizes, shape_of, sizes_of,
                    static_number, tensor_meta)
from .layouts import LayoutError, Operand, Step, fold_gqa, score_einsum, to_rank4, untransposed, value_einsum
from .symbolic import static_int


@dataclass(frozen=True)
class BooleanTerm:
    """A boolean mask applied by ``masked_fill`` or ``where``."""

    cond: Node
    keep_when_true: bool  # where(cond, s, fill) keeps on True; masked_fill(cond, fill) masks on True
    fill: float  # after any later scaling
    local: tuple | None = None  # shape of the scores it masks, when a view of the site's scores
    before_add: bool = False  # a finite fill that an additive term follows (it replaced scores the term adds to)
    filled_at: torch.dtype | None = None  # dtype of the scores it fills (the precision the fill is stored at)


#: the dropout probability sites are planned with when the graph reads it at run time: any value > 0 selects
#: kernels that support dropout, which also compute p = 0
PLANNED_DROPOUT = 0.5


def _is_float_scalar(node: Node) -> bool:
    """Whether ``node`` produces a Python float at run time (``p.item()`` of a 0-d float input, say)."""
    value = node.meta.get("example_value")
    return isinstance(value, (float, torch.SymFloat))


@dataclass
class Match:
    anchor: Node
    kind: str  # "softmax" or "sdpa"
    q: Operand
    k: Operand
    v: Operand
    output: Node  # the node whose uses the replacement takes over
    output_steps: tuple[Step, ...] = ()  # layout steps from the op's [B, H, Nq, Dv] to the output's
    scale: float | None = 1.0  # None: SDPA's default 1/sqrt(D)
    softcap: float | None = None
    dropout_p: float = 0.0
    # a probability the graph reads at run time (dynamo makes a changed ``Dropout.p`` an input): passed to the
    # op per call; ``dropout_p`` is then the value planned with (kernels that support dropout)
    dropout_node: Node | None = None
    causal: bool = False  # SDPA's is_causal (folded into ``masks`` by the analysis)
    booleans: list[BooleanTerm] = field(default_factory=list)
    additive: list[tuple[Node, float]] = field(default_factory=list)  # (term, multiplier)
    masks: masks.MaskAnalysis | None = None
    kv_group: int = 1  # K/V heads were repeated this many times in the original
    nan_to_zero: bool = False  # the probabilities' NaN rows were set to 0 (ONNX exports of masked SDPA)
    add_dtypes: dict = field(default_factory=dict)  # additive term -> dtype of the scores it was added to
    add_locals: dict = field(default_factory=dict)  # additive term -> shape of the scores it was added to
    internal: list[Node] = field(default_factory=list)  # erased after the rewrite, in this order
    intermediates: list[Node] = field(default_factory=list)  # [.., Nq, Nk] tensors eager materializes
    reads: tuple[Node, ...] = ()  # buffers whose captured values the proof used: guarded at run time
    # facts about symbolic sizes and scalars the proof used beyond what the shape environment proves (a captured
    # scale, heads divisible into groups): guarded once the site matches, so dynamo recompiles when one fails
    assumed: tuple[torch.SymBool, ...] = ()
    frame: tuple | None = None  # [B, H, Nq, Nk] of scores the site views as [B*H, Nq, Nk] and back

    @property
    def fill(self) -> Fill:
        return self.masks.fill


@dataclass(frozen=True)
class Rejection:
    anchor: Node
    reason: str
    at: Node


FUSED_LAYER_REASON = (
    "PyTorch's fused inference fast path of nn.TransformerEncoderLayer / nn.MultiheadAttention (already a "
    "fused attention kernel, opaque to attnopt); with gradients enabled or in training the layer runs "
    "its regular path, which attnopt rewrites"
)


class _Reject(Exception):
    def __init__(self, reason: str, at: Node):
        super().__init__(reason)
        self.reason, self.at = reason, at


def find_sites(graph: Graph, inputs: dict[Node, torch.Tensor] | None = None) -> list[Match | Rejection]:
    """Every softmax and SDPA anchor of ``graph``, matched or rejected, in graph order.

    ``inputs`` are real values of the graph's placeholders (the example inputs);
    with them, masks built from buffers can be proven causal or windowed.
    """
    constants = Constants(graph, inputs)
    found: list[Match | Rejection] = []
    for node in list(graph.nodes):
        anchor_kind = _anchor_kind(node)
        if anchor_kind == "fused_layer":
            found.append(Rejection(node, FUSED_LAYER_REASON, node))
            continue
        if anchor_kind not in ("softmax", "sdpa"):
            continue
        constants.begin()
        try:
            match = _match_sdpa(node, constants) if anchor_kind == "sdpa" else _match_softmax(node, constants)
            _analyze_masks(match, constants)
            _check_read_order(match, constants)
            match.reads = tuple(constants.used)
            _guard(match.assumed, node)
            found.append(match)
        except _Reject as r:
            found.append(Rejection(node, r.reason, r.at))
        except ArgumentError as err:
            found.append(Rejection(node, str(err), node))
    return found


def _guard(facts: tuple[torch.SymBool, ...], at: Node) -> None:
    """Guard the facts a match assumed that the shape environment does not prove, so that dynamo recompiles
    the graph when one stops holding. Guards reach dynamo only while it captures the graph (its backend
    runs): elsewhere (an exported graph, an ONNX model) an unproven fact leaves the site alone."""
    pending = [fact for fact in facts if not statically_known_true(fact)]
    if pending and TracingContext.try_get() is None:
        raise _Reject(f"the match assumes {', '.join(str(f) for f in pending)} of symbolic values, which is guarded "
                      "only while torch.compile captures the graph", at)
    for fact in pending:
        guard_bool(fact)


# ------------------------------------------------------------------ softmax spellings
_SAFE_SOFTMAX = (torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)
_PRODUCTS = ("matmul", "einsum", "baddbmm")


@dataclass(frozen=True)
class _Softmax:
    """A softmax as written: ``F.softmax``, ``aten._safe_softmax`` or ``exp(s - max(s)) / sum(...)``."""

    scores: Node
    dim: object
    dtype: torch.dtype | None
    internal: tuple[Node, ...] = ()  # the decomposition's nodes below the anchor, erase order
    readers: tuple[Node, ...] = ()  # the nodes that read the scores
    safe: bool = False  # rows of -inf only are 0, not NaN (SDPA's safe softmax)


def _anchor_kind(node: Node) -> str | None:
    if node.op == "call_function" and node.target in _SAFE_SOFTMAX:
        return "softmax"
    k = kind(node)
    if k == "div" and _decomposed_softmax(node) is not None:
        return "softmax"
    return k


def _read_softmax(node: Node) -> _Softmax:
    if node.op == "call_function" and node.target in _SAFE_SOFTMAX:
        call = bind(node, ("input", "dim", "dtype"), {"dtype": None})
        return _Softmax(call["input"], call["dim"], call["dtype"], readers=(node,), safe=True)
    decomposed = _decomposed_softmax(node)
    if decomposed is not None:
        return decomposed
    names = ("input", "dim", "_stacklevel", "dtype") if node.target is F.softmax else ("input", "dim", "dtype")
    call = bind(node, names, {"dim": None, "dtype": None, "_stacklevel": 3})
    return _Softmax(call["input"], call["dim"], call["dtype"], readers=(node,))


def _decomposed_softmax(div: Node) -> _Softmax | None:
    """``e / e.sum(d, keepdim=True)`` with ``e = exp(s - s.amax(d, keepdim=True))`` (or ``s.max(d, keepdim=True)[0]``,
    detached or not), each intermediate read only by the next: the same function as ``softmax(s, d)``,
    NaN on rows of -inf included."""
    try:
        return _read_decomposed(div)
    except ArgumentError:
        return None


def _read_decomposed(div: Node) -> _Softmax | None:
    if len(div.args) != 2 or div.kwargs:
        return None
    e, total = div.args
    if not (_is_call(total, "sum") and _is_call(e, "exp")) or set(e.users) != {div, total} or len(total.users) != 1:
        return None
    summed = bind(total, ("input", "dim", "keepdim", "dtype"), {"keepdim": False, "dtype": None})
    bind(e, ("input",))
    x = e.args[0]
    if summed["input"] is not e or summed["keepdim"] is not True or summed["dtype"] is not None:
        return None
    if kind(x) != "sub" or len(x.users) != 1:
        return None
    sub = bind(x, ("input", "other", "alpha"), {"alpha": 1})
    scores, top = sub["input"], sub["other"]
    if sub["alpha"] != 1 or not isinstance(scores, Node) or not isinstance(top, Node) or len(top.users) != 1:
        return None
    internal = [total, e, x]
    if _is_call(top, "detach") and len(top.args) == 1 and not top.kwargs:
        internal.append(top)
        top = top.args[0]
        if len(top.users) != 1:
            return None
    if _is_call(top, "amax"):
        reduce, reader = top, top
    elif kind(top) == "getitem" and top.args[1] == 0 and _is_call(top.args[0], "max") and len(top.args[0].users) == 1:
        internal.append(top)
        reduce, reader = top.args[0], top.args[0]
    else:
        return None
    internal.append(reduce)
    call = bind(reduce, ("input", "dim", "keepdim"), {"keepdim": False})
    rank = len(shape_of(scores) or ())
    dims = {d % rank if isinstance(d, int) and rank else None for d in (summed["dim"], call["dim"])}
    dims |= {d[0] % rank for d in (summed["dim"], call["dim"]) if isinstance(d, (tuple, list)) and len(d) == 1}
    dims.discard(None)
    if call["input"] is not scores or call["keepdim"] is not True or dims != {rank - 1}:
        return None
    if any(isinstance(d, (tuple, list)) and len(d) != 1 for d in (summed["dim"], call["dim"])):
        return None
    return _Softmax(scores, -1, None, internal=tuple(internal), readers=(x, reader))


def _is_call(node, name: str) -> bool:
    """``torch.<name>(x, ...)`` or ``x.<name>(...)``."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and node.target is getattr(torch, name, None)


# ------------------------------------------------------------------ softmax
def _refuse_narrowed_softmax(score_mm: Node, scores_in: Node, dtype, softmax: Node) -> None:
    """A softmax computed in a narrower dtype than the score product (float64 scores, ``dtype=torch.float32``)
    rounds the scores first, and turns a float64 ``finfo.min`` fill into ``-inf`` (NaN rows where a float64
    kernel averages): not the function the kernels compute in the product's dtype."""
    product, given = tensor_meta(score_mm), tensor_meta(scores_in)
    if product is None or given is None:
        return
    computed = dtype if dtype is not None else given.dtype
    if computed.is_floating_point and torch.finfo(computed).bits < torch.finfo(product.dtype).bits:
        raise _Reject(f"softmax in {computed} on {product.dtype} scores rounds them first (a {product.dtype} "
                      f"finfo.min fill becomes -inf): left as written; compute the softmax in {product.dtype}",
                      softmax)


def _match_softmax(softmax: Node, constants: Constants) -> Match:
    sm = _read_softmax(softmax)
    scores_in, dim, dtype = sm.scores, sm.dim, sm.dtype
    shape = shape_of(softmax)
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise _Reject(f"softmax in {dtype}: the kernels compute it in float32 or float64", softmax)
    if shape is None or not isinstance(scores_in, Node):
        raise _Reject("softmax input is not a tensor computed in the graph", softmax)
    if dim is None or dim not in (-1, len(shape) - 1):
        raise _Reject(f"softmax over dim {dim}, not the last (key) dim: not attention", softmax)
    if len(shape) not in (3, 4):
        raise _Reject(f"softmax over {len(shape)}-D scores; attention scores are [B, H, Nq, Nk] or [B*H, Nq, Nk]",
                      softmax)

    chain: list[Node] = [softmax]  # from softmax up to the score product
    steps: list[tuple] = []  # ops applied to the raw scores, collected upwards
    node = scores_in
    while kind(node) not in _PRODUCTS:
        step, node = _score_step(node, constants)
        chain.append(step[-1])
        steps.append(step)  # the last item is the node: the shape of the scores there is the step's frame
    score_mm = node
    chain.append(score_mm)
    _refuse_narrowed_softmax(score_mm, scores_in, dtype, softmax)
    views = [step for step in steps if step[0] == "view"]

    down: list[Node] = []
    probs, dropout_p, nan_to_zero = softmax, 0.0, sm.safe
    dropout_node = None
    while True:
        users = list(probs.users)
        zeroed = _nan_to_zero(probs, users)
        if zeroed is not None:  # where(isnan(p), 0, p): fully masked rows become 0, as SDPA's safe softmax
            down.extend([zeroed.args[0], zeroed])
            probs, nan_to_zero = zeroed, True
            continue
        if len(users) != 1:
            raise _Reject(
                "attention probabilities are used outside the value product (e.g. returned attention weights)",
                probs,
            )
        user = users[0]
        user_kind = kind(user)
        if user_kind == "cast":
            if not _float_cast(user, min_bytes=2):
                raise _Reject(f"attention probabilities are cast to {_cast_dtype(user)}: only casts to float16 or "
                              "wider keep them probabilities", user)
            down.append(user)
            probs = user
            continue
        if user_kind == "dropout":
            if user.target is torch.dropout:
                call = bind(user, ("input", "p", "train"))
                p, training = call["p"], call["train"]
            else:
                call = bind(user, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
                p, training = call["p"], call["training"]
            if isinstance(p, Node) and training is True and _is_float_scalar(p):
                this_p, this_node = PLANNED_DROPOUT, p
            elif not isinstance(p, (int, float)) or not isinstance(training, bool):
                raise _Reject("dropout with a traced probability or training flag", user)
            else:
                this_p, this_node = (float(p) if training else 0.0), None
            if this_p != 0.0 and (dropout_p != 0.0 or dropout_node is not None):
                # the kernels drop once; two drops multiply their masks (and scales), which one probability
                # does not describe
                raise _Reject("two dropouts on the probabilities", user)
            if this_p != 0.0:
                dropout_p, dropout_node = this_p, this_node
            down.append(user)
            probs = user
            continue
        if user_kind == "reshape":
            views.append(_score_view(user, probs))
            down.append(user)
            probs = user
            continue
        if (user_kind == "matmul" and user.args[0] is probs and not user.kwargs) or (
                user_kind == "einsum" and len(user.args) == 3 and user.args[1] is probs and not user.kwargs):
            value_mm = user
            break
        raise _Reject(f"probabilities go to {_describe(user)}, not to a product with values", user)

    heads = _frame_heads(views, softmax)
    q, k, product_steps = _split_score_product(score_mm, constants, heads)
    steps.extend(reversed(product_steps))  # ``steps`` is collected upwards; reversed into forward order below
    if kind(value_mm) == "matmul":
        v, output_steps = _in_frame(Operand(value_mm.args[1]), heads), ()
        if len(shape_of(probs) or ()) == 3:
            output_steps = (("squeeze", (1,)),) if heads is None else (("flatten", (0, 1)),)
    else:
        try:
            v, output_steps = value_einsum(value_mm)
        except LayoutError as err:
            raise _Reject(str(err), value_mm) from None
        if heads is not None and len(shape_of(probs) or ()) == 3:
            raise _Reject("an einsum over [B*H, Nq, Nk] probabilities the site also views as [B, H, Nq, Nk]",
                          value_mm)

    for node in chain[1:]:
        outside = set(node.users) != set(sm.readers) if node is scores_in else len(node.users) != 1
        if outside:
            raise _Reject("attention scores are used outside the attention", node)

    match = Match(anchor=softmax, kind="softmax", q=q, k=k, v=v, output=value_mm, output_steps=output_steps,
                  dropout_p=dropout_p, dropout_node=dropout_node, nan_to_zero=nan_to_zero)
    _interpret(match, list(reversed(steps)), softmax)
    match.k, match.v, match.kv_group = fold_gqa(match.k, match.v)
    _check_layout(match, score_mm)
    if heads is not None:
        q_shape, k_shape = match.q.shape(), match.k.shape()
        match.frame = (*q_shape[:3], k_shape[2])
    match.internal = [*reversed(down), softmax, *sm.internal, *chain[1:]]
    if kind(score_mm) == "matmul" and isinstance(score_mm.args[1], Node) and score_mm.args[1] is not match.k.node:
        match.internal.append(score_mm.args[1])
    size = math.prod(shape)
    match.intermediates = [n for n in [*chain, *sm.internal, *down]
                           if kind(n) != "reshape" and math.prod(shape_of(n) or (0,)) == size]
    return match


# ------------------------------------------------------------------ scores viewed as [B*H, N, N] and back
def _score_view(node: Node, scores: Node) -> tuple:
    """A view of the scores between ``[B*H, Nq, Nk]`` and ``[B, H, Nq, Nk]`` (or one that keeps the shape),
    as the step ``("view", H or None)``. The output shape dynamo recorded says what the view does."""
    before, after = tensor_meta(scores), tensor_meta(node)
    flat = [a for a in (*node.args[1:], *node.kwargs.values())]
    flat = [x for a in flat for x in (a if isinstance(a, (tuple, list)) else (a,))]
    if node.op == "call_function" and node.target is not torch.reshape:
        raise _Reject(f"scores reshaped by {_describe(node)}", node)
    if set(node.kwargs) - {"shape", "size"} or node.args[0] is not scores or before is None or after is None or any(
            not isinstance(a, (int, Node)) or isinstance(a, bool) for a in flat) or before.dtype != after.dtype:
        raise _Reject(f"{_describe(node)} of the scores is not a view of their shape", node)
    b, a = tuple(before.shape), tuple(after.shape)
    if len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b)):
        return ("view", None, node)
    windows = static_int(a[1]) if len(a) == 5 else None
    if windows is None and len(a) == 5 and len(flat) == 5 and isinstance(flat[1], int) and not isinstance(flat[1], bool):
        windows = flat[1]  # the size as written: a symbolic shape may not show it (``s // (s // 4)``)
    if (windows is not None and _splits_batch(a, b)) or _splits_batch(b, a):
        return ("view", None, node)  # [B, H, Nq, Nk] <-> [B/W, W, H, Nq, Nk] (Swin's windows), W static
    wide, narrow = (a, b) if len(a) == 4 and len(b) == 3 else (b, a) if len(a) == 3 and len(b) == 4 else (None, None)
    heads = static_int(wide[1]) if wide is not None else None
    if wide is None or heads is None or not all(_same_size(x, y) for x, y in zip(wide[2:], narrow[1:])) or not (
            _same_size(narrow[0], wide[0] * heads)):
        raise _Reject(f"scores viewed from {_shape_text(b)} to {_shape_text(a)}: only [B*H, Nq, Nk] <-> "
                      "[B, H, Nq, Nk] and [B, H, Nq, Nk] <-> [B/W, W, H, Nq, Nk] (per-window) views are read", node)
    return ("view", heads, node)


def _splits_batch(wide: tuple, narrow: tuple) -> bool:
    """Whether ``wide`` is ``narrow`` [B, H, Nq, Nk] with its batch split as [B/W, W]: the same trailing
    dims (a view keeps the element count, so the first two multiply to B)."""
    return len(wide) == 5 and len(narrow) == 4 and all(_same_size(x, y) for x, y in zip(wide[2:], narrow[1:]))


def _same_size(x, y) -> bool:
    return static_int(x - y) == 0 if not (isinstance(x, int) and isinstance(y, int)) else x == y


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _frame_heads(views: list[tuple], at: Node) -> int | None:
    """H of the site's [B, H, Nq, Nk] frame when its scores are viewed between 3 and 4 dims, else None."""
    heads = {step[1] for step in views if step[1] is not None}
    if len(heads) > 1:
        raise _Reject(f"the scores are viewed with different head counts {sorted(heads)}", at)
    return heads.pop() if heads else None


def _in_frame(op: Operand, heads: int | None) -> Operand:
    """A product operand in [B, H, N, D]: ``[B*H, N, D]`` ones split by the frame's H (or H = 1 without one)."""
    if heads is None or len(op.shape() or ()) != 3:
        return to_rank4(op)
    return op.then(("unflatten", (0, (-1, heads))))


def _nan_to_zero(probs: Node, users: list[Node]) -> Node | None:
    """The ``where(isnan(p), 0, p)`` node when ``probs``' only users are that pattern."""
    if len(users) != 2:
        return None
    check = next((u for u in users if kind(u) == "isnan"), None)
    select = next((u for u in users if kind(u) == "where"), None)
    if check is None or select is None or list(check.users) != [select]:
        return None
    if select.args[0] is check and select.args[2] is probs and constant_value(select.args[1]) == 0.0:
        return select
    return None


def _score_step(node: Node, constants: Constants) -> tuple[tuple, Node]:
    """One op between the scores and the softmax: ``(step..., node), producer of the scores``."""
    try:
        return _read_score_step(node, constants)
    except ArgumentError as err:
        raise _Reject(str(err), node) from None


def _float_cast(cast: Node, min_bytes: int = 1) -> bool:
    """Whether ``cast`` takes a floating tensor to a floating dtype of at least ``min_bytes`` per element: what
    the scores or probabilities may go through (a cast to an integer or bool truncates them)."""
    source = tensor_meta(cast.args[0]) if cast.args and isinstance(cast.args[0], Node) else None
    target = tensor_meta(cast)
    return (source is not None and target is not None and source.dtype.is_floating_point
            and target.dtype.is_floating_point and target.dtype.itemsize >= min_bytes)


def _cast_dtype(cast: Node) -> str:
    target = tensor_meta(cast)
    return "an unknown dtype" if target is None else str(target.dtype)


def _read_score_step(node: Node, constants: Constants) -> tuple[tuple, Node]:
    k = kind(node)
    if k == "contiguous":
        bind(node, ("input", "memory_format"), {"memory_format": None})
        return ("cast", node), node.args[0]
    if k == "cast":
        if not _float_cast(node):
            raise _Reject(f"scores are cast to {_cast_dtype(node)}: a cast off floating point (truncation, bool) "
                          "changes them", node)
        return ("cast", node), node.args[0]
    if k in ("mul", "div"):
        call = bind(node, ("input", "other", "rounding_mode") if k == "div" else ("input", "other"),
                    {"rounding_mode": None})
        if call.get("rounding_mode") is not None:
            raise _Reject(f"scores are divided with rounding_mode={call['rounding_mode']!r}: not a scale", node)
        a, b = call["input"], call["other"]
        scores, other = (a, b) if _reaches_scores(a, constants) else (b, a)
        if not isinstance(scores, Node) or (k == "div" and scores is not a):
            raise _Reject(f"scores are scaled by {_describe_value(other)}, not a constant number", node)
        number, facts = _scale_factor(other, node, constants)
        return ("scale", number if k == "mul" else 1.0 / number, facts, node), scores
    if k in ("add", "sub"):  # scores - term: the term added with the opposite multiplier
        call = bind(node, ("input", "other", "alpha"), {"alpha": 1.0})
        a, b, alpha = call["input"], call["other"], call["alpha"]
        if not (isinstance(a, Node) and isinstance(b, Node)) or not isinstance(alpha, (int, float)):
            raise _Reject(f"a constant is {'added to' if k == 'add' else 'subtracted from'} the scores (softmax "
                          "ignores it, but it is not a mask)", node)
        dtype = tensor_meta(node).dtype  # the precision eager added the mask at
        stopped = {x: _unreached(x, constants) for x in (a, b)}
        if stopped[a] is None:
            _check_keeps_shape(node, a)
            return ("add", b, float(alpha) if k == "add" else -float(alpha), dtype, node), a
        if k == "sub" and stopped[b] is None:
            raise _Reject("the scores are subtracted from a term (their sign flips): not attention", node)
        if stopped[b] is None and alpha == 1.0:
            _check_keeps_shape(node, b)
            return ("add", a, 1.0, dtype, node), b
        # the operand shaped as the sum is the scores whose walk stopped above: that is the reason
        for x in (a, b):
            if stopped[x] is not None and same_sizes(sizes_of(x), sizes_of(node)):
                raise stopped[x]
        raise _Reject("neither operand of the mask add leads to a score product", node)
    if k == "masked_fill":
        call = bind(node, ("input", "mask", "value"))
        scores, cond, value = call["input"], call["mask"], call["value"]
        _check_keeps_shape(node, scores)
        return ("fill", BooleanTerm(cond, False, _fill_value(value, node, constants)), node), scores
    if k == "where":
        call = bind(node, ("condition", "input", "other"))
        cond, a, b = call["condition"], call["input"], call["other"]
        _check_keeps_shape(node, a if isinstance(a, Node) and _reaches_scores(a, constants) else b)
        if isinstance(a, Node) and _reaches_scores(a, constants):
            return ("fill", BooleanTerm(cond, True, _fill_value(b, node, constants)), node), a
        if isinstance(b, Node) and _reaches_scores(b, constants):
            return ("fill", BooleanTerm(cond, False, _fill_value(a, node, constants)), node), b
        raise _Reject("torch.where between scores and softmax that selects no scores", node)
    if k == "tanh":
        bind(node, ("input",))
        return ("tanh", node), node.args[0]
    if k == "reshape" and node.args and isinstance(node.args[0], Node):
        return _score_view(node, node.args[0]), node.args[0]
    raise _Reject(f"no q @ k^T product above the softmax (reached {_describe(node)}): not attention", node)


def _reaches_scores(node, constants: Constants) -> bool:
    """Whether walking up through score steps from ``node`` reaches a score product."""
    return _unreached(node, constants) is None


def _unreached(node, constants: Constants) -> _Reject | None:
    """None when walking up through score steps from ``node`` reaches a score product, else where and why
    the walk stopped."""
    start = node
    for _ in range(64):
        if not isinstance(node, Node) or constants.is_constant(node):
            return _Reject(f"{_describe_value(node)} is a constant, not scores", start)
        if kind(node) in _PRODUCTS:
            return None
        try:
            _, node = _score_step(node, constants)
        except _Reject as stop:
            return stop
    return _Reject("no score product within 64 steps above the softmax", start)


def _scale_factor(value, node: Node, constants: Constants) -> tuple[float, tuple[torch.SymBool, ...]]:
    """``(number, facts)``: the number scaling the scores, and what to guard for it (see ``_captured``).

    Under dynamic shapes dynamo passes a float attribute (HF's ``self.scaling``) as a graph input read by
    ``.item()``, and a scale computed from a size (``q.size(-1) ** -0.5``) is a symbolic expression.
    """
    number = constants.number(value)
    if number is not None:
        return number, ()
    symbol = value.meta.get("example_value") if isinstance(value, Node) else value
    if not isinstance(symbol, (torch.SymInt, torch.SymFloat)):
        raise _Reject(f"scores are scaled by {_describe_value(value)}, not a constant number", node)
    captured = _captured(symbol)
    if captured is None:
        raise _Reject(f"scores are scaled by {_describe_value(value)} = {symbol}, a number known only at run time "
                      "(read from a tensor the graph computes): the op takes its scale as a constant", node)
    return float(captured[0]), captured[1]


def _captured(symbol) -> tuple[int | float, tuple[torch.SymBool, ...]] | None:
    """The value of a symbolic scalar, and the facts to guard for using it: none when the shape environment
    reduces it to a number; ``symbol == value`` when it was captured from the inputs (guarded once the site
    matches: dynamo recompiles when it changes, as torch's own compilers specialize a float an op reads as a
    Python number). None when it is known only at run time (``.item()`` of a tensor the graph computes)."""
    static = static_number(symbol)
    if static is not None:
        return static, ()
    if not symbol.node.has_hint() or free_unbacked_symbols(symbol.node.expr):
        return None
    value = symbol.node.hint
    return value, (symbol == value,)


def _check_keeps_shape(node: Node, scores) -> None:
    """A mask step must not broadcast the scores to a larger shape (the op's output would not match).

    The step's output shape is the broadcast of its operands', so comparing it with the scores' on the
    capture's sizes is a proof for every size of a dynamo graph: where a mask's size and the scores' are
    different symbols, dynamo guarded them equal to broadcast them (or the sizes differ here too)."""
    if isinstance(scores, Node) and shape_of(scores) is not None and shape_of(node) != shape_of(scores):
        raise _Reject(f"the mask broadcasts the scores from {_shape_text(shape_of(scores))} to "
                      f"{_shape_text(shape_of(node))}", node)


def _fill_value(value, node: Node, constants: Constants) -> float:
    number = constants.number(value)
    if number is None:
        raise _Reject(f"mask fill value {_describe_value(value)} is not a constant", node)
    return number


def _split_score_product(node: Node, constants: Constants, heads: int | None = None
                         ) -> tuple[Operand, Operand, list[tuple]]:
    """``(q, k, steps)`` of the score product; ``steps`` are score steps it implies (baddbmm), in forward order."""
    k = kind(node)
    try:
        if k == "einsum":
            if len(node.args) != 3 or node.kwargs:
                raise LayoutError("einsum scores need exactly two operands and no keyword arguments")
            if heads is not None and len(shape_of(node) or ()) == 3:
                raise LayoutError("einsum [B*H, Nq, Nk] scores the site also views as [B, H, Nq, Nk]")
            q, key = score_einsum(node)
            return q, key, []
        extra: list[tuple] = []
        if k == "baddbmm":
            # beta * bias + alpha * (q @ kT) = alpha * (q @ kT + (beta / alpha) * bias)
            call = bind(node, ("input", "batch1", "batch2", "beta", "alpha"), {"beta": 1.0, "alpha": 1.0})
            a, b, bias, beta, alpha = call["batch1"], call["batch2"], call["input"], call["beta"], call["alpha"]
            if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
                raise LayoutError("baddbmm with traced beta / alpha")
            if alpha == 0:
                raise LayoutError("baddbmm with alpha=0 has no score product")
            zero_bias = constants.is_constant(bias) and not bool(constants.value(bias).any())
            if beta != 0.0 and not zero_bias:
                extra.append(("add", bias, float(beta) / float(alpha), tensor_meta(node).dtype, node))
            extra.append(("scale", float(alpha), (), node))
        else:
            call = bind(node, ("input", "other"))
            a, b = call["input"], call["other"]
        if not isinstance(a, Node) or not isinstance(b, Node):
            raise LayoutError("score product with a constant operand")
        return _in_frame(Operand(a), heads), _in_frame(untransposed(b), heads), extra
    except (LayoutError, ArgumentError) as err:
        raise _Reject(str(err), node) from None


def _interpret(match: Match, steps: list[tuple], at: Node) -> None:
    """Fold the forward-order score steps into scale, softcap, additive and boolean terms."""
    scale, softcap, pending_tanh = 1.0, None, False
    assumed: list[torch.SymBool] = []
    additive: list[tuple[Node, float]] = []
    booleans: list[BooleanTerm] = []
    for step in steps:
        op = step[0]
        if pending_tanh and op not in ("scale", "cast", "view"):
            raise _Reject("tanh on the scores is not followed by a multiply (softcap)", at)
        if op == "cast":
            booleans = _through_cast(step[-1], additive, booleans, at)
            continue
        if op == "view":
            continue
        if op == "scale":
            c = step[1]
            assumed.extend(step[2])
            if c <= 0 or not math.isfinite(c):
                raise _Reject(f"scores are scaled by {c}: only positive finite scales are attention", at)
            if pending_tanh:
                # c * tanh(a * qk) is the spec's softcap c with scale a * c
                softcap, scale, pending_tanh = c, scale * c, False
                continue
            if softcap is not None:  # c * (m * tanh(a * qk)) is softcap m * c with scale a * m * c
                softcap *= c
            _check_scale_after_masks(c, additive, booleans, at)
            scale *= c
            additive = [(t, m * c) for t, m in additive]
            booleans = [replace(b, fill=b.fill * c) for b in booleans]
        elif op == "tanh":
            if additive or booleans or softcap is not None:
                raise _Reject("tanh applied after masking: not a softcap", at)
            pending_tanh = True
        elif op == "add":
            # a finite fill an additive term follows (GPT-2's where(causal, s, finfo.min) + mask): the analysis
            # decides whether the two compose into a fill the kernels reproduce
            booleans = [replace(b, before_add=True) if math.isfinite(b.fill) else b for b in booleans]
            additive.append((step[1], step[2]))
            match.add_dtypes[step[1]] = step[3]
            match.add_locals[step[1]] = shape_of(step[-1])
        elif op == "fill":
            meta = tensor_meta(step[-1])
            term = replace(step[1], local=shape_of(step[-1]), filled_at=None if meta is None else meta.dtype)
            booleans.append(term if meta is None else replace(term, fill=_stored(term.fill, meta.dtype)))
    if pending_tanh:
        raise _Reject("tanh on the scores is not followed by a multiply (softcap)", at)
    match.scale, match.softcap, match.assumed = scale, softcap, tuple(assumed)
    match.additive, match.booleans = additive, booleans


def _stored(fill: float, dtype: torch.dtype) -> float:
    """``fill`` as scores of ``dtype`` hold it: a fill beyond the dtype's range is -inf there (``-1e9`` in
    float16, float32's ``finfo.min`` in bfloat16), and a row it masks entirely is NaN in eager."""
    if not dtype.is_floating_point or math.isinf(fill):
        return fill
    return float(torch.tensor(fill, dtype=torch.float64).to(dtype))


def _through_cast(cast: Node, additive: list, booleans: list, at: Node) -> list:
    """The boolean terms after a cast of the masked scores: a cast to a dtype of smaller range (float32 to
    float16 or bfloat16) stores each fill at that range, where a large one becomes -inf. An additive term added
    before such a cast is left to eager: its values, unknown here, may overflow there too, and the kernels add it
    at the dtype it was added at."""
    source, target = tensor_meta(cast.args[0]) if cast.args else None, tensor_meta(cast)
    if (source is None or target is None or not source.dtype.is_floating_point or not target.dtype.is_floating_point
            or torch.finfo(target.dtype).max >= torch.finfo(source.dtype).max):
        return booleans
    if additive:
        raise _Reject(f"masked scores are cast from {source.dtype} to {target.dtype} before the softmax: an added "
                      f"mask's values beyond {target.dtype}'s range become -inf there, which the kernels, adding it "
                      f"at {source.dtype}, would not reproduce; cast the scores before adding the mask", at)
    return [replace(b, fill=_stored(b.fill, target.dtype)) for b in booleans]


def _check_scale_after_masks(c: float, additive: list, booleans: list, at: Node) -> None:
    """A scale applied after masking terms is folded into each term (``t * c``), which is eager's arithmetic
    unless eager's own sum or product reaches -inf first: two masking terms of ``finfo.min`` add up to -inf
    before eager scales them (a row both mask is NaN), where the kernels' scaled terms stay finite; a scale above
    1 makes a finite fill -inf in eager. The values of additive tensors are not known at capture time, so such
    sites are left alone."""
    if c == 1.0:
        return
    finite = [b for b in booleans if math.isfinite(b.fill)]
    finite_fills = bool(finite)
    # a constant fill overflows where its product leaves the range of the scores it was stored in
    overflows = any(abs(b.fill) * c > torch.finfo(b.filled_at or torch.float16).max for b in finite)
    if c > 1.0 and (additive or overflows):
        raise _Reject(f"scores are scaled by {c:g} after a finite mask: eager's product may overflow the fill to "
                      "-inf, which the kernels' folded scale would not", at)
    if len(additive) + finite_fills >= 2:
        raise _Reject(f"scores are scaled by {c:g} after two masking terms: their sum may overflow to -inf before "
                      "eager scales it, which the kernels' scaled terms would not", at)


def _check_layout(match: Match, at: Node) -> None:
    q, k, v = match.q.shape(), match.k.shape(), match.v.shape()
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) == 4):
        raise _Reject("q, k, v are not [B, H, N, D] tensors", at)
    # sizes hint-equal here are equal for every size of a dynamo graph: q, k and v meet in the products, whose
    # batch broadcast and contractions dynamo guarded (the group of heads is the one fact it did not check)
    if q[0] != k[0] or k[:3] != v[:3] or q[3] != k[3]:
        raise _Reject(f"q {q}, k {k}, v {v} do not agree on batch, heads, keys or head dim", at)
    match.assumed += _grouped(match.q.sizes()[1], match.k.sizes()[1], at)
    _unify_dtypes(match, tensor_meta(at).dtype, at)


def _grouped(q_heads, kv_heads, at: Node) -> tuple[torch.SymBool, ...]:
    """Each kv head serves a whole group of query heads (``q_heads % kv_heads == 0``): proven, or a fact to
    guard where head counts are symbolic (attention on graph inputs under ``dynamic=True``). A graph analyzed
    outside a dynamo capture (an ONNX model's view) has no guards: its example sizes decide, as for its
    other sizes."""
    if same_sizes((q_heads,), (kv_heads,)):
        return ()
    remainder = q_heads % kv_heads
    known = static_number(remainder)
    if known is None:
        known = hint(remainder)
        if known == 0 and TracingContext.try_get() is not None:
            return (remainder == 0,)
    if known:
        raise _Reject(f"q has {q_heads} heads and k {kv_heads}: heads are not grouped", at)
    return ()


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unify_dtypes(match: Match, product_dtype: torch.dtype, at: Node) -> None:
    """Bring q, k, v to one floating dtype, or reject.

    * An upcast written before a product (``q.float() @ k.float().mT``) is read through: the kernels
      accumulate half inputs in float32, as the float32 product of the same values does.
    * Under autocast the products run in a half dtype their float32 inputs are not in: the op reads
      q, k, v cast to it, exactly the rounding autocast applied to them.
    """
    ops = [_through_upcast(op) for op in (match.q, match.k, match.v)]
    dtypes = {op.dtype() for op in ops}
    if len(dtypes) != 1 and product_dtype in (torch.float16, torch.bfloat16) and dtypes <= set(_FLOATS):
        ops = [op if op.dtype() == product_dtype else op.then(("to", (product_dtype,))) for op in ops]
        dtypes = {product_dtype}
    if len(dtypes) != 1 or dtypes.pop() not in _FLOATS:
        raise _Reject("q, k, v dtypes differ or are not floating point", at)
    match.q, match.k, match.v = ops


def _through_upcast(op: Operand) -> Operand:
    """``op`` read from before a ``.float()`` / ``.to(torch.float32)`` of a narrower float tensor."""
    node = op.node
    if kind(node) != "cast" or not isinstance(node.args[0], Node):
        return op
    after, before = tensor_meta(node), tensor_meta(node.args[0])
    if after is None or before is None or after.device != before.device or after.shape != before.shape:
        return op
    if not (before.is_floating_point() and after.is_floating_point() and after.dtype.itemsize > before.dtype.itemsize):
        return op
    return Operand(node.args[0], op.steps)


# ------------------------------------------------------------------ SDPA
def _match_sdpa(node: Node, constants: Constants) -> Match:
    try:
        call = bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                    {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    except ArgumentError as err:
        raise _Reject(str(err), node) from None
    q, k, v, attn_mask = call["query"], call["key"], call["value"], call["attn_mask"]
    dropout_p, is_causal, scale, enable_gqa = call["dropout_p"], call["is_causal"], call["scale"], call["enable_gqa"]
    for name, value in (("dropout_p", dropout_p), ("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if isinstance(value, Node):
            raise _Reject(f"SDPA {name} is computed in the graph, not a constant", node)
    assumed = ()
    if isinstance(scale, Node):  # a float attribute under dynamic shapes (HF's scale=self.scaling)
        scale, assumed = _scale_factor(scale, node, constants)
    width = tensor_meta(q).shape[-1]
    if scale is None and not isinstance(width, int):  # SDPA's default 1/sqrt(D) with a symbolic head dim D
        captured = _captured(width)
        if captured is None:
            raise _Reject(f"SDPA's default scale 1/sqrt(D) with a head dim D = {width} known only at run time", node)
        scale, assumed = 1.0 / math.sqrt(captured[0]), captured[1]
    match = Match(
        anchor=node, kind="sdpa", q=Operand(q), k=Operand(k), v=Operand(v), output=node,
        scale=None if scale is None else float(scale), causal=bool(is_causal), dropout_p=float(dropout_p),
        internal=[node], assumed=assumed,
    )
    if attn_mask is not None:
        meta = tensor_meta(attn_mask)
        if meta is None:
            raise _Reject("SDPA attn_mask is not a tensor", node)
        if meta.dtype == torch.bool:
            match.booleans = [BooleanTerm(attn_mask, True, float("-inf"))]
        else:
            match.additive = [(attn_mask, 1.0)]
            # SDPA's kernels add a half-precision mask to float32 scores
            match.add_dtypes[attn_mask] = torch.float64 if meta.dtype == torch.float64 else torch.float32
    qs, ks, vs = (sizes_of(n) for n in (q, k, v))
    if qs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise _Reject("SDPA on tensors that are not [B, H, N, D]", node)
    match.assumed += _grouped(qs[1], ks[1], node)
    if not same_sizes(qs[1:2], ks[1:2]) and not enable_gqa:
        raise _Reject(f"SDPA with {qs[1]} q heads and {ks[1]} kv heads without enable_gqa", node)
    if same_sizes(qs[1:2], ks[1:2]):
        match.k, match.v, match.kv_group = fold_gqa(match.k, match.v)
    _unify_dtypes(match, tensor_meta(node).dtype, node)
    return match


def _analyze_masks(match: Match, constants: Constants) -> None:
    # masks broadcast against the scores as the model wrote them: [B, H, Nq, Nk] or [B*H, Nq, Nk]
    if match.frame is not None:
        score_shape = match.frame
    elif match.kind == "softmax":
        score_shape = shape_of(match.anchor)
    else:
        score_shape = (*match.q.shape()[:-1], match.k.shape()[-2])
    sizes = (_symbolic_len(match.q), _symbolic_len(match.k))
    try:
        match.masks = masks.analyze(
            match.booleans, match.additive, sdpa=match.kind == "sdpa", score_shape=score_shape,
            add_dtypes=match.add_dtypes, add_locals=match.add_locals, sizes=sizes,
            dtype=match.q.dtype(), constants=constants, is_causal=match.causal,
        )
    except masks.MaskError as err:
        raise _Reject(str(err), match.anchor) from None
    if match.nan_to_zero and match.masks.fill in NAN_FILLS:
        match.masks.fill = Fill.SAFE


def _symbolic_len(op: Operand):
    """The sequence length (dim 2 of the [B, H, N, D] view) as the graph holds it: int or SymInt."""
    return op.sizes()[2]


def _check_read_order(match: Match, constants: Constants) -> None:
    """Reject a match whose op would read a tensor after an in-place write the original read before.

    The op runs where the value product was; the original read q, k and the masks earlier (at the
    score product, at the mask ops). A write in between (``k[:, :, 3] = k_new`` after ``q @ k.T``)
    would be seen by the op and not by the original.
    """
    mutations = constants.mutations
    inputs = [match.q.node, match.k.node, match.v.node]
    m = match.masks
    inputs += [a.node for a in m.key_padding + m.dense] + [t for t, _ in m.additive]
    if m.documents is not None:
        inputs += list(m.documents)
    inputs = [n for n in dict.fromkeys(inputs) if isinstance(n, Node) and mutations.is_mutated(n)]
    if not inputs:
        return
    feeding = _ancestors(match.output)
    for node in inputs:
        reads = [u for u in node.users if u in feeding or u is match.output]
        first = min(reads, key=mutations.position.__getitem__, default=match.output)
        if mutations.written_between(node, first, match.output):
            raise _Reject(f"{node.name} is written in place between its use by the attention and the value "
                          "product", node)


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _describe_value(value) -> str:
    return _describe(value) if isinstance(value, Node) else repr(value)

