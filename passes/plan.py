"""The planner: for every attention site pick the kernel to run, within ``exact`` and ``max_mem``, and say why.

Per site (``candidates``): every registered kernel is a candidate, and so is
the site's original code (``ORIGINAL``: keep the subgraph as it was). A kernel
is rejected with reasons when it cannot compute the spec (its own
``not_supported_reasons``), when it is approximate and ``exact=True``, or when
its error measured on the example inputs is not under ``tol``. The survivors
and the original are timed (``tuning``: on the CPU and on CUDA, within a time
budget, cached on disk); what was not timed keeps its cost model's estimate.
Kernels are ranked measured first, then by time.

Never slower (``choose``): the fastest kernel replaces the site only when it
is faster than the original by more than the timing noise (``NOISE``), or as
fast within the noise and smaller in memory. Otherwise the site stays as it
was: "original measured fastest". Both sides are compared the same way:
measured against measured when both were timed, else estimate against
estimate. Approximate kernels are used only when no exact plan fits
``max_mem``; the original is an exact plan.

Per graph (``plan_graph``): start from each site's choice and estimate the
graph's peak memory (``memory.graph_peak``). While it is over ``max_mem``,
move the site with the largest footprint to its fastest candidate with a
smaller one, even a slower one (the reason then says ``max_mem`` forced it):
first among exact plans, then, only when ``exact=False`` and no exact plan
fits, among the accepted approximations. When nothing fits,
``MemoryBudgetError`` says what would. A forced ``kernel=`` is used as given.

A site left as it was has ``SitePlan.choice`` None and ``SitePlan.error`` says
why; ``SitePlan.decision`` keeps the comparison that decided it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from itertools import zip_longest

import torch
from torch.fx import GraphModule

from attnopt.kernels import fills, registry
from attnopt.kernels.spec import AttentionSpec, Fill

from . import calibrate, memory, tuning
from .detect import Match
from .graph import ExampleValues, hint, module_path, placeholder_values, tensor_meta, written_inputs
from .rewrite import spec_of
from .tuning import ORIGINAL

#: relative timing noise: medians of a few runs on a shared machine differ by a few percent between
#: runs, so a kernel must be this much faster than the original to replace it on time alone
NOISE = 0.05


@dataclass(frozen=True)
class Candidate:
    kernel: str
    reasons: tuple[str, ...]
    cost: float | None  # seconds: measured when ``measured``, else the cost model's estimate
    memory_bytes: int | None  # workspace of one forward
    exact: bool = True
    measured: bool = False
    saved_bytes: int = 0  # kept for the backward (training only)
    error: float | None = None  # measured relative error (approximate kernels)
    estimate: float | None = None  # the cost model's seconds, also when ``cost`` is measured
    #: timed after inductor's compile of the graph (``candidates``' ``defer``), compiled in the background before
    deferred: bool = False

    @property
    def supported(self) -> bool:
        return not self.reasons

    @property
    def original(self) -> bool:
        """Whether this candidate is the site's original code (keep the subgraph)."""
        return self.kernel == ORIGINAL

    @property
    def footprint(self) -> int:
        return (self.memory_bytes or 0) + self.saved_bytes


@dataclass(frozen=True)
class Choice:
    kernel: str
    exact: bool
    reason: str
    candidates: tuple[Candidate, ...] = field(default=())

    @property
    def rejected(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.supported)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.kernel == self.kernel)

    @property
    def deferred(self) -> tuple[str, ...]:
        """The kernels to time after the graph's compile, against the chosen one (which replaces the site)."""
        if self.kernel == ORIGINAL:
            return ()
        return tuple(c.kernel for c in self.candidates if c.deferred and c.kernel != self.kernel)


#: the reason of a candidate that raised when run for timing (``tuning.measured_seconds`` logs the error)
FAILED_WHEN_TIMED = ("failed when run on these shapes (the warning logged when it was timed says why; the tuning "
                     "cache keeps the failure: empty it to try again)")


class NoKernelError(ValueError):
    """No registered kernel can compute a spec under the constraints."""


class MemoryBudgetError(ValueError):
    """No plan's estimated peak memory fits ``max_mem``: the message says what would."""


