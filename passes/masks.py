"""The mask algebra: what the masks feeding an attention site mean, as AttentionSpec terms.

Input: the site's boolean terms (``masked_fill`` / ``where`` conditions, SDPA's
bool mask) and additive terms, as detection found them. Output: a
``MaskAnalysis`` of causal / window / key padding / document / dense terms.

1. Additive masks that only ever add 0 or a fill are booleans in disguise:
   ``where(c, 0, fill)``, ``where(c, fill, 0)``, ``(1 - b) * fill`` with ``b``
   boolean. They become boolean terms when that is exact: a ``-inf`` fill
   always; a finite fill only when it absorbs every score (``s + finfo.min`` is
   ``finfo.min`` in float32 and bfloat16, not in float16).
2. Each boolean term's keep condition is split into a conjunction of atoms
   (through ``&``, ``~`` with De Morgan, ``expand``, bool casts).
3. Each atom is classified:
   * constant (built from aranges, shapes and buffers): evaluated for the
     site's shape; a Toeplitz interval pattern (keep iff lo <= j - i <= hi)
     becomes causal / window terms, all-true is dropped, anything else stays a
     dense mask;
   * shaped ``[B or 1, 1, ..., 1, Nk]``: it cannot depend on the query or the
     head, so it is a key padding mask, whatever computes it at run time;
   * ``a == b`` with ``a`` ``[.., Nq, 1]`` and ``b`` ``[.., 1, Nk]`` integer ids:
     document (block-diagonal) masking;
   * a comparison of positions next to documents numbered from those positions
     (Hugging Face's packed rows, ``pos[kv] <= pos[q]``): the same comparison of
     indices within each document, so causal / window terms;
   * anything else: a dense mask, still exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch.fx import Node

from attnopt.kernels.spec import Align, Fill, Window
from attnopt.kernels.term_cache import capturing

from .graph import ArgumentError, Constants, bind, is_in_place, is_parameter, kind, shape_of, tensor_meta
from .layouts import LayoutError, apply_steps, frame_steps, run_steps
from .symbolic import Affine, always_true, band_of_comparison, document_positions, read_of, static_int, unshifted

#: a finite fill at or below this is a masking value (exp(fill - s) underflows in float32)
MASKING_FILL = -1e4
#: a fill at or below this absorbs any real score when added in float32 / bfloat16
ABSORBING_FILL = -1e30


@dataclass(frozen=True)
class Atom:
    node: Node
    negated: bool  # keep where the node is False
    # size-1 dims the mask inserted above the atom (``keep[:, None]``), innermost first, each as
    # (rank, dim): right-align the shape to ``rank``, then insert a dim at ``dim`` (never in the last two)
    lifts: tuple[tuple[int, int], ...] = ()
    # layout steps from the view of the scores it masks to the site's scores (``layouts.frame_steps``)
    steps: tuple = ()

    def shape(self) -> tuple | None:
        """The atom's shape as the scores see it: its own, with the inserted dims and the layout steps."""
        shape = shape_of(self.node)
        return None if shape is None else apply_steps(lifted_shape(shape, self.lifts), self.steps)


@dataclass
class MaskAnalysis:
    causal: bool = False
    align: Align = Align.TOP_LEFT
    window: Window | None = None
    key_padding: list[Atom] = field(default_factory=list)
    documents: tuple[Node, Node] | None = None
    document_atom: Atom | None = None  # the atom the documents were read from
    # the query and key ids are one vector (``_same_documents``): the kernels get one tensor for both
    documents_same: bool = False
    dense: list[Atom] = field(default_factory=list)
    additive: list[tuple[Node, float]] = field(default_factory=list)
    fill: Fill = Fill.NEG_INF
    notes: list[str] = field(default_factory=list)
    alibi: list[Node] = field(default_factory=list)  # additive terms that are ALiBi biases
    # additive terms that only add 0 or a finite masking value the kernels must add as written (-10000,
    # float16's finfo.min): term -> the structure of where it masks (("key_padding",), ("causal",), ...)
    finite_masks: dict = field(default_factory=dict)
    add_dtypes: dict = field(default_factory=dict)  # additive term -> dtype eager added it to the scores at
    # additive term -> layout steps from the view of the scores it was added to (``layouts.frame_steps``)
    term_steps: dict = field(default_factory=dict)
    # dense atoms passed as written whose structure has a name (DeBERTa's key x query padding product)
    dense_labels: dict = field(default_factory=dict)
    # the one additive term, made at run time, that may hold only 0 and ``finfo(dtype).min`` (a 4D mask handed
    # to the model, as ``generate()`` does for a static cache): ``(node, fill, the site's fill as a boolean)``.
    # A call whose term does hold only those values is exactly a call with the boolean mask ``term == 0``
    # (``fill_only_keep``: one check per forward); the others keep the additive term
    fill_only: tuple | None = None

    @property
    def viewed(self) -> bool:
        """Whether a term is read through layout steps (added to a view of the site's scores)."""
        return any(self.term_steps.values()) or any(a.steps for a in self.dense)

    @property
    def mask_terms(self) -> tuple[str, ...]:
        terms = []
        if self.causal:
            terms.append("causal")
        if self.window is not None:
            terms.append("window")
        if self.key_padding:
            terms.append("key_padding")
        if self.documents is not None:
            terms.append("document")
        structured = [n for t, _ in self.additive for n in self.finite_masks.get(t, ())]
        structured += [n for a in self.dense for n in self.dense_labels.get(a.node, ())]
        for name in ("causal", "window", "key_padding"):
            if name in structured and name not in terms:
                terms.append(name)
        biases = [t in self.alibi or _needs_grad(t) for t, _ in self.additive]
        if any(biases):
            terms.append("bias")
        plain = [not b and t not in self.finite_masks for b, (t, _) in zip(biases, self.additive)]
        if any(a.node not in self.dense_labels for a in self.dense) or any(plain):
            terms.append("dense")
        return tuple(terms)


class MaskError(Exception):
    """The masks of a site cannot be expressed exactly; the message says why."""


HALF = (torch.float16, torch.bfloat16)


def half_added(term: Node, add_dtypes: dict) -> bool:
    """Whether eager added ``term`` to half-precision scores (float16 / bfloat16), before any upcast: the kernels
    add such a term at that precision (kernels/spec.py), the others at full precision."""
    meta = tensor_meta(term)
    added_at = add_dtypes.get(term) or (meta.dtype if meta is not None else None)
    return added_at in HALF


