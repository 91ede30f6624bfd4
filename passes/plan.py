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
from dataclasses import dataclass, field, replace

from torch.fx import GraphModule

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec

from . import calibrate, memory, tuning
from .detect import Match
from .graph import module_path, tensor_meta
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


class NoKernelError(ValueError):
    """No registered kernel can compute a spec under the constraints."""


class MemoryBudgetError(ValueError):
    """No plan's estimated peak memory fits ``max_mem``: the message says what would."""


def candidates(
    spec: AttentionSpec, *, exact: bool = True, forced: str | None = None, tune: bool = False,
    cache: tuning.TuningCache | None = None, errors: dict[str, float] | None = None, tol: float | None = None,
    original: tuning.Original | None = None, budget: tuning.Budget | None = None,
) -> list[Candidate]:
    """Every kernel (or only ``forced``), and the ``original`` code when given, with reasons, time and memory.

    Supported candidates come first, measured ones before estimated ones, each by time.
    """
    names = [forced] if forced is not None else [k.name for k in registry.all_kernels()]
    found = []
    for name in names:
        kernel = registry.get(name)
        reasons = list(kernel.not_supported_reasons(spec))
        if forced is None and kernel.devices is not None and spec.device.type not in kernel.devices:
            reasons.insert(0, f"meant for {'/'.join(kernel.devices)}; on {spec.device.type} only when forced "
                              f"by name (kernel={name!r})")
        error = (errors or {}).get(name)
        if not kernel.exact and not reasons:
            if exact:
                reasons.append("approximate kernel and exact=True")
            elif error is None:
                reasons.append("approximate, and its error could not be measured (no example inputs)")
            elif not error < tol:
                reasons.append(f"measured relative error {error:.3g} is not under tol={tol:g}")
        cost = mem = None
        saved = 0
        if not reasons:
            cost, mem = kernel.cost(spec), kernel.memory_bytes(spec)
            saved = kernel.saved_bytes(spec) if spec.requires_grad else 0
        found.append(Candidate(name, tuple(reasons), cost, mem, kernel.exact, False, saved, error, cost))
    if original is not None and forced is None:
        estimate = tuning.original_estimate(spec, original)
        found.append(Candidate(ORIGINAL, (), estimate, original.memory_bytes, estimate=estimate))
    supported = [c for c in found if c.supported]
    if cache is not None and tuning.enabled(spec, tune) and len(supported) > 1 and forced is None:
        seconds = tuning.measured_seconds(
            spec, [c.kernel for c in supported], cache, label=_label(spec), original=original,
            estimates={c.kernel: c.estimate for c in supported}, budget=budget,
        )
        found = [
            replace(c, cost=seconds[c.kernel], measured=True)
            if c.supported and math.isfinite(seconds.get(c.kernel, math.inf)) else c
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
    kernels = [c for c in found if not c.original]
    allowed = [c for c in kernels if c.supported and (c.exact or not exact)]
    exact_ones = [c for c in allowed if c.exact]
    if not allowed:
        lines = "\n".join(f"  {c.kernel}: {'; '.join(c.reasons)}" for c in kernels)
        raise NoKernelError(f"no attention kernel supports this call ({spec.mask_terms or 'no mask'}):\n{lines}")
    best = (exact_ones or allowed)[0]
    kept = next((c for c in found if c.original), None)
    if kept is None or forced is not None:
        return Choice(best.kernel, best.exact, _reason(best, allowed, forced), tuple(found))
    if not best.exact:
        reason = "original kept: no exact kernel supports this call (approximations only when max_mem needs one)"
        return Choice(ORIGINAL, True, reason, tuple(found))
    replaces, reason = versus_original(best, kept, len(allowed))
    return Choice(best.kernel if replaces else ORIGINAL, True, reason, tuple(found))


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
    if not best.exact:
        return f"approximate (error {best.error:.3g}): the fastest plan{budget_note or ' that fits max_mem'}, " \
               "and no exact plan fits"
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


@dataclass
class GraphPlan:
    sites: list[SitePlan]
    training: bool
    budget: int | None
    peak_before: memory.Peak
    peak_after: memory.Peak
    #: what is left of the first call's timing budget: pass it to any further ``choose`` for this graph
    timing: tuning.Budget | None = None


def plan_graph(gm: GraphModule, matches: list[Match], options, example_inputs=None) -> GraphPlan:
    """Choose a kernel for every match of ``gm`` so that the graph's estimated peak fits ``options.max_mem``."""
    training = _training(gm)
    cache = tuning.TuningCache(tuning.cache_dir(options.cache_dir)) if options.tune else None
    specs = [spec_of(m) for m in matches]
    errors = _errors(gm, matches, specs, options, example_inputs)
    budget = tuning.Budget.for_device(specs[0].device) if specs else None
    sites = []
    for match, spec, errs in zip(matches, specs, errors):
        where = module_path(match.anchor)
        original = None
        if options.kernel is None and options.keep_original:
            original = tuning.Original(match.kind, memory.bytes_before(match, spec))
        try:
            choice = choose(spec, exact=options.exact, forced=options.kernel, tune=options.tune, cache=cache,
                            errors=errs, tol=options.tol, original=original, budget=budget)
        except NoKernelError as err:
            if options.kernel is not None:
                raise
            sites.append(SitePlan(match, spec, where, None, str(err).splitlines()[0]))
            continue
        sites.append(SitePlan(match, spec, where, choice))
    before = memory.graph_peak(gm.graph, [memory.site_before(s.where, s.match, s.spec) for s in sites],
                               training=training)
    plan = GraphPlan(sites, training, options.max_mem, before, _peak(gm, sites, training), budget)
    if options.max_mem is not None and options.kernel is None:
        _fit(gm, plan, exact_only=True)
        if plan.peak_after.bytes > plan.budget and not options.exact:
            _fit(gm, plan, exact_only=False)
        if plan.peak_after.bytes > plan.budget:
            raise MemoryBudgetError(_budget_message(gm, plan, options))
    return plan


def _training(gm: GraphModule) -> bool:
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    values = [tensor_meta(a) for o in outputs for a in o.all_input_nodes]
    return any(v is not None and v.requires_grad for v in values)


def _errors(gm, matches, specs, options, example_inputs) -> list[dict[str, float]]:
    """Per site, the measured error of each approximate kernel that supports it (only with exact=False)."""
    approx = [k for k in registry.all_kernels() if not k.exact]
    empty = [{} for _ in matches]
    if options.exact or example_inputs is None or not approx or not matches:
        return empty
    wanted = [[k.name for k in approx if not k.not_supported_reasons(s)] for s in specs]
    if not any(wanted):
        return empty
    values = calibrate.capture_sites(gm, example_inputs)
    return [{name: calibrate.site_error(name, site) for name in names} for names, site in zip(wanted, values)]


def _peak(gm: GraphModule, sites: list[SitePlan], training: bool) -> memory.Peak:
    costs = [
        memory.site_after(s.where, s.match, s.spec, s.choice.kernel) if s.choice is not None
        else memory.site_before(s.where, s.match, s.spec)
        for s in sites
    ]
    return memory.graph_peak(gm.graph, costs, training=training)


def _fit(gm: GraphModule, plan: GraphPlan, *, exact_only: bool) -> None:
    """Move the largest-footprint site to a smaller candidate until the peak fits or nothing moves."""
    while plan.peak_after.bytes > plan.budget:
        movable = []
        for i, s in enumerate(plan.sites):
            if s.decision is None:
                continue
            current = s.decision.chosen
            smaller = [
                c for c in s.decision.candidates
                if c.supported and c.footprint < current.footprint and (c.exact or not exact_only)
            ]
            if smaller:
                movable.append((current.footprint, i, smaller[0]))  # candidates are sorted by time
        if not movable:
            return
        _, i, to = max(movable, key=lambda m: m[0])
        site = plan.sites[i]
        site.decision = Choice(to.kernel, to.exact, _fit_reason(to, site.decision, plan.budget, exact_only),
                               site.decision.candidates)
        plan.peak_after = _peak(gm, plan.sites, plan.training)


def _fit_reason(to: Candidate, decision: Choice, budget: int, exact_only: bool) -> str:
    """Why ``max_mem`` moved a site to ``to``: said plainly when ``to`` is slower than the original."""
    note = f" that fits max_mem ({memory_fmt(budget)})"
    allowed = [c for c in decision.candidates if c.supported and not c.original and (c.exact or not exact_only)]
    if to.original:
        return f"original: the fastest plan{note}"
    kept = next((c for c in decision.candidates if c.original), None)
    if kept is not None and to.exact:
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
        kernels = [k for k in registry.all_kernels() if not k.not_supported_reasons(s.spec)]
        if not kernels:
            trial.append(s)
            continue
        def footprint(k):
            return k.memory_bytes(s.spec) + (k.saved_bytes(s.spec) if s.spec.requires_grad else 0)
        best = min(kernels, key=footprint)
        trial.append(SitePlan(s.match, s.spec, s.where, Choice(best.name, best.exact, "", ())))
    return _peak(gm, trial, plan.training).bytes