def candidates(
    spec: AttentionSpec, *, exact: bool = True, forced: str | None = None, tune: bool = False,
    cache: tuning.TuningCache | None = None, original: tuning.Original | None = None,
    budget: tuning.Budget | None = None, replayed: bool = False, defer: bool = False,
    padding: torch.Tensor | None = None, sharing: int = 1,
) -> list[Candidate]:
    """Every kernel (or only ``forced``), and the ``original`` code when given, with reasons, time and memory.

    Approximate kernels are not chosen site by site: with ``exact=False`` the whole graph's plan is
    (``approximate``), by the error of the model's output; here they carry that reason, unless forced.
    Supported candidates come first, measured ones before estimated ones, each by time. ``defer`` (a graph that
    inductor compiles next): the kernels ``tuning.deferrable`` names are not timed now but marked ``deferred``,
    with their estimate. ``padding``: the key padding to time on (``captured_padding``). ``sharing``: the sites
    whose calls share this site's term tensors (``term_sharing``).
    """
    names = [forced] if forced is not None else [k.name for k in registry.all_kernels() if not _variant(k)]
    found = []
    for name in names:
        kernel = registry.get(name)
        reasons = list(kernel.not_supported_reasons(spec))
        if forced is None and kernel.devices is not None and spec.device.type not in kernel.devices:
            reasons.insert(0, f"meant for {'/'.join(kernel.devices)}; on {spec.device.type} only when forced "
                              f"by name (kernel={name!r})")
        if not kernel.exact and not reasons:
            if exact:
                reasons.append("approximate kernel and exact=True")
            elif forced is None:
                reasons.append("approximate: chosen for the whole graph by the error of its output, not per site")
        cost = mem = None
        saved = 0
        if not reasons:
            cost, mem = kernel.cost(spec), kernel.memory_bytes(spec)
            saved = kernel.saved_bytes(spec) if spec.requires_grad else 0
        found.append(Candidate(name, tuple(reasons), cost, mem, kernel.exact, False, saved, None, cost))
    if original is not None and forced is None:
        estimate = tuning.original_estimate(spec, original)
        found.append(Candidate(ORIGINAL, (), estimate, original.memory_bytes, estimate=estimate))
    supported = [c for c in found if c.supported]
    if cache is not None and tuning.enabled(spec, tune) and len(supported) > 1 and forced is None:
        estimates = {c.kernel: c.estimate for c in supported}
        later = tuning.deferrable(spec, list(estimates), estimates, cache, replayed) if defer else []
        seconds = tuning.measured_seconds(
            spec, [n for n in estimates if n not in later], cache, label=_label(spec), original=original,
            estimates=estimates, budget=budget, replayed=replayed, padding=padding, sharing=sharing,
        )
        found = [
            replace(c, deferred=True) if c.kernel in later else
            replace(c, cost=seconds[c.kernel], measured=True)
            if c.supported and math.isfinite(seconds.get(c.kernel, math.inf)) else
            replace(c, reasons=(FAILED_WHEN_TIMED,)) if c.supported and c.kernel in seconds and c.kernel != ORIGINAL else c
            for c in found
        ]
    # stable: equal costs keep registration order
    return sorted(found, key=lambda c: (not c.supported, not c.measured, c.cost if c.cost is not None else math.inf))


def _label(spec: AttentionSpec) -> str:
    terms = "+".join(spec.mask_terms) or "full"
    return f"{terms} {spec.batch}x{spec.q_heads}x{spec.q_len}x{spec.kv_len} {str(spec.dtype).replace('torch.', '')}"


def choose(spec: AttentionSpec, *, exact: bool = True, forced: str | None = None,
           original: tuning.Original | None = None, **options) -> Choice:
    """The plan for ``spec``: its fastest allowed kernel, or, with ``original``, the original code when no
    kernel is faster (see the module docstring); ``forced`` names one kernel and only checks it."""
    found = candidates(spec, exact=exact, forced=forced, original=original, **options)
    if any(c.deferred for c in found) and not _replaces(found):
        # the kernels timed now keep the original: the deferred ones decide whether the site is replaced at all,
        # so they are compiled and timed now (a site's replacement is not undone after the compile)
        found = candidates(spec, exact=exact, forced=forced, original=original, **{**options, "defer": False})
    kernels = [c for c in found if not c.original]
    allowed = [c for c in kernels if c.supported]
    if not allowed:
        lines = "\n".join(f"  {c.kernel}: {'; '.join(c.reasons)}" for c in kernels)
        raise NoKernelError(f"no attention kernel supports this call ({spec.mask_terms or 'no mask'}):\n{lines}")
    best = allowed[0]
    kept = next((c for c in found if c.original), None)
    if kept is None or forced is not None:
        return Choice(best.kernel, best.exact, _reason(best, allowed, forced), tuple(found))
    replaces, reason = versus_original(best, kept, len(allowed))
    return Choice(best.kernel if replaces else ORIGINAL, True, reason, tuple(found))


def _replaces(found: list[Candidate]) -> bool:
    """Whether the fastest kernel measured in ``found`` replaces its original (True without an original)."""
    kept = next((c for c in found if c.original), None)
    timed = [c for c in found if c.supported and not c.original and c.measured]
    return kept is None or (bool(timed) and versus_original(timed[0], kept)[0])


def _variant(kernel) -> bool:
    """A calibration's configured copy of an approximate family (listed once, as its family)."""
    return getattr(kernel, "variant", False)


def _times(kernel: Candidate, original: Candidate) -> tuple[float, float, str]:
    """The two candidates' seconds, compared like with like: both measured, else both estimated."""
    if kernel.measured and original.measured:
        return kernel.cost, original.cost, "measured"
    return kernel.estimate, original.estimate, "estimated"