def analyze(booleans, additive, *, sdpa: bool, score_shape: tuple, dtype: torch.dtype,
            constants: Constants, is_causal: bool = False, add_dtypes: dict | None = None,
            add_locals: dict | None = None, sizes: tuple | None = None) -> MaskAnalysis:
    """Classify the site's masks. ``booleans`` are (cond, keep_when_true, fill, local) terms;
    ``is_causal`` is SDPA's flag (top-left causal, combined with the masks). ``score_shape`` holds
    the captured sizes; ``sizes`` the ``(Nq, Nk)`` the graph accepts, symbolic under dynamic shapes:
    a proof that depends on the lengths reads those, never the captured hints. A term applied to a
    view of the scores (``local``, ``add_locals``) is read through the layout steps to ``score_shape``."""
    if any(b.before_add for b in booleans):
        return _replaced_then_added(booleans, additive, score_shape=score_shape, dtype=dtype, constants=constants,
                                    add_dtypes=add_dtypes or {}, add_locals=add_locals or {}, sizes=sizes)
    result = MaskAnalysis()

    def steps_of(node, local) -> tuple:
        if local is None:
            return ()
        try:
            return frame_steps(shape_of(node) or (), local, score_shape)
        except LayoutError as err:
            raise MaskError(str(err)) from None

    # (cond, keep_when_true, fill, added, local): added fills come from additive masks; ``local`` is the
    # shape of the view of the scores the term masks, when it is not ``score_shape``
    terms = [(b.cond, b.keep_when_true, b.fill, False, _other_view(b.local, score_shape)) for b in booleans]
    bands: list[tuple[int | None, int | None]] = [(None, 0)] if is_causal else []
    convertible = []  # (node, mult, added_at, boolean term) of additive masks that only add 0 or a fill
    for node, mult, added_at, local in _summands(additive, add_dtypes or {}, add_locals or {}):
        steps = steps_of(node, local)
        _refuse_positive_infinity(node, mult, constants)
        if constants.is_constant(node):
            value = run_steps(constants.value(node) * mult, steps)
            if not bool(value.any()):
                continue  # adds zero (T5's cross-attention position bias)
            band = _constant_band(value, score_shape)
            if band is not None:  # a constant 0 / -inf mask with band structure (a causal triu(1) of -inf)
                bands.append(band)
                terms.append((None, True, float("-inf"), True, None))
                continue
            slopes = alibi_slopes(value, score_shape)
            if slopes is not None:
                result.notes.append("ALiBi bias (per-head slopes x key distance): " + ", ".join(
                    f"{s:.4g}" for s in slopes[:4]) + (" ..." if len(slopes) > 4 else ""))
                result.alibi.append(node)
        elif _run_time_alibi(node, steps, score_shape, constants):
            result.notes.append("ALiBi bias (per-head slopes x key positions computed at run time), added as written")
            result.alibi.append(node)
        if steps:  # read through a view: added as written, in the site's frame
            if result.term_steps.get(node, steps) != steps:
                raise MaskError(f"{node.name} is added to two views of the scores")
            result.term_steps[node] = steps
            converted = None
        else:
            converted = _as_boolean(node, mult, dtype, constants)
        if converted is None:
            if not steps:
                _label_finite_mask(node, mult, result, score_shape, constants)
            result.additive.append((node, mult))
            if added_at is not None:
                result.add_dtypes[node] = added_at
        else:
            convertible.append((node, mult, added_at, (*converted, True, None)))
    # An added -inf is a boolean mask whatever else is added. An added finite fill is one only when it
    # is the sole finite term added: two finfo.min masks overflow to -inf where both mask (or add
    # 2 * fill), and another additive term may hold -inf, so a row masked by the fill averages only
    # some keys. Then the fills stay additive terms, which the kernels add exactly as eager did.
    finite = [c for c in convertible if not math.isinf(c[3][2])]
    # Constant additive terms bounded far above the fill (ALiBi) cannot: the fill absorbs them too.
    keep_finite = len(finite) == 1 and not _unbounded(result.additive, constants)
    for node, mult, added_at, term in convertible:
        if math.isinf(term[2]) or keep_finite:
            terms.append(term)
        else:
            _label_finite_mask(node, mult, result, score_shape, constants)
            result.additive.append((node, mult))
            if added_at is not None:
                result.add_dtypes[node] = added_at
    try:
        result.fill = _fill(terms, sdpa, dtype, _unbounded(result.additive, constants))
    except MaskError:
        if not (keep_finite and finite):
            raise
        # a finite added fill next to -inf or replaced fills: keep it additive (exact), fill from the rest
        terms.remove(finite[0][3])
        result.additive.append(finite[0][:2])
        if finite[0][2] is not None:
            result.add_dtypes[finite[0][0]] = finite[0][2]
        result.fill = _fill(terms, sdpa, dtype, _unbounded(result.additive, constants))
    q_len, kv_len = sizes if sizes is not None else (score_shape[-2], score_shape[-1])
    for cond, keep_when_true, _, _, local in terms:
        if cond is None:  # already classified
            continue
        atoms = _conjunction(cond, negated=not keep_when_true, lift=local is None, constants=constants)
        if _lifted_dense(atoms, result, score_shape, constants):
            # a dense atom is passed to the kernels as its node: it must broadcast as the scores do
            atoms = _conjunction(cond, negated=not keep_when_true, lift=False, constants=constants)
        atoms = [replace(atom, steps=steps_of(atom.node, local)) for atom in atoms]
        _classify_all(atoms, result, bands, score_shape, constants)
    if bands:
        lo = max((b[0] for b in bands if b[0] is not None), default=None)
        hi = min((b[1] for b in bands if b[1] is not None), default=None)
        _set_band(result, lo, hi, q_len, kv_len)
    result.fill_only = _fill_only(result, terms, sdpa, dtype, constants)
    halves = {half_added(t, result.add_dtypes) for t, _ in result.additive}
    if result.dense and len(halves) > 1:
        # the kernels' two additive slots: the boolean mask takes one, and one sum of both kinds would add the
        # half-precision terms at full precision (where a float16 finfo.min no longer saturates every masked key
        # to one value)
        raise MaskError("additive terms added to half-precision scores and to upcast ones, beside a boolean mask: "
                        "the kernels cannot add them at both precisions")
    return result


def _fill_only(result: MaskAnalysis, terms, sdpa: bool, dtype, constants: Constants) -> tuple | None:
    """``MaskAnalysis.fill_only`` for a site whose one additive term is a run-time float mask of the scores'
    dtype, added as written (no view, no scale, no other dtype): what it would be as a boolean term, were its
    values only 0 and ``finfo(dtype).min``. That fill absorbs every score in float32 / bfloat16 / float64
    (not float16), so every masked key scores it exactly, as a boolean term's fill does; no dense atom, and
    the boolean terms' fills must agree with an added one (``_fill``)."""
    if len(result.additive) != 1 or result.dense or result.alibi or dtype not in (
            torch.float32, torch.bfloat16, torch.float64):
        return None
    node, mult = result.additive[0]
    meta = tensor_meta(node)
    if (mult != 1.0 or meta is None or meta.dtype != dtype or node in result.term_steps or _needs_grad(node)
            or constants.is_constant(node) or constants.mutations.is_mutated(node)
            or result.add_dtypes.get(node, dtype) != dtype):
        return None
    fill = torch.finfo(dtype).min
    try:
        as_boolean = _fill([*terms, (None, True, fill, True, None)], sdpa, dtype, [])
    except MaskError:
        return None
    return node, fill, as_boolean