def versus_original(best: Candidate, original: Candidate, n_allowed: int = 1) -> tuple[bool, str]:
    """Whether kernel ``best`` replaces the original code, and why (or why not)."""
    t_kernel, t_original, how = _times(best, original)
    of = f", fastest of {n_allowed} supported kernels" if n_allowed > 1 else ""
    versus = f"{best.kernel} {format_seconds(t_kernel)} vs the original's {format_seconds(t_original)}"
    if t_kernel * (1 + NOISE) < t_original:
        return True, f"{how} {t_original / t_kernel:.1f}x faster than the original ({versus}){of}"
    if t_kernel <= t_original * (1 + NOISE) and best.footprint < original.footprint:
        return True, (f"{how} as fast as the original within {NOISE:.0%} ({versus}) and smaller "
                      f"({memory_fmt(best.footprint)} vs {memory_fmt(original.footprint)})")
    if t_kernel < t_original:
        return False, (f"original kept: {how} only {(t_original / t_kernel - 1):.0%} faster, within the noise, "
                       f"and not smaller ({versus})")
    return False, f"original {how} fastest ({versus})"


def format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _reason(best: Candidate, allowed: list[Candidate], forced: str | None, budget_note: str = "") -> str:
    if forced is not None:
        return f"forced by kernel={forced!r}"
    if len(allowed) == 1:
        return "only kernel supporting this call" + budget_note
    how = "measured" if best.measured else "estimated"
    return f"lowest {how} time of {len(allowed)} supported kernels{budget_note}"


# ------------------------------------------------------------------ whole graph
@dataclass
class SitePlan:
    match: Match
    spec: AttentionSpec
    where: str
    decision: Choice | None  # None: no kernel supports the site; kernel ORIGINAL: the original is the plan
    unsupported: str | None = None  # why no kernel supports the site

    @property
    def choice(self) -> Choice | None:
        """The kernel that replaces the site; None leaves the site as it was (``error`` says why)."""
        if self.decision is None or self.decision.kernel == ORIGINAL:
            return None
        return self.decision

    @property
    def error(self) -> str | None:
        """Why the site is left as it was: no kernel supports it, or the original is the better plan."""
        if self.decision is None:
            return self.unsupported
        return self.decision.reason if self.decision.kernel == ORIGINAL else None


@dataclass(frozen=True)
class Approximation:
    """What ``exact=False`` chose for one graph, and what it measured on the example inputs."""

    output_error: float  # relative error of the graph's outputs with the chosen plan
    tol: float
    seconds: float  # the sites' time under the chosen plan
    exact_seconds: float  # the same sites' time under the exact plan
    how: str  # "measured" or "estimated"
    runs: int  # whole-graph runs the search made
    sites: tuple[tuple[str, str, float], ...]  # (where, kernel with its settings, that site's own error)


@dataclass
class GraphPlan:
    sites: list[SitePlan]
    training: bool
    budget: int | None
    peak_before: memory.Peak
    peak_after: memory.Peak
    #: what is left of the first call's timing budget: pass it to any further ``choose`` for this graph
    timing: tuning.Budget | None = None
    #: the approximate plan in use, when ``exact=False`` found one
    approximation: Approximation | None = None


def plan_graph(gm: GraphModule, matches: list[Match], options, example_inputs=None,
               defer: bool = False) -> GraphPlan:
    """Choose a kernel for every match of ``gm`` so that the graph's estimated peak fits ``options.max_mem``.

    The exact plan first (each site's fastest exact candidate, the original included; then ``max_mem``);
    with ``exact=False`` and the example inputs, ``approximate`` may then replace it by a faster plan
    whose output error is under ``tol``. ``defer`` (a graph inductor compiles next): on the devices of
    ``tuning.DEFER_DEVICES``, an exact plan without a memory budget times the kernels that must first compile
    after that compile (``candidates``); each such site's choice lists them (``Choice.deferred``).
    """
    training = _training(gm)
    cache = tuning.TuningCache(tuning.cache_dir(options.cache_dir)) if options.tune else None
    examples = ExampleValues(gm.graph, placeholder_values(gm, example_inputs)) if (
        training and options.tune and example_inputs is not None) else None
    specs = [spec_of(m) for m in matches]
    budget = tuning.Budget.for_device(specs[0].device) if specs else None
    replayed = tuning.replays_graphs(options)
    sites = []
    for match, spec, sharing in zip(matches, specs, term_sharing(matches)):
        where = module_path(match.anchor)
        # (an ONNX export's graph is inference, whatever its tensors require: the Attention op has no backward)
        unmatched = None if not training or gm.meta.get(EXPORT_META) else original_gradients_unmatched(match.kind, spec)
        if unmatched is not None:
            if options.kernel is not None:
                raise NoKernelError(f"no attention kernel supports this call: {unmatched}")
            sites.append(SitePlan(match, spec, where, None, unmatched))
            continue
        original = None
        if options.kernel is None and options.keep_original:
            original = tuning.Original(match.kind, memory.bytes_before(match, spec))
        padding = captured_padding(match, spec, examples) if examples is not None and options.kernel is None else None
        try:
            # a site timed on its captured padding times every kernel now, on the same rows (none deferred)
            choice = choose(spec, exact=options.exact, forced=options.kernel, tune=options.tune, cache=cache,
                            original=original, budget=budget, replayed=replayed, padding=padding, sharing=sharing,
                            defer=defer and deferring(options, spec) and padding is None)
            if padding is not None and any(c.measured for c in choice.candidates):
                share = tuning.empty_share(spec, padding)
                choice = replace(choice, reason=f"{choice.reason}; timed on the captured batch's key padding, which "
                                                f"leaves {share:.0%} of the rows without a key: their gradients are "
                                                f"computed row by row after the kernel")
        except NoKernelError as err:
            if options.kernel is not None:
                raise
            sites.append(SitePlan(match, spec, where, None, str(err).splitlines()[0]))
            continue
        sites.append(SitePlan(match, spec, where, choice))
    before = memory.graph_peak(gm.graph, [memory.site_before(s.where, s.match, s.spec) for s in sites],
                               training=training)
    plan = GraphPlan(sites, training, options.max_mem, before, _peak(gm, sites, training), budget)
    fitting = options.max_mem is not None and options.kernel is None
    if fitting:
        _fit(gm, plan)
    if not options.exact and options.kernel is None and example_inputs is not None and sites:
        shape_bucket_guard(matches)
        approximate(gm, plan, options, example_inputs)
    if fitting and plan.peak_after.bytes > plan.budget:
        raise MemoryBudgetError(_budget_message(gm, plan, options))
    return plan