def fill_only_keep(mask: torch.Tensor, fill: float) -> torch.Tensor | None:
    """``mask == 0`` (True = keep) when ``mask`` holds only 0 and ``fill``, else None: one host sync, made once
    per forward for every layer that adds this mask. None while a CUDA graph is captured (nothing may sync, and
    a replay may see other values): the additive call is right for any values."""
    if capturing():
        return None
    keep = mask == 0
    return keep if bool((keep | (mask == fill)).all()) else None


# ----------------------------------------------------------------- a replaced fill, then an added one
def _replaced_then_added(booleans, additive, *, score_shape, dtype, constants: Constants, add_dtypes: dict,
                         add_locals: dict, sizes) -> MaskAnalysis:
    """GPT-2's ``where(band, s, m) + padding`` with ``m = finfo.min``: ``Fill.FINITE_REPLACED_ADDED``.

    Exact when the replaced fill is a band (causal, window) of ``m``, and every additive term adds 0 or the
    same ``m`` where a key padding masks, at a precision where ``m`` absorbs any score (``s + m == m``)
    and ``m + m`` overflows to ``-inf``: float32, bfloat16, float64. Otherwise a MaskError says what differs.
    """
    fills = {b.fill for b in booleans}
    if not all(b.before_add for b in booleans) or len(fills) != 1:
        raise MaskError("finite fills before and after an additive mask, or of different values: a row with no "
                        "visible key averages the keys holding the largest sum of fills, which the kernels do not "
                        "reproduce")
    fill = fills.pop()
    added_at = {add_dtypes.get(node) or dtype for node, _ in additive}
    at = added_at.pop() if len(added_at) == 1 else None
    if at == torch.float16:
        raise MaskError("where(band, s, finfo.min) then an added float16 mask: in float16 s + finfo.min rounds to a "
                        "multiple of 32 that depends on s, so a row the mask hides entirely is not the uniform average "
                        "the kernels compute; compute the scores in float32 (.float() before the masks) or in bfloat16")
    stored = {b.filled_at for b in booleans}
    if at not in (torch.float32, torch.bfloat16, torch.float64) or stored != {at} or fill != torch.finfo(at).min:
        raise MaskError(f"where(band, s, {fill:g}) on {'/'.join(str(d) for d in stored)} scores then a mask added at "
                        f"{at}: exact only for a fill of finfo.min of the dtype both run at, which absorbs every score "
                        "and doubles to -inf where both mask; use torch.finfo(scores.dtype).min for both")
    result = analyze([replace(b, before_add=False) for b in booleans], [], sdpa=False, score_shape=score_shape,
                     dtype=dtype, constants=constants, sizes=sizes)
    if result.key_padding or result.documents is not None or result.dense or not (result.causal or result.window):
        raise MaskError(f"where(cond, s, finfo.min) then an added mask, with a cond of {'+'.join(result.mask_terms)}:"
                        " the kernels reproduce a causal or sliding-window cond only")
    for node, mult, _, local in _summands(additive, {}, add_locals):
        try:
            read = _read_as_boolean(node, mult, None, constants, accept=lambda value: value == fill)
        except ArgumentError:
            read = None
        if read is None or _other_view(local, score_shape) is not None:
            raise MaskError(f"where(band, s, finfo.min) then {node.name} added: its values are data (or it is added "
                            "to another view of the scores), and a row that both hide entirely averages the keys "
                            "hidden by only one of them, which depends on those values; build the padding mask "
                            "from a bool tensor, where(keep, 0, finfo.min) or (1 - keep.to(dtype)) * finfo.min")
        cond, keep_when_true, _ = read
        padding, bands = MaskAnalysis(), []
        _classify_all(_conjunction(cond, negated=not keep_when_true, constants=constants), padding, bands, score_shape,
                      constants)
        if bands or padding.documents is not None or padding.dense or not padding.key_padding:
            raise MaskError(f"where(band, s, finfo.min) then {node.name} added, which masks more than keys "
                            "(a mask per query or per head): the kernels reproduce key padding only")
        result.key_padding.extend(padding.key_padding)
    result.fill = Fill.FINITE_REPLACED_ADDED
    result.notes.append("the band replaced by finfo.min, then key padding adding it: a row with no visible key "
                        "averages the keys hidden by only one of the two, as the original")
    return result


# ----------------------------------------------------------------- additive -> boolean
def _summands(additive, add_dtypes: dict, add_locals: dict):
    """Split sums of additive terms (T5 adds its mask into its position bias) into their parts,
    each with the dtype its sum was added to the scores at (None: unknown) and the shape of the
    scores it was added to (None: the site's). Each part broadcasts against those scores as the sum did."""
    out = []
    stack = [(node, mult, add_dtypes.get(node), add_locals.get(node)) for node, mult in reversed(additive)]
    while stack:
        node, mult, added_at, local = stack.pop()
        # an in-place add (``score += p2c``, DeBERTa) stays whole: its first operand holds the sum once the
        # add has run, so reading the operands again would count the second one twice
        if (kind(node) == "add" and all(isinstance(a, Node) for a in node.args[:2]) and not node.kwargs
                and not is_in_place(node)):
            stack.extend([(node.args[1], mult, added_at, local), (node.args[0], mult, added_at, local)])
        else:
            out.append((node, mult, added_at, local))
    return out


def _other_view(local, score_shape) -> tuple | None:
    """``local`` when it is a view of the scores of another rank, else None (the scores themselves)."""
    return None if local is None or len(local) == len(score_shape) else tuple(local)


def _as_boolean(node: Node, mult: float, dtype, constants: Constants):
    """``(cond, keep_when_true, fill)`` when the additive term only adds 0 or an exact masking fill."""
    try:
        return _read_as_boolean(node, mult, dtype, constants)
    except ArgumentError:
        return None  # an argument this reading does not interpret: the term stays additive (exact)