def term_sharing(matches: list[Match]) -> list[int]:
    """For each match, how many matches of the graph (itself included) read every one of its term tensors from the
    same nodes: key-padding atoms and document ids, at one batch size, and no dense or additive term (those are
    views made per site). The rewrite hands such sites one key-padding and one document tensor per forward
    (``rewrite._shared``), so what a kernel builds from them and keeps per tensor (tile lists, SDPA's mask, which
    rows see no key, one host sync) is built by the first of them and found by the others. 1 for a match
    without such terms."""
    keys = [_shared_terms(m) for m in matches]
    return [1 if key is None else keys.count(key) for key in keys]


def _shared_terms(match: Match):
    m = match.masks
    if m.dense or m.additive or not (m.key_padding or m.documents is not None):
        return None
    documents = () if m.documents is None else tuple(m.documents)
    return (tuple((a.node, a.negated) for a in m.key_padding), documents, m.documents_same,
            str((match.q.shape() or (None,))[0]))


def captured_padding(match: Match, spec: AttentionSpec, examples: ExampleValues) -> torch.Tensor | None:
    """The key padding (bool ``[B, Nk]``, keep) of the call a training graph was captured on, when that call left
    some row without a key and such rows' gradients are computed row by row (``fills.row_wise_grads``: a softcap,
    dropout, a term's gradient, GPT-2's replaced band); else None.

    Those rows cost a kernel about a hundred elementwise passes over their scores, after the kernel, where the
    original computes them with every other row; timed on neutral masks, a kernel would look faster than it runs on
    such batches. The planner times the site's candidates on this padding instead. A hint for timing only: the
    rewrite relies on nothing read here, and the calls that follow run on their own padding."""
    atoms = match.masks.key_padding
    if not atoms or not spec.requires_grad or not fills.row_wise_grads(spec):
        return None
    keep = None
    for atom in atoms:
        value = examples.example(atom.node)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() == 0:
            return None
        value = ~value if atom.negated else value
        if value.shape[-1] != spec.kv_len or value.numel() // spec.kv_len not in (1, spec.batch):
            return None
        rows = value.reshape(-1, spec.kv_len).expand(spec.batch, spec.kv_len)
        keep = rows if keep is None else keep & rows
    try:  # a hint never stops a rewrite: example values it cannot read (fake, meta) give none
        keep = keep.to(spec.device).contiguous()
        if not bool(fills.rows_without_keys(spec.with_(key_padding=keep)).any()):
            return None  # no row without a key: the neutral timing is this call's
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return keep


def deferring(options, spec: AttentionSpec) -> bool:
    """Whether a site of a graph that inductor compiles next may time its compiling kernels after that compile:
    an exact plan chosen by timing, without a memory budget (whose fit needs every kernel now), on a device of
    ``tuning.DEFER_DEVICES``; not under ``verify`` (which compares the plan on the first inputs before the
    compile) or inductor's autotuning modes (which time their own kernels on the device meanwhile)."""
    return (options.exact and options.max_mem is None and options.kernel is None and options.tune
            and not options.verify and options.mode not in tuning.AUTOTUNING_MODES
            and spec.device.type in tuning.DEFER_DEVICES)


#: ``GraphModule.meta`` key an exporter sets: the graph is traced for inference only
EXPORT_META = "attnopt_export"


def original_gradients_unmatched(kind: str, spec: AttentionSpec) -> str | None:
    """Why no kernel gives the original's gradients, or None.

    An ``F.scaled_dot_product_attention`` call on the CPU with an additive mask of a large finite fill
    (``finfo.min``): where the mask hides every key of a row, ATen's CPU attention adds the fill to the row's
    log-sum-exp, which absorbs the log of the key count, so its backward takes each of those keys' probability as 1
    instead of 1 / Nk. dV, dK and dQ of such rows come out Nk times the softmax's (its forward is right; its math
    backend is right too). No kernel reproduces that, so a training call that may have such rows keeps the call:
    one whose mask is converted to boolean terms with an added finite fill, or one that keeps an additive term as
    written (its values, -1e9 say, are not known when planning)."""
    additive = spec.bias is not None or (spec.mask is not None and spec.mask.is_floating_point())
    if (kind != "sdpa" or not spec.requires_grad or spec.device.type != "cpu"
            or not (spec.fill == Fill.FINITE_ADDED or additive) or not spec.rows_may_be_empty()):
        return None
    return ("training call of F.scaled_dot_product_attention on the CPU with an additive mask: on rows "
            "the mask hides entirely, ATen's CPU backward gives Nk times the softmax's gradients, which no kernel "
            "reproduces")