def _read_as_boolean(node: Node, mult: float, dtype, constants: Constants, accept=None):
    """``accept(fill)``: whether a fill value is taken (default: an exact fill at ``dtype``)."""
    accept = accept or (lambda fill: _exact_fill(fill, dtype))
    k = kind(node)
    if constants.mutations.is_mutated(node) or not math.isfinite(mult):
        return None  # an infinite multiplier makes the term's zeros NaN (0 * inf), not 0: it stays additive
    if k == "cast":  # a float cast keeps 0, -inf and the fills it represents exactly (others round)
        before, after = tensor_meta(node.args[0]), tensor_meta(node)
        if before is not None and after is not None and before.is_floating_point() and after.is_floating_point():
            inner = _read_as_boolean(node.args[0], 1.0, dtype, constants, accept=lambda fill: True)
            if inner is None or float(torch.tensor(inner[2], dtype=after.dtype)) != inner[2]:
                return None
            return (inner[0], inner[1], inner[2] * mult) if accept(inner[2] * mult) else None
        inner = _as_boolean(node.args[0], mult, dtype, constants)
        return inner if inner is not None and inner[2] == float("-inf") else None
    if k == "masked_fill":
        call = bind(node, ("input", "mask", "value"))
        if _is_zeros(call["input"], constants):
            fill = constants.number(call["value"])
            if fill is not None and accept(fill * mult):
                return call["mask"], False, fill * mult
    if k == "where":
        call = bind(node, ("condition", "input", "other"))
        cond, a, b = call["condition"], constants.number(call["input"]), constants.number(call["other"])
        if a == 0.0 and b is not None and accept(b * mult):
            return cond, True, b * mult
        if b == 0.0 and a is not None and accept(a * mult):
            return cond, False, a * mult
    if k == "mul":
        call = bind(node, ("input", "other"))
        x, y = call["input"], call["other"]
        factor, other = (constants.number(y), x) if constants.number(y) is not None else (constants.number(x), y)
        # ``(1 - b) * -inf`` is NaN where b holds (0 * -inf): only a finite factor reads as a boolean mask
        if factor is not None and math.isfinite(factor) and accept(factor * mult) and kind(other) == "sub":
            sub = bind(other, ("input", "other"))  # an ``alpha`` is an ArgumentError: not read as 1 - b
            one, flag = sub["input"], sub["other"]
            source = _bool_behind_cast(flag)
            mutated = constants.mutations.is_mutated
            if (constants.number(one) == 1.0 and source is not None
                    and not any(mutated(n) for n in (other, flag) if isinstance(n, Node))):
                return source, True, factor * mult
    return None


def _refuse_positive_infinity(node: Node, mult: float, constants: Constants) -> None:
    """A MaskError when the additive term adds +inf somewhere (a 0 / -inf mask subtracted from the scores): eager's
    scores are then NaN there, also where another term masked them with -inf first (-inf + inf), which the kernels,
    applying the masks as masks, do not reproduce."""
    if constants.is_constant(node) and not constants.mutations.is_mutated(node):
        value = constants.value(node)
        found = (isinstance(value, torch.Tensor) and value.is_floating_point()
                 and bool(torch.isinf(value).any()) and bool((value * mult == float("inf")).any()))
    else:
        try:
            read = _read_as_boolean(node, mult, None, constants, accept=lambda fill: True)
        except ArgumentError:
            read = None
        found = read is not None and read[2] == float("inf")
    if found:
        raise MaskError(f"{node.name} adds +inf to the scores (a -inf mask subtracted?): the original's scores are "
                        "NaN there")


def _label_finite_mask(node: Node, mult: float, result: MaskAnalysis, score_shape, constants: Constants) -> None:
    """Name where an additive term that stays additive masks, when it has a structure.

    The term only adds 0 or one finite masking value (-10000, float16's finfo.min) that does not absorb
    every score, or it is a per-key float tensor (a padding mask given as 0 / -inf): the kernels add it
    exactly as written, and the report names it by its structure (key padding, causal, window) instead
    of ``dense``. Only the label changes, never the arithmetic.
    """
    if _needs_grad(node) or constants.mutations.is_mutated(node):
        return
    scratch, bands = MaskAnalysis(), []
    try:
        read = _read_as_boolean(node, mult, None, constants, accept=lambda fill: True)
        if read is not None:
            cond, keep_when_true, fill = read
            if fill > MASKING_FILL:
                return  # a bias of two values (Swin's -100), not a mask
            for atom in _conjunction(cond, negated=not keep_when_true, constants=constants):
                _classify(atom, scratch, bands, score_shape, constants)
            how = f"adds {fill:g} where it masks"
        elif constants.is_constant(node):
            value = constants.value(node) * mult
            band = _constant_band(value, score_shape, fills_ok=True)
            if band is None:
                return
            bands.append(band)
            how = f"adds {float(value.min()):g} where it masks"
        elif _is_key_padding((1,) * (len(score_shape) - len(shape_of(node) or ())) + (shape_of(node) or ()),
                             score_shape) and tensor_meta(node).is_floating_point():
            scratch.key_padding.append(Atom(node, False))
            how = "a per-key float mask"
        else:
            return
        if bands:
            lo = max((b[0] for b in bands if b[0] is not None), default=None)
            hi = min((b[1] for b in bands if b[1] is not None), default=None)
            _set_band(scratch, lo, hi, score_shape[-2], score_shape[-1])
    except (ArgumentError, MaskError):
        return
    if scratch.dense or scratch.documents is not None:
        return
    names = tuple(n for n in scratch.mask_terms if n in ("causal", "window", "key_padding"))
    if names:
        result.finite_masks[node] = names
        result.notes.append(f"{'+'.join(names)} as an additive mask ({how}), added as written")


def _is_zeros(node, constants: Constants) -> bool:
    if not isinstance(node, Node) or constants.mutations.is_mutated(node):
        return False  # zeros written in place afterwards (``m.masked_fill_(upper, -inf)``)
    if node.op == "call_function" and node.target in (torch.zeros_like, torch.zeros):
        return True
    if isinstance(node, Node) and node.op == "call_method" and node.target == "new_zeros":
        return True
    return isinstance(node, Node) and constants.is_constant(node) and not bool(constants.value(node).any())


def _exact_fill(fill: float, dtype) -> bool:
    if fill == float("-inf"):
        return True
    return fill <= ABSORBING_FILL and dtype in (torch.float32, torch.bfloat16, torch.float64)


def _bool_behind_cast(node) -> Node | None:
    """The bool tensor that ``node`` casts to a number type (through expands), else None."""
    while isinstance(node, Node) and kind(node) in ("cast", "expand"):
        meta = tensor_meta(node.args[0])
        if meta is not None and meta.dtype == torch.bool:
            return node.args[0]
        node = node.args[0]
    return None


def _unbounded(additive, constants: Constants) -> list:
    """The additive terms that may push a visible score down to a finite fill: all but constants whose
    values are finite and above any masking value (ALiBi's slope x distance, a constant relative bias).
    Visible keys then stay far above a fill replaced after them, whose keys get exactly 0."""
    out = []
    for node, mult in additive:
        source = _elements_from(node, constants)
        if source is not None:
            value = constants.value(source) * mult
            if (isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isfinite(value).all())
                    and float(value.min()) > MASKING_FILL):
                continue
        out.append((node, mult))
    return out


#: steps whose output's elements are elements of their input (indexing, views, copies, repeats): a bound on
#: the input's values holds for the output, whatever the (possibly symbolic) indices and sizes
_ELEMENT_STEPS = frozenset({"getitem", "reshape", "expand", "unsqueeze", "transpose", "permute", "contiguous",
                            "flatten", "repeat_interleave", "mT", "cast"})
#: casts that keep a finite value above ``MASKING_FILL`` finite and above it
_WIDE_FLOATS = (torch.float32, torch.float64, torch.bfloat16)


def _elements_from(node, constants: Constants) -> Node | None:
    """A constant node (unmutated) among whose elements every element of ``node``'s value is: ``node`` itself when
    constant, else the constant it indexes, views or repeats. MPT slices its constant ALiBi tensor by the
    sequence's length, which under dynamic shapes is symbolic: the slice is no constant, but its values are the
    constant's."""
    while isinstance(node, Node):
        if constants.mutations.is_mutated(node):  # a copy written in place on the way (``t = c.clone(); t[0] = x``)
            return None
        if constants.is_constant(node):
            return node
        k, meta = kind(node), tensor_meta(node)
        if k not in _ELEMENT_STEPS or meta is None or not node.args or tensor_meta(node.args[0]) is None:
            return None
        if k == "cast" and meta.dtype not in _WIDE_FLOATS:
            return None
        node = node.args[0]
    return None


def _fill(terms, sdpa: bool, dtype: torch.dtype, additive) -> Fill:
    """One fill for the site: what its rows with no visible key produce (see kernels/fills.py)."""
    kinds, replaced, infinite_added = set(), set(), []
    for _, _, fill, added, _ in terms:
        if math.isinf(fill):
            kinds.add("-inf")
            infinite_added.append(added)
        elif fill <= MASKING_FILL:
            kinds.add("added" if added else "replaced")
            if not added:
                replaced.add(fill)
        else:
            raise MaskError(f"masked_fill value {fill:g} is too large to mask a key")
    if len(kinds) > 1:
        raise MaskError(f"the scores are masked in different ways ({', '.join(sorted(kinds))} fills)")
    if len(replaced) > 1:
        raise MaskError("the scores are masked with different finite values (" + ", ".join(
            f"{f:g}" for f in sorted(replaced)) + "): a row with no visible key averages only the keys "
            "holding the largest, which the kernels do not reproduce")
    if replaced:
        fill = replaced.pop()
        if not (fill <= ABSORBING_FILL or fill <= torch.finfo(dtype).min):
            raise MaskError(f"masked_fill value {fill:g} is finite: masked keys still count in a row whose "
                            "scores are near it (exact only for fills at or below -1e30 or the dtype's minimum)")
        if any(not _needs_grad(t) for t, _ in additive):  # ``additive``: the terms of unknown range
            raise MaskError("a finite masked_fill next to an additive mask: a row whose visible scores the "
                            "mask pushes down to the fill would average the masked keys too")
    if kinds == {"added"}:
        return Fill.FINITE_ADDED
    if kinds == {"replaced"}:
        return Fill.FINITE
    if sdpa:
        return Fill.SAFE
    # -inf added by every term: a row it hides entirely sends NaN through the additions to q and k too
    return Fill.NEG_INF_ADDED if infinite_added and all(infinite_added) else Fill.NEG_INF


# ----------------------------------------------------------------- conjunctions
def _conjunction(node, negated: bool, lifts: tuple = (), lift: bool = True, constants: Constants | None = None
                 ) -> list[Atom]:
    """Split ``node`` (or its negation) into atoms whose AND is the keep mask.

    With ``lift``, ``keep[:, None]`` of a conjunction is split too (packed documents write
    ``(same_doc & causal)[:, None]``): its atoms remember the inserted dims. With ``constants``, a bool cast
    of ``where(c, a, b)`` of two numbers is read as ``c`` or ``~c`` (MPT casts its 0 / finfo.min mask back).
    """
    def split(n, neg, lf=lifts):
        return _conjunction(n, neg, lf, lift, constants)

    if constants is not None and constants.mutations.is_mutated(node):
        return [Atom(node, negated, lifts)]  # written in place after it was computed: its operands no longer say it
    k = kind(node)
    if k in ("expand", "contiguous") or (k == "cast" and _bool_meta(node) and _bool_meta(node.args[0])):
        return split(node.args[0], negated)
    if k == "cast" and _bool_meta(node) and constants is not None:
        selected = _selected_truth(node.args[0], constants)
        if selected is not None:
            return split(selected[0], negated != selected[1])
    if k == "not":
        return split(node.args[0], not negated)
    if (k == "and" and not negated) or (k == "or" and negated):
        return split(node.args[0], negated) + split(node.args[1], negated)
    inserted = _inserted_dims(node) if lift else None
    if inserted is not None:
        return split(node.args[0], negated, inserted + lifts)
    return [Atom(node, negated, lifts)]


def _selected_truth(node, constants: Constants) -> tuple[Node, bool] | None:
    """``(c, flipped)`` when ``node`` is ``where(c, a, b)`` of two numbers of different truth: its truth is
    ``c`` (``a`` nonzero), or ``~c`` (``flipped``, ``b`` nonzero)."""
    if kind(node) != "where" or constants.mutations.is_mutated(node):
        return None
    try:
        call = bind(node, ("condition", "input", "other"))
    except ArgumentError:
        return None
    a, b = constants.number(call["input"]), constants.number(call["other"])
    if a is None or b is None or bool(a) == bool(b) or not _bool_meta(call["condition"]):
        return None
    return call["condition"], not bool(a)


def _inserted_dims(node) -> tuple[tuple[int, int], ...] | None:
    """``x[:, None]``-style indexing of a bool tensor that only inserts dims before its last two, as lifts."""
    if kind(node) != "getitem" or len(node.args) != 2 or node.kwargs or not _bool_meta(node):
        return None
    source, index = node.args
    index = index if isinstance(index, tuple) else (index,)
    shape = shape_of(source)
    if shape is None or any(i is not None and i != slice(None) for i in index):
        return None
    if sum(i is not None for i in index) > len(shape) or None not in index:
        return None
    lifts, rank, pos = [], len(shape), 0
    for i in index:
        if i is None:
            lifts.append((rank, pos))
            rank += 1
        pos += 1
    if any(dim >= rank - 2 for _, dim in lifts):
        return None
    return tuple(lifts)


def lifted_shape(shape: tuple, lifts, fill: int = 1) -> tuple:
    """``shape`` with the dims ``lifts`` insert (see ``Atom.lifts``), each of size ``fill``."""
    shape = tuple(shape)
    for rank, dim in lifts:
        shape = (fill,) * (rank - len(shape)) + shape
        shape = shape[:dim] + (fill,) + shape[dim:]
    return shape


def _lifted_dense(atoms: list[Atom], result: MaskAnalysis, score_shape, constants: Constants) -> bool:
    """Whether an atom with inserted dims would be a dense mask (the kernels read only bands, key padding
    and document ids through inserted dims)."""
    scratch = MaskAnalysis(documents=result.documents, document_atom=result.document_atom)
    _classify_all(atoms, scratch, [], score_shape, constants)
    return any(atom.lifts for atom in scratch.dense)