def _training(gm: GraphModule) -> bool:
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    values = [tensor_meta(a) for o in outputs for a in o.all_input_nodes]
    return any(v is not None and v.requires_grad for v in values)


def _peak(gm: GraphModule, sites: list[SitePlan], training: bool) -> memory.Peak:
    costs = [
        memory.site_after(s.where, s.match, s.spec, s.choice.kernel) if s.choice is not None
        else memory.site_before(s.where, s.match, s.spec)
        for s in sites
    ]
    return memory.graph_peak(gm.graph, costs, training=training)


def _fit(gm: GraphModule, plan: GraphPlan) -> None:
    """Move the largest-footprint site to a smaller exact candidate until the peak fits or nothing moves."""
    while plan.peak_after.bytes > plan.budget:
        movable = []
        for i, s in enumerate(plan.sites):
            if s.decision is None:
                continue
            current = s.decision.chosen
            smaller = [c for c in s.decision.candidates if c.supported and c.exact and c.footprint < current.footprint]
            if smaller:
                movable.append((current.footprint, i, smaller[0]))  # candidates are sorted by time
        if not movable:
            return
        _, i, to = max(movable, key=lambda m: m[0])
        site = plan.sites[i]
        site.decision = Choice(to.kernel, to.exact, _fit_reason(to, site.decision, plan.budget),
                               site.decision.candidates)
        plan.peak_after = _peak(gm, plan.sites, plan.training)


def _fit_reason(to: Candidate, decision: Choice, budget: int) -> str:
    """Why ``max_mem`` moved a site to ``to``: said plainly when ``to`` is slower than the original."""
    note = f" that fits max_mem ({memory_fmt(budget)})"
    allowed = [c for c in decision.candidates if c.supported and not c.original and c.exact]
    if to.original:
        return f"original: the fastest plan{note}"
    kept = next((c for c in decision.candidates if c.original), None)
    if kept is not None:
        t_kernel, t_original, how = _times(to, kept)
        if t_kernel > t_original:
            return (f"max_mem ({memory_fmt(budget)}) forces a slower plan: {to.kernel} {how} "
                    f"{format_seconds(t_kernel)} vs the original's {format_seconds(t_original)}, which does not fit")
    return _reason(to, allowed, None, note)


def memory_fmt(n: int) -> str:
    from attnopt.report import format_bytes

    return format_bytes(n)


def _budget_message(gm: GraphModule, plan: GraphPlan, options) -> str:
    peak = plan.peak_after
    dominant = sorted(peak.site_bytes.items(), key=lambda kv: -kv[1])[:3]
    sites = ", ".join(f"{where} ({memory_fmt(b)})" for where, b in dominant) or "none"
    kind = "exact" if options.exact else "exact or accepted approximate"
    over = peak.bytes - plan.budget
    variable = max(1, peak.bytes - peak.resident)
    fraction = max(0.0, (plan.budget - peak.resident) / variable)
    lines = [
        f"max_mem={memory_fmt(plan.budget)} cannot be met: the best {kind} plan needs an estimated "
        f"{memory_fmt(peak.bytes)} at its peak ({peak.at}; {memory_fmt(over)} over; "
        f"{'forward+backward' if plan.training else 'forward'}).",
        f"  inputs, parameters and buffers: {memory_fmt(peak.resident)}; largest attention sites: {sites}.",
        "  What would fit:",
        f"  - a budget of at least {memory_fmt(peak.bytes)} (max_mem='{math.ceil(peak.bytes / 1e9 * 100) / 100}GB')",
    ]
    if fraction > 0:
        lines.append(f"  - a shorter input: activations scale with the tokens, about {fraction:.2f}x this length")
    else:
        lines.append("  - nothing shorter: the inputs and parameters alone exceed the budget")
    if options.exact:
        approx = _approximate_floor(gm, plan)
        if approx is not None and approx < peak.bytes:
            fits = "fits" if approx <= plan.budget else "does not fit either"
            lines.append(f"  - exact=False: the smallest approximate plan needs about {memory_fmt(approx)} ({fits}; "
                         "each approximation is accepted only if its measured error is under tol)")
    return "\n".join(lines)


def _approximate_floor(gm: GraphModule, plan: GraphPlan) -> int | None:
    """The peak with every site on its smallest-footprint supported approximate kernel (error not measured)."""
    trial = []
    for s in plan.sites:
        if s.decision is None:
            trial.append(s)
            continue
        kernels = [k for k in registry.all_kernels() if not _variant(k) and not k.not_supported_reasons(s.spec)]
        if not kernels:
            trial.append(s)
            continue
        def footprint(k):
            return k.memory_bytes(s.spec) + (k.saved_bytes(s.spec) if s.spec.requires_grad else 0)
        best = min(kernels, key=footprint)
        trial.append(SitePlan(s.match, s.spec, s.where, Choice(best.name, best.exact, "", ())))
    return _peak(gm, trial, plan.training).bytes


# ------------------------------------------------------------------ exact=False: approximate plans
#: seconds of calibration per graph (the exact run, the sites' errors, whole-graph runs), by device type
CALIBRATION_BUDGET_S = {"cpu": 20.0, "cuda": 10.0}
#: whole-graph runs of candidate plans, at most
MAX_PLAN_RUNS = 4
#: sequence lengths up to this share one shape bucket; above it, each power of two is one. Below it no
#: approximation is proposed (long sequences only: at short ones the exact kernels' fixed costs dominate)
MIN_BUCKET = 1024


class ApproximationWarning(UserWarning):
    """``exact=False`` made a model compute an approximation of its attention."""


def approximate(gm: GraphModule, plan: GraphPlan, options, example_inputs) -> None:
    """Replace ``plan``'s exact plan by the fastest approximate one whose output error is under ``options.tol``.

    Candidates are the settings each approximate family proposes for a site
    (``search_space``) that its cost model says can beat the site's exact plan
    (or, when the exact plan is over ``max_mem``, that are smaller): long
    sequences only, as the cost of a window or of random features is linear in
    N. The graph runs once exactly on the example inputs; each candidate is run
    on its site's captured inputs (its own error: whether the attention is local,
    or diffuse enough for random features) within ``CALIBRATION_BUDGET_S``;
    whole-graph runs of the plans these errors suggest (``calibrate.search``)
    measure the output error. An approximate plan replaces the exact one only
    when it is faster by more than ``NOISE`` (or the exact plan does not fit).
    """
    started = time.perf_counter()
    deadline = started + CALIBRATION_BUDGET_S.get(plan.sites[0].spec.device.type, CALIBRATION_BUDGET_S["cpu"])
    over_budget = plan.budget is not None and plan.peak_after.bytes > plan.budget
    proposals = [_proposals(s, over_budget) for s in plan.sites]
    if not any(proposals):
        return
    copies = written_bytes(gm, example_inputs)
    if copies and plan.budget is not None and plan.peak_after.bytes + copies > plan.budget:
        # each calibration run works on copies of what the graph writes (a static cache): they must fit too
        _note_uncalibrated(plan, proposals, f"calibration runs the graph on a copy of the {memory_fmt(copies)} it "
                                            f"writes in place (a cache, a buffer), and the plan's "
                                            f"{memory_fmt(plan.peak_after.bytes)} with it exceeds max_mem "
                                            f"({memory_fmt(plan.budget)}): the exact plan is kept")
        return
    exact_kernels = [_exact_kernel(s) for s in plan.sites]
    calibration = calibrate.Calibration(gm, example_inputs, exact_kernels)
    options_by_site: list[list[calibrate.Option]] = []
    measured_everything = options.tune
    evaluated: list[dict[str, Candidate]] = []
    for i, (s, proposed) in enumerate(zip(plan.sites, proposals)):
        exact_cost = _cost(s.decision.chosen, options.tune) if s.decision is not None else 0.0
        measured_everything &= s.decision is None or s.decision.chosen.measured
        site_options = [calibrate.Option(None, exact_cost)]
        found = {}
        share = (deadline - time.perf_counter()) / 2 / max(1, len(plan.sites) - i)
        site_deadline = time.perf_counter() + share
        for kernel in proposed:
            guess = kernel.cost(s.spec) * (2 if options.tune else 1)
            # the site's cheapest proposal is always tried: a loaded machine still gets a plan to compare
            if calibration.sites[i] is None or (found and time.perf_counter() + guess > site_deadline):
                continue
            error, seconds = calibration.site_error(i, kernel.name)
            if options.tune:
                seconds = min(seconds, calibration.site_error(i, kernel.name)[1])  # warm
            cost = seconds if options.tune else kernel.cost(s.spec)
            found[kernel.name] = Candidate(
                kernel.name, (), cost, kernel.memory_bytes(s.spec), False, options.tune,
                kernel.saved_bytes(s.spec) if s.spec.requires_grad else 0, error, kernel.cost(s.spec))
            if math.isfinite(error) and (cost * (1 + NOISE) < exact_cost or over_budget):
                site_options.append(calibrate.Option(kernel.name, cost, error))
        options_by_site.append(site_options)
        evaluated.append(found)
    plans = [p for p in calibrate.plans_by_speed(options_by_site)[1:] if _fits(gm, plan, p)]
    chosen, errors = calibrate.search(
        plans, lambda p: calibration.output_error([o.kernel for o in p]), options.tol,
        max_runs=MAX_PLAN_RUNS, deadline=deadline,
    )
    exact_seconds = sum(site[0].seconds for site in options_by_site)
    if chosen is None:
        _note_calibrated(plan, evaluated, "no plan of them has its output error under tol")
        return
    picked = plans[chosen]
    seconds = sum(o.seconds for o in picked)
    if not over_budget and seconds * (1 + NOISE) >= exact_seconds:
        _note_calibrated(plan, evaluated, "the exact plan is as fast")
        return
    how = "measured" if measured_everything else "estimated"
    approximation = Approximation(
        errors[chosen], options.tol, seconds, exact_seconds, how, len(errors),
        tuple((s.where, o.kernel, o.error) for s, o in zip(plan.sites, picked) if o.kernel is not None),
    )
    budget = f", fits max_mem ({memory_fmt(plan.budget)})" if plan.budget is not None else ""
    for s, o, found in zip(plan.sites, picked, evaluated):
        if o.kernel is None:
            _note_calibrated_site(s, found, "not in the fastest plan whose output error is under tol")
            continue
        kernel = registry.get(o.kernel)
        reason = (f"approximate, {kernel.family} ({kernel.describe()}): the model's output error "
                  f"{approximation.output_error:.3g} < tol={options.tol:g} on the example inputs "
                  f"(this site alone: {o.error:.3g}); the plan is {how} {exact_seconds / seconds:.1f}x faster than "
                  f"the exact one ({format_seconds(seconds)} vs {format_seconds(exact_seconds)} "
                  f"for its attention){budget}")
        others = tuple(c for c in s.decision.candidates if c.kernel not in found)
        s.decision = Choice(o.kernel, False, reason, others + tuple(found.values()))
    plan.approximation = approximation
    plan.peak_after = _peak(gm, plan.sites, plan.training)