def _bool_meta(node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.dtype == torch.bool


# ----------------------------------------------------------------- classification
def _classify_all(atoms: list[Atom], result: MaskAnalysis, bands: list, score_shape, constants: Constants) -> None:
    """Classify a conjunction's atoms, document ids first: a comparison of positions is read within them."""
    for atom in sorted(atoms, key=lambda a: _documents(a, score_shape) is None):
        _classify(atom, result, bands, score_shape, constants)


def _classify(atom: Atom, result: MaskAnalysis, bands: list, score_shape, constants: Constants) -> None:
    node = atom.node
    shape = atom.shape()
    if shape is None:
        if constants.number(node) is not None:  # a scalar True/False
            if bool(constants.number(node)) != atom.negated:
                return
        raise MaskError(f"mask atom {node.name} has no tensor shape")
    rank = len(score_shape)
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    if _all_ones(node) and not atom.negated and not constants.mutations.is_mutated(node):
        # HF starts its mask as new_ones((), dtype=bool); one written in place (``m.tril_()``) is not all ones
        return
    if constants.is_constant(node):
        value = constants.value(node)
        if atom.negated:
            value = ~value
        value = run_steps(value.reshape(lifted_shape(value.shape, atom.lifts)), atom.steps).reshape(shape)
        if bool(value.all()):
            return
        band = _band_of(value, score_shape)
        if band is not None:
            bands.append(band)
            return
        result.dense.append(atom)
        return
    if atom.steps:  # read through a view of the scores: passed to the kernels as it is, in their frame
        result.dense.append(atom)
        return
    # a comparison, a slice or document ids read as structure (a band, every key kept, documents) only where
    # nothing on the way is written in place (``pos[0] = n`` after ``pos = arange(n)``, ``same[..., 0] = True``):
    # what is written is the mask's value, which only the mask as written (a dense atom) carries
    structural = not _written_in_place(node, constants.mutations.is_mutated)
    if structural and always_true(node, atom.negated):  # an index comparison keeping every position (``q_idx >= 0``)
        return
    band = band_of_comparison(node, atom.negated, len(score_shape)) if structural else None  # symbolic index masks
    if band is None and structural:
        band = _band_of_sliced_constant(node, atom.negated, constants)
    if band is None and structural:
        band = _band_within_documents(atom, result, len(score_shape), constants)
    if band is not None:
        bands.append(band)
        return
    if _is_key_padding(shape, score_shape):
        result.key_padding.append(atom)
        return
    # document ids are read by the kernels at run time (where they are then): only the comparison itself must be
    # unwritten (``same = a == b; same[..., 0] = True`` is not a comparison of ids any more)
    docs = _documents(atom, score_shape) if not constants.mutations.is_mutated(node) else None
    if docs is not None and result.documents is None:
        result.documents, result.document_atom = docs, atom
        result.documents_same = _same_documents(atom, docs, score_shape, constants)
        return
    result.dense.append(atom)
    _label_padding_product(atom, result, score_shape)


def _label_padding_product(atom: Atom, result: MaskAnalysis, score_shape) -> None:
    """Name a dense atom that is the truth of a product of integer key and query padding masks, DeBERTa's
    ``(mask[:, None, None, :] * mask[:, None, :, None]).bool()``: key padding, and rows of padded queries
    that see no key. The kernels still read the atom as written (its arithmetic is the mask's), so only the
    report changes."""
    node = atom.node
    if atom.negated or atom.lifts or atom.steps or kind(node) != "cast" or not _bool_meta(node):
        return
    product = node.args[0]
    if kind(product) != "mul" or len(product.args) != 2 or product.kwargs:
        return
    rank, q_len, kv_len = len(score_shape), score_shape[-2], score_shape[-1]
    shapes = []
    for factor in product.args:
        meta = tensor_meta(factor) if isinstance(factor, Node) else None
        if meta is None or meta.is_floating_point() or meta.is_complex() or len(meta.shape) > rank:
            return
        shapes.append((1,) * (rank - len(meta.shape)) + tuple(meta.shape))
    keys = [_is_key_padding(shape, score_shape) for shape in shapes]
    queries = [shape[-2:] == (q_len, 1) and all(d == 1 for d in shape[1:-2]) and shape[0] in (1, score_shape[0])
               and q_len != 1 for shape in shapes]
    if any(keys) and all(k or q for k, q in zip(keys, queries)) and kv_len != 1:
        result.dense_labels[node] = ("key_padding",)
        rows = " and the padded queries' rows (no visible key)" if any(queries) else ""
        result.notes.append(f"key padding{rows} as the product {product.name}, read as the mask it is written as")


def _band_of_sliced_constant(node: Node, negated: bool, constants: Constants):
    """The band of a mask that is a top-left slice of a constant, ``bias[:, :, :t, :t] == 0``, when the
    slice has a symbolic size (a graph captured with dynamic shapes).

    Every top-left ``[a, b]`` block of a matrix that is constant along its diagonals keeps the same
    diagonals, so the band proven on the whole constant holds for every ``t``. The chain from the
    slice to ``node`` must be elementwise ops with constant scalars; the slice must start at 0 with
    step 1 in the last two dims and take everything before them.
    """
    chain = []
    while not (kind(node) == "getitem" and isinstance(node.args[0], Node) and constants.is_constant(node.args[0])):
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op not in ("call_function", "call_method") or not _elementwise(node):
            return None
        chain.append(node)
        node = inputs[0]
    source, index = node.args[0], node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    full = constants.value(source)
    if not isinstance(full, torch.Tensor) or full.dim() < 2 or len(index) != full.dim():
        return None
    if not all(i == slice(None) for i in index[:-2]) or not all(_from_start(i) for i in index[-2:]):
        return None
    value = full
    for op in reversed(chain):
        args = torch.fx.node.map_arg(op.args, lambda a: value if a is op.all_input_nodes[0] else a)
        if op.op == "call_function":
            value = op.target(*args, **op.kwargs)
        else:
            value = getattr(args[0], op.target)(*args[1:], **op.kwargs)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.shape[-2:] != full.shape[-2:]:
        return None
    keep = ~value if negated else value
    return _band_of(keep, tuple(keep.shape))


_ELEMENTWISE = frozenset({"eq", "not", "cast"})
_ELEMENTWISE_OPS = frozenset({"__ne__", "ne", "__lt__", "lt", "__le__", "le", "__gt__", "gt", "__ge__", "ge"})


def _elementwise(node: Node) -> bool:
    """An elementwise op of one tensor and constant scalars (``x == 0``, ``~x``, ``x.bool()``)."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if not isinstance(a, (int, float, bool, torch.dtype))]
    if others:
        return False
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return kind(node) in _ELEMENTWISE or target in _ELEMENTWISE_OPS


def _from_start(index) -> bool:
    return isinstance(index, slice) and index.start in (None, 0) and index.step in (None, 1)


def _constant_band(value: torch.Tensor, score_shape, fills_ok: bool = False):
    """The band of a constant additive mask whose entries are all 0 or -inf (``fills_ok``: or all 0 or one
    masking value), else None."""
    if not value.is_floating_point():
        return None
    masked = torch.isneginf(value)
    if fills_ok and not bool(masked.any()):
        low = value.min()
        masked = value == low if float(low) <= MASKING_FILL else masked
    if not bool(((value == 0) | masked).all()):
        return None
    rank = len(score_shape)
    keep = (value == 0).reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    return _band_of(keep, score_shape)


def alibi_slopes(value: torch.Tensor, score_shape) -> list[float] | None:
    """Per-head slopes ``m_h`` when a constant additive term is ALiBi: ``m_h * (j - i)`` (or
    ``-m_h * |j - i|``, or ``m_h * j`` as BLOOM writes it, equal under the row softmax), else None."""
    if not value.is_floating_point() or value.dim() < 3:
        return None
    q_len, kv_len = score_shape[-2], score_shape[-1]
    if value.shape[-1] != kv_len or value.shape[-2] not in (1, q_len) or kv_len < 2:
        return None
    if not _first_row_affine(value):
        return None
    if not bool(torch.isfinite(value).all()):
        return None
    grid = value.detach().reshape(-1, *value.shape[-3:]).cpu().double()  # [b, h, q or 1, k]
    if not bool((grid == grid[:1]).all()):
        return None
    grid = grid[0]  # [h, rows, k]
    rows = grid.shape[-2]
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(kv_len, dtype=torch.float64)[None, :]
    for distance in (j - i, -(j - i).abs(), j.expand(rows, kv_len)):
        unit = distance[0, 1] - distance[0, 0]
        slopes = (grid[:, 0, 1] - grid[:, 0, 0]) / unit  # [h]
        expected = slopes[:, None, None] * distance[None]
        offset = grid[:, :, :1] - expected[:, :, :1]  # a per-row constant is invisible to the softmax
        if bool((slopes != 0).any()) and bool(torch.allclose(grid, expected + offset, rtol=1e-4, atol=1e-4)):
            return [float(x) for x in slopes.abs()]
    return None


def _first_row_affine(value: torch.Tensor) -> bool:
    """A necessary condition of ``alibi_slopes``, read from one row: every head's first query row is affine in
    the key index (``m_h * j`` plus a constant, in each of ALiBi's forms), within what the whole comparison's
    tolerance lets through. A constant causal mask of 0 and a finite fill (an HF model's ``finfo.min``) fails it
    here, before its whole ``[Nq, Nk]`` grid is copied to the host in float64 and compared three times: at 16k
    tokens that took seconds per site, and a checkpointed model analyses each layer's region on its own."""
    first = value.detach().reshape(-1, *value.shape[-3:])[0, :, 0, :].double()  # [h, k]
    if not bool(torch.isfinite(first).all()):
        return False
    bends = first.diff(n=2, dim=-1).abs()  # 0 on an affine row
    # the whole comparison allows 1e-4 (+ 1e-4 relative) per entry, so up to four times that per second difference
    allowed = 4e-4 * (1.0 + 1.01 * first.abs().amax(dim=-1, keepdim=True))
    return bool((bends <= allowed).all())


def _run_time_alibi(node: Node, steps, score_shape, constants: Constants) -> bool:
    """Whether an additive term is per-head constant slopes times integer key positions computed at run time
    (BLOOM's ``slopes[:, None] * ((mask.cumsum(-1) - 1) * mask)``): as the scores see it ``[B or 1, H, 1, Nk]``,
    a product of a constant with one value per head and an integer tensor without heads. Only the label."""
    shape = shape_of(node)
    if shape is None or len(score_shape) != 4 or _needs_grad(node):
        return False
    seen = (1,) * (4 - len(apply_steps(shape, steps))) + tuple(apply_steps(shape, steps))
    heads = score_shape[1]
    if seen[1:3] != (heads, 1) or seen[3] != score_shape[3] or not isinstance(heads, int) or heads < 2:
        return False
    while kind(node) in ("cast", "reshape") and isinstance(node.args[0], Node):
        node = node.args[0]
    if kind(node) != "mul" or len(node.args) != 2 or node.kwargs or not all(isinstance(a, Node) for a in node.args):
        return False
    slopes, positions = node.args if constants.is_constant(node.args[0]) else node.args[::-1]
    if not constants.is_constant(slopes) or constants.is_constant(positions):
        return False
    value, meta = constants.value(slopes), tensor_meta(positions)
    return (isinstance(value, torch.Tensor) and value.numel() == heads and value.is_floating_point()
            and bool(torch.isfinite(value).all()) and meta is not None and not meta.is_floating_point()
            and meta.dtype != torch.bool and math.prod(shape_of(positions) or (0,)) * heads == math.prod(shape))


def _all_ones(node: Node) -> bool:
    """``x.new_ones(...)`` / ``torch.ones(...)`` / ``torch.ones_like(x)``: True everywhere, whatever x is."""
    if node.op == "call_method" and node.target == "new_ones":
        return True
    return node.op == "call_function" and node.target in (torch.ones, torch.ones_like)


def _is_key_padding(shape, score_shape) -> bool:
    # against [B*H, Nq, Nk] scores a leading dim of B*H is per head, not per batch row
    batch_ok = shape[0] == 1 or (len(score_shape) == 4 and shape[0] == score_shape[0])
    return shape[-1] == score_shape[-1] and batch_ok and all(s == 1 for s in shape[1:-1])


def _documents(atom: Atom, score_shape) -> tuple[Node, Node] | None:
    node = atom.node
    if atom.negated or kind(node) != "eq" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args[0], node.args[1]
    sa, sb, rank = shape_of(a), shape_of(b), len(shape_of(node) or ())
    if sa is None or sb is None:
        return None
    # the ids as the scores see them: right-aligned in the comparison, then the mask's inserted dims
    sa, sb = (lifted_shape((1,) * (rank - len(s)) + s, atom.lifts) for s in (sa, sb))
    rank = len(score_shape)
    sa, sb = (1,) * (rank - len(sa)) + sa, (1,) * (rank - len(sb)) + sb
    q_len, kv_len = score_shape[-2], score_shape[-1]
    ok = (
        sa[-2:] == (q_len, 1) and sb[-2:] == (1, kv_len)
        and all(s == 1 for s in sa[1:-2] + sb[1:-2])
        and sa[0] in (1, score_shape[0]) and sb[0] in (1, score_shape[0])
        and not tensor_meta(a).is_floating_point() and not tensor_meta(b).is_floating_point()
    )
    return (a, b) if ok else None


def _in_scores(form: Affine, of: Node, lifts, rank: int) -> tuple:
    """``(coefficients over the scores' dims, static offset or None)`` of an index form over the positions of
    ``of`` (or of a tensor ``of`` broadcasts, right-aligned), seen through the atom's inserted dims ``lifts``."""
    coeffs = lifted_shape(form.align(len(shape_of(of) or ())), lifts, fill=0)
    return (0,) * (rank - len(coeffs)) + coeffs, static_int(form.offset)


def _same_documents(atom: Atom, docs: tuple[Node, Node], score_shape, constants: Constants) -> bool:
    """Whether the query ids and the key ids are one vector: both read one tensor that nothing writes in place,
    at the same rows, the query ids at ``f(i)`` of the query index and the key ids at ``f(j)`` of the key index
    with the same ``f``, over as many queries as keys. A packed model's ``ids[b, q_idx] == ids[b, kv_idx]``
    and a hand-written ``doc[:, :, None] == doc[:, None, :]`` are. Structure only: no value is read."""
    q_len, kv_len = score_shape[-2], score_shape[-1]
    if not _same_size(q_len, kv_len):
        return False
    reads = [read_of(n) for n in docs]
    mutated = constants.mutations.is_mutated
    if None in reads or reads[0].source is not reads[1].source or mutated(reads[0].source):
        return False
    # the index tensors are read where each read runs: none of what they are computed from may be written
    if any(_written_in_place(index, mutated) for node in docs for index in _index_nodes(node)):
        return False
    rank, eq_rank = len(score_shape), len(shape_of(atom.node) or ())
    # each read's size along the scores' dims: a coefficient along a dim of size 1 reads position 0 only
    sizes = []
    for node in docs:
        shape = lifted_shape((1,) * (eq_rank - len(shape_of(node))) + tuple(shape_of(node)), atom.lifts)
        sizes.append((1,) * (rank - len(shape)) + shape)
    for form_q, form_k in zip(reads[0].coords, reads[1].coords):
        (q, q_offset), (k, k_offset) = (_in_scores(f, atom.node, atom.lifts, rank) for f in (form_q, form_k))
        q, k = (tuple(0 if n == 1 else c for c, n in zip(coeffs, size)) for coeffs, size in zip((q, k), sizes))
        if q_offset is None or q_offset != k_offset or q[:-2] != k[:-2]:
            return False
        if q[-1] != 0 or k[-2] != 0 or q[-2] != k[-1]:  # f over the own index only, the same for both
            return False
    return True


def _index_nodes(read: Node) -> list[Node]:
    """The index tensors of a read ``src[i, j]`` (none for a view ``src[:, None]``)."""
    index = read.args[1]
    return [i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, Node)]


def _written_in_place(node: Node, mutated) -> bool:
    """Whether ``node`` or anything it is computed from is written in place somewhere in the graph."""
    return _any_upstream(node, mutated)


def _any_upstream(node: Node, test) -> bool:
    """Whether ``test`` holds for ``node`` or for any node it is computed from."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if test(current):
            return True
        todo.extend(current.all_input_nodes)
    return False


def _same_size(a, b) -> bool:
    """Two sizes known to be equal without a guard: equal ints, or one symbolic expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _band_within_documents(atom: Atom, result: MaskAnalysis, rank: int, constants: Constants):
    """The band of a comparison of positions read within the site's documents (HF's packed rows), else None.

    When the document ids are numbered from positions, ``cumsum(diff(pos) != 1)``, two tokens of a row
    that share an id have ``pos[u] - pos[w] == u - w`` (``symbolic.document_positions``). Where the
    document term keeps a pair, ``pos[row, u] + a <op> pos[row, w] + b`` is then ``u + a <op> w + b``:
    HF's causal ``pos[kv] <= pos[q]`` is ``kv <= q``. Both sides must read those positions (a position
    against an index proves nothing), at the rows the ids are read at and at the query / key indices
    they are read at, which must not be negative (``pos[-1]`` is the last column).
    """
    node, anchor = atom.node, result.document_atom
    if anchor is None or atom.lifts != anchor.lifts or len(node.args) != 2 or node.kwargs:
        return None
    mutated = constants.mutations.is_mutated
    ids = [read_of(n) for n in result.documents]
    if None in ids or any(mutated(r.source) for r in ids):
        return None
    sources = {_unexpanded(document_positions(r.source, mutated)) for r in ids}
    if len(sources) != 1 or None in sources:
        return None

    def in_scores(form: Affine, of: Node) -> tuple:
        return _in_scores(form, of, atom.lifts, rank)

    rows = {tuple(in_scores(c, anchor.node) for c in r.coords[:-1]) for r in ids}
    columns = {in_scores(r.coords[-1], anchor.node) for r in ids}
    if len(rows) != 1 or any(offset is None for _, offset in next(iter(rows))):
        return None  # one row per batch entry, the same for both ids (symbolic offsets could differ)
    if any(offset is None or offset < 0 or min(coeffs) < 0 for coeffs, offset in columns):
        return None
    columns_of = {}
    for operand in node.args:
        read_node = unshifted(operand)
        read = read_of(read_node)
        if read is None or _unexpanded(read.source) not in sources:
            return None
        if (tuple(in_scores(c, node) for c in read.coords[:-1]) not in rows
                or in_scores(read.coords[-1], node) not in columns):
            return None
        columns_of[read_node] = read.coords[-1]
    return band_of_comparison(node, atom.negated, rank, leaf=columns_of.get)


def _unexpanded(node):
    """The tensor ``node`` expands (``pos.expand(B, -1)``: every element is one of its own), or ``node``."""
    while kind(node) == "expand" and node.target == "expand" and len(shape_of(node)) == len(shape_of(node.args[0])):
        node = node.args[0]
    return node


def _band_of(value: torch.Tensor, score_shape) -> tuple[int | None, int | None] | None:
    """``(lo, hi)`` with keep iff lo <= j - i <= hi (None unbounded), when ``value`` is such a band."""
    q_len, kv_len = score_shape[-2], score_shape[-1]
    if value.shape[-2:] != (q_len, kv_len):
        return None
    flat = value.reshape(-1, q_len, kv_len)
    grid = flat[0]
    if not bool((flat == grid).all()):
        return None
    if q_len > 1 and kv_len > 1 and not bool((grid[1:, 1:] == grid[:-1, :-1]).all()):
        return None  # not constant along diagonals
    # f(r) for r = j - i from -(q_len - 1) to kv_len - 1: first column upwards, then first row
    f = torch.cat([grid[1:, 0].flip(0), grid[0]])
    kept = torch.nonzero(f).flatten()
    if kept.numel() == 0:
        return None
    first, last = int(kept[0]), int(kept[-1])
    if last - first + 1 != kept.numel():
        return None  # the kept diagonals are not one interval
    lo = first - (q_len - 1)
    hi = last - (q_len - 1)
    return (None if first == 0 else lo), (None if last == f.numel() - 1 else hi)


def _set_band(result: MaskAnalysis, lo: int | None, hi: int | None, q_len, kv_len) -> None:
    """Express ``lo <= j - i <= hi`` as causal (with its alignment) and a window.

    ``q_len`` / ``kv_len`` may be symbolic: bottom-right alignment is only claimed when ``Nk - Nq``
    is the same number for every shape the graph accepts, never from the captured sizes' hints.
    """
    if lo is not None and hi is not None and lo > hi:
        raise MaskError("the structural masks keep no key at all")
    offset = 0
    if hi == 0:
        result.causal = True
    elif hi is not None and static_int(kv_len - q_len) == hi:
        result.causal, result.align, offset = True, Align.BOTTOM_RIGHT, hi
    elif hi is not None and hi < 0:
        raise MaskError(f"the band j - i <= {hi} excludes the diagonal: not expressible as causal or window")
    left = None if lo is None else offset - lo
    if left is not None and left < 0:
        raise MaskError(f"the band j - i >= {lo} starts right of the diagonal: not expressible as a window")
    right = None if result.causal or hi is None else hi
    if left is not None or right is not None:
        result.window = Window(left, right)


def _needs_grad(node: Node) -> bool:
    """Whether an additive term is learned (a bias computed from parameters), not a mask."""
    meta = tensor_meta(node)
    if meta is not None and meta.requires_grad:
        return True
    return _any_upstream(node, is_parameter)