def _proposals(s: SitePlan, over_budget: bool) -> list:
    """The approximate kernels (family x settings) worth calibrating for site ``s``, families interleaved."""
    from attnopt.kernels.approx_base import Approximate, configured

    if s.decision is None or (s.spec.kv_len < MIN_BUCKET and not over_budget):
        return []
    current = s.decision.chosen
    by_family = []
    for family in registry.all_kernels():
        if not isinstance(family, Approximate) or family.variant or family.not_supported_reasons(s.spec):
            continue
        kernels = [configured(family, **settings) for settings in family.search_space(s.spec)]
        wins = [k for k in kernels if k.cost(s.spec) * (1 + NOISE) < current.estimate
                or (over_budget and k.memory_bytes(s.spec) < current.footprint)]
        by_family.append(sorted(wins, key=lambda k: k.cost(s.spec)))
    # each family's cheapest settings first, the families' k-th settings in order of cost
    return [k for rank in zip_longest(*by_family)
            for k in sorted((k for k in rank if k is not None), key=lambda k: k.cost(s.spec))]


def _exact_kernel(s: SitePlan) -> str | None:
    """The exact kernel a site runs during calibration: its plan's, or its fastest exact one (for the original)."""
    if s.decision is None:
        return None
    if not s.decision.chosen.original:
        return s.decision.kernel
    return next(c.kernel for c in s.decision.candidates if c.supported and c.exact and not c.original)


def _cost(c: Candidate, tune: bool) -> float:
    return c.cost if tune and c.measured else c.estimate


def _fits(gm: GraphModule, plan: GraphPlan, options: tuple) -> bool:
    if plan.budget is None:
        return True
    trial = [s if o.kernel is None else SitePlan(s.match, s.spec, s.where, Choice(o.kernel, False, "", ()))
             for s, o in zip(plan.sites, options)]
    return _peak(gm, trial, plan.training).bytes <= plan.budget


def written_bytes(gm: GraphModule, example_inputs) -> int:
    """Bytes of the inputs ``gm`` writes in place: what each calibration run copies."""
    written = written_inputs(gm)
    return sum(x.numel() * x.element_size() for i, x in enumerate(example_inputs)
               if i in written and isinstance(x, torch.Tensor))


def _note_uncalibrated(plan: GraphPlan, proposals: list[list], why: str) -> None:
    """List the approximate kernels proposed for each site, none calibrated, each with ``why``."""
    for s, proposed in zip(plan.sites, proposals):
        if s.decision is None or not proposed:
            continue
        noted = tuple(Candidate(k.name, (f"not calibrated: {why}",), k.cost(s.spec), k.memory_bytes(s.spec), False,
                                estimate=k.cost(s.spec)) for k in proposed)
        s.decision = replace(s.decision, candidates=s.decision.candidates + noted)


def _note_calibrated(plan: GraphPlan, evaluated: list[dict[str, Candidate]], why: str) -> None:
    for s, found in zip(plan.sites, evaluated):
        _note_calibrated_site(s, found, why)


def _note_calibrated_site(s: SitePlan, found: dict[str, Candidate], why: str) -> None:
    """List the settings calibrated for a site that stays exact, each with its own error and why not."""
    if s.decision is None or not found:
        return
    noted = tuple(replace(c, reasons=(f"calibrated: this site's error {c.error:.3g}; {why}",)) for c in found.values())
    s.decision = replace(s.decision, candidates=s.decision.candidates + noted)


def _lengths(match: Match) -> list:
    """The site's query and key lengths as the graph sees them (ints, or SymInts under dynamic shapes)."""
    values = [tensor_meta(operand.node) for operand in (match.q, match.k)]
    return [v.shape[-2] for v in values if v is not None and v.dim() >= 3]


def symbolic_shape(match: Match) -> bool:
    """Whether the graph serves more than one batch size or sequence length at this site (dynamo made them
    symbolic): its calls may fall in more than one shape bucket."""
    values = [tensor_meta(operand.node) for operand in (match.q, match.k)]
    return any(isinstance(size, torch.SymInt) for v in values if v is not None and v.dim() >= 3
               for size in (v.shape[0], v.shape[-2]))


@dataclass(frozen=True)
class Rechoice:
    """How a replaced site of a graph with a symbolic batch size or lengths chooses its kernel for calls in another
    shape bucket than the one it was planned for (batch, query and key lengths, each rounded up to a power of two, as the
    tuning cache keys its measurements): the fastest exact kernel for that bucket, measured (or estimated) on
    the bucket's first call, as the plan itself was, then kept. Without it, one plan made at the graph's first
    length would serve every later length: a short first batch would decide the kernel of a 16k one.

    Only exact plans without a memory budget are re-chosen (every exact kernel computes the site's function;
    under ``max_mem`` the fitted plan stays). During a CUDA graph capture nothing is timed: the planned kernel
    runs where it supports the call, else the cost models' choice."""

    planned: tuple[int, int, int]  # the planned call's (batch, q_len, kv_len) buckets
    tune: bool
    cache_dir: str | None
    replayed: bool

    bucket = staticmethod(tuning.shape_bucket)

    @classmethod
    def for_site(cls, site: SitePlan, options, replayed: bool = False) -> Rechoice | None:
        """The site's rechoice, or None where its one plan is kept: not an exact kernel chosen by the
        planner, a memory budget, or a batch size and lengths that never change."""
        choice = site.choice
        if (choice is None or not choice.exact or options.kernel is not None
                or not options.exact or options.max_mem is not None or not symbolic_shape(site.match)):
            return None
        spec = site.spec
        return cls(cls.bucket(spec.batch, spec.q_len, spec.kv_len), options.tune, options.cache_dir, replayed)

    def kernel(self, spec: AttentionSpec, planned: str) -> str:
        """The kernel for calls like ``spec`` (a real call's, terms included), ``planned`` in the planned bucket."""
        if self.bucket(spec.batch, spec.q_len, spec.kv_len) == self.planned:
            return planned
        from attnopt.kernels.term_cache import capturing

        if capturing():
            if not registry.get(planned).not_supported_reasons(spec):
                return planned
            return choose(spec, exact=True).kernel
        # the call's terms as the planner sees them (shapes and dtypes, not values), timed outside any autocast
        terms = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
                 for name in ("key_padding", "q_doc", "kv_doc", "bias", "mask")
                 if isinstance(t := getattr(spec, name), torch.Tensor)}
        spec = spec.with_(**terms).with_(device=spec.device)
        cache = tuning.TuningCache(tuning.cache_dir(self.cache_dir)) if self.tune else None
        with torch.autocast(spec.device.type, enabled=False):
            return choose(spec, exact=True, tune=self.tune, cache=cache,
                          budget=tuning.Budget.for_device(spec.device), replayed=self.replayed).kernel


def shape_bucket_guard(matches: list[Match]) -> None:
    """Under dynamic shapes, keep this graph to the shape bucket of its example inputs' sequence lengths.

    An approximation's error depends on the length, so a plan is calibrated for one
    bucket (lengths up to ``MIN_BUCKET``, then each power of two): comparing the
    symbolic lengths with the bucket's bounds records guards, and dynamo compiles
    the graph again, calibrated again, for a length outside it.
    """
    for match in matches:
        for length in _lengths(match):
            if not isinstance(length, torch.SymInt):
                continue
            n = hint(length)
            upper = MIN_BUCKET if n <= MIN_BUCKET else 1 << (n - 1).bit_length()
            lower = 0 if upper == MIN_BUCKET else upper // 2
            bool(length <= upper)
            bool(length > lower)


def warn_approximations(plan: GraphPlan, earlier: list) -> None:
    """One ``ApproximationWarning`` naming the approximate sites of ``plan``, settings and output error.

    ``earlier``: the report's sites from the model's previous graphs; sites already approximate there
    with the same kernel are not warned about again, so a model warns once for what it approximates.
    """
    found = plan.approximation
    if found is None:
        return
    seen = {(s.where, s.kernel) for s in earlier if s.replaced and not s.exact}
    new = [(where, kernel, error) for where, kernel, error in found.sites if (where, kernel) not in seen]
    if not new:
        return
    sites = "; ".join(f"{where}: {registry.get(kernel).family} ({registry.get(kernel).describe()}), "
                      f"site error {error:.3g}" for where, kernel, error in new)
    warnings.warn(
        f"attnopt: exact=False runs approximate attention at {len(new)} site(s): {sites}. Relative error of the "
        f"output on the example inputs: {found.output_error:.3g} (tol={found.tol:g}); the attention is {found.how} "
        f"{found.exact_seconds / found.seconds:.1f}x faster than exact. exact=True keeps the model's function.",
        ApproximationWarning, stacklevel=2,
    )
