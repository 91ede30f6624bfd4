"""The pass pipeline on one captured graph: detect, analyze, plan, rewrite, report."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from attnopt.config import Options
from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec
from attnopt.kernels.term_cache import capturing
from attnopt.report import GraphMemory, Report, Site

from . import checkpoint, plan, trial, tuning
from .detect import PLANNED_DROPOUT, Rejection, find_sites
from .graph import erase_dead_copies, is_buffer, is_parameter, module_path, placeholder_values
from .memory import bytes_after, bytes_before
from .modules import inline_multi_head_attention
from .rewrite import replace

log = logging.getLogger("attnopt")


def optimize_graph(
    gm: GraphModule, options: Options, report: Report, *, dry_run: bool = False, example_inputs=None,
    volatile: frozenset = frozenset(), runtime_branches: bool = False, subgraph: bool = False,
    keep: dict[str, str] | None = None, defer: bool = False,
) -> GraphModule:
    """Rewrite every attention site of ``gm`` that can be replaced; record each in ``report``.

    The kernels are planned for the whole graph at once, so that its estimated
    peak memory fits ``options.max_mem`` (``plan.MemoryBudgetError`` when no
    plan does). ``example_inputs`` (the real inputs the backend received) let
    the planner measure approximate kernels' errors when ``exact=False``, and
    let the mask analysis read buffers (except the placeholder positions in
    ``volatile``). The buffers the replaced sites' proofs read are left in
    ``gm.meta["attnopt_reads"]``, to be guarded. ``runtime_branches`` (graphs
    run as Python, not traced again) lets a site with key padding switch to a
    faster kernel on batches whose padding keeps every key. ``defer`` (a graph inductor compiles next): sites
    whose fastest kernel must first compile are rewritten to a ``registry.Deferred`` kernel, listed in
    ``gm.meta["attnopt_deferred"]`` for ``settle_deferred`` after that compile; sites that chose such a kernel
    from timings already cached list it in ``gm.meta["attnopt_warm"]``, to compile it beside inductor. In a graph
    run as Python (``runtime_branches``) such a site runs the fastest kernel timed so far, and is listed with its
    ``SiteCall`` to switch once the deferred kernels are compiled and timed (``wait_for_compile``).
    """
    _optimize_checkpointed(gm, options, report, dry_run, as_python=runtime_branches)
    graph_index = report.graphs
    report.graphs += 1
    report.dry_run = dry_run
    earlier = list(report.sites)  # the model's previous graphs: approximations already warned about
    # in a dry run the graph is edited but never recompiled: gm.forward still runs the original code
    skipped = inline_multi_head_attention(gm.graph)
    for item in skipped:
        report.sites.append(Site(where=module_path(item.node), node=item.node.name, graph=graph_index,
                                 replaced=False, reason=item.reason))
    erase_dead_copies(gm.graph)
    found = list(find_sites(gm.graph, placeholder_values(gm, example_inputs, volatile)))
    # ``keep`` (anchor node name -> reason): sites to leave as they are (verify restores those that differed)
    found = [Rejection(f.anchor, keep[f.anchor.name], f.anchor)
             if keep and not isinstance(f, Rejection) and f.anchor.name in keep else f for f in found]
    if not runtime_branches:  # a compiled graph would take the probability as a symbolic float
        found = [Rejection(f.anchor, "dropout whose probability the graph reads at run time (a changed Dropout.p) "
                           "is replaced only in graphs run as Python (compiler='eager')", f.dropout_node)
                 if not isinstance(f, Rejection) and f.dropout_node is not None else f for f in found]
    graph_plan = plan.plan_graph(gm, [f for f in found if not isinstance(f, Rejection)], options, example_inputs,
                                 defer=defer and not dry_run)
    pending: list[Pending] = []
    warm: list[tuple[str, AttentionSpec]] = []  # chosen kernels to compile beside inductor (timed from the cache)
    planned = iter(graph_plan.sites)
    reads: list = []
    # the fill-only branches' boolean masks live through the forward (one per mask they read) and their kernels'
    # workspace may exceed the planned one: both are counted, and a branch that would break max_mem is not taken
    branch_bytes = BranchBytes(graph_plan)
    for item in found:
        if isinstance(item, Rejection):
            site = Site(
                where=module_path(item.anchor), node=item.anchor.name, graph=graph_index, replaced=False,
                reason=f"{item.reason} [at {item.at.name}]",
            )
        else:
            site_plan = next(planned)
            unpadded = _unpadded_kernel(site_plan, options, graph_plan.timing) if runtime_branches else None
            fill_only = (_fill_only_kernel(site_plan, options, graph_plan.timing, branch_bytes)
                         if runtime_branches and unpadded is None else None)
            rechoice = (plan.Rechoice.for_site(site_plan, options, tuning.replays_graphs(options))
                        if runtime_branches else None)
            waits = site_plan.choice is not None and bool(site_plan.choice.deferred) and not dry_run
            # a compiled graph names a Deferred kernel; a graph run as Python holds the SiteCall to switch
            item = Pending(None if runtime_branches else registry.deferred(site_plan.choice.kernel), site_plan,
                           len(report.sites)) if waits else None
            allowed = (trial.allowed_kernels(site_plan, graph_plan)
                       if runtime_branches and not dry_run and trial.eligible(site_plan, options, rechoice) else ())
            tried = (trial.TrialSite(len(report.sites), site_plan.spec, allowed, site_plan.spec.device)
                     if allowed else None)
            site = _plan_and_replace(gm, site_plan, graph_index, dry_run, unpadded, subgraph, lean=runtime_branches,
                                     fill_only_kernel=fill_only, rechoice=rechoice, pending=item, tried=tried)
            if tried is not None and site.replaced:
                trial.add(report, tried)
            if item is not None:
                pending.append(item)
            elif (defer and not runtime_branches and site.replaced and not dry_run
                  and plan.deferring(options, site_plan.spec)
                  and registry.get(site.kernel).compiles == registry.COMPILES_TRITON):
                warm.append((site.kernel, site_plan.spec))
            if site.replaced:
                reads.extend(site_plan.match.reads)
        log.info("attnopt site %s (%s): %s", site.where, "replaced" if site.replaced else "left alone", site.reason)
        report.sites.append(site)
    report.memory.append(GraphMemory(
        graph_index, graph_plan.peak_before.bytes, graph_plan.peak_after.bytes + branch_bytes.added, graph_plan.budget,
        graph_plan.training,
    ))
    gm.meta["attnopt_reads"] = list(dict.fromkeys(reads))
    gm.meta["attnopt_deferred"] = pending
    gm.meta["attnopt_warm"] = warm
    if not dry_run:
        plan.warn_approximations(graph_plan, earlier)
    if not dry_run:
        gm.graph.lint()
        gm.recompile()
    return gm


def _optimize_checkpointed(gm: GraphModule, options: Options, report: Report, dry_run: bool,
                           as_python: bool = False) -> None:
    """Rewrite the bodies of activation-checkpointed regions (``torch.utils.checkpoint``), which dynamo
    captures as subgraphs of a higher-order op: the recomputation in the backward runs the rewritten
    body too. A mask the region receives is analysed with the outer computation that builds it
    (``checkpoint.lift_producers``). Buffers are not evaluated in a body (no example values), so masks
    built from a body's buffers stay dense. ``as_python`` (a graph run as Python): each region then runs
    through ``torch.utils.checkpoint`` (``checkpoint.run_as_python``)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hop or not node.args:
            continue
        body = node.args[0]
        sub = getattr(gm, body.target, None) if isinstance(body, torch.fx.Node) and body.op == "get_attr" else None
        if isinstance(sub, GraphModule):
            lifted = checkpoint.lift_producers(gm, node, sub)
            optimize_graph(sub, options, report, dry_run=dry_run, subgraph=True, runtime_branches=as_python)
            if lifted is not None:
                checkpoint.settle(gm, lifted)
                if not dry_run:
                    sub.graph.lint()
                    sub.recompile()
            if as_python and not dry_run:
                checkpoint.run_as_python(gm, node, sub)


#: whether a graph run as Python gives a key-padded site a second call for batches whose padding keeps every key
#: (``_unpadded_kernel``; ``ATTNOPT_UNPADDED_BRANCH=0``: never, to measure what the branch's per-forward check costs)
UNPADDED_BRANCH = os.environ.get("ATTNOPT_UNPADDED_BRANCH", "1") != "0"


def _unpadded_kernel(site_plan: plan.SitePlan, options: Options, timing=None) -> str | None:
    """The kernel for this site's calls whose key padding keeps every key, when those calls run faster
    another way than the planned one (another kernel, or the same without the padding term)."""
    choice, spec = site_plan.choice, site_plan.spec
    if (not UNPADDED_BRANCH or choice is None or spec.key_padding is None or options.kernel is not None
            or not choice.exact):
        return None
    try:
        cache = tuning.TuningCache(tuning.cache_dir(options.cache_dir)) if options.tune else None
        variant = plan.choose(spec.with_(key_padding=None), exact=True, tune=options.tune, cache=cache, budget=timing)
    except plan.NoKernelError:
        return None
    if variant.kernel != choice.kernel:
        return variant.kernel
    # the same kernel may still run faster without the padding term (SDPA then needs no dense mask)
    padded, unpadded = choice.chosen.cost, variant.chosen.cost
    if padded is not None and unpadded is not None and unpadded < padded * (1.0 - plan.NOISE):
        return variant.kernel
    return None


def fill_only_spec(site_plan: plan.SitePlan):
    """The site's spec for calls whose additive mask holds only 0 and ``finfo.min`` (``MaskAnalysis.fill_only``):
    that mask as a boolean one, with the fill a boolean term gives; None for other sites."""
    found = site_plan.match.masks.fill_only
    spec = site_plan.spec
    if found is None or spec.mask is None or spec.bias is not None:
        return None
    return spec.with_(mask=torch.empty(spec.mask.shape, dtype=torch.bool, device="meta"), fill=found[2])


class BranchBytes:
    """The memory the fill-only branches of one graph add to its planned peak: each boolean mask (``mask == 0``,
    one byte per element, made once per forward for the sites that read the same mask) lives through the
    forward, and a branch's kernel may need more workspace than the planned kernel. ``fits`` says whether a
    branch keeps the graph within ``max_mem``; ``take`` counts it."""

    def __init__(self, graph_plan: plan.GraphPlan):
        self.budget, self.peak = graph_plan.budget, graph_plan.peak_after.bytes
        self.masks: set = set()
        self.mask_bytes = 0
        self.workspace = 0  # the largest extra workspace of one branch (the sites run one at a time)

    @property
    def added(self) -> int:
        return self.mask_bytes + self.workspace

    def _extra(self, site_plan: plan.SitePlan, variant: plan.Candidate) -> tuple[int, int]:
        term = site_plan.match.masks.fill_only[0]
        spec = site_plan.spec
        mask = 0 if term in self.masks else spec.mask.numel()
        return mask, max(0, variant.footprint - site_plan.choice.chosen.footprint)

    def fits(self, site_plan: plan.SitePlan, variant: plan.Candidate) -> bool:
        mask, workspace = self._extra(site_plan, variant)
        return self.budget is None or self.peak + self.mask_bytes + mask + max(self.workspace, workspace) <= self.budget

    def take(self, site_plan: plan.SitePlan, variant: plan.Candidate) -> None:
        mask, workspace = self._extra(site_plan, variant)
        self.masks.add(site_plan.match.masks.fill_only[0])
        self.mask_bytes += mask
        self.workspace = max(self.workspace, workspace)


def _fill_only_kernel(site_plan: plan.SitePlan, options: Options, timing=None,
                      branch_bytes: BranchBytes | None = None) -> str | None:
    """The kernel for this site's calls whose additive mask holds only 0 and ``finfo.min``, read as a boolean
    mask (``fill_only_spec``), when those calls run faster so (cuDNN takes a boolean mask the precision of whose
    addition does not matter; the Triton kernels skip the tiles it hides) and, with ``branch_bytes``, when the
    boolean mask and the kernel's workspace keep the graph within ``max_mem``."""
    choice, variant_spec = site_plan.choice, fill_only_spec(site_plan)
    if choice is None or variant_spec is None or options.kernel is not None or not choice.exact:
        return None
    try:
        cache = tuning.TuningCache(tuning.cache_dir(options.cache_dir)) if options.tune else None
        variant = plan.choose(variant_spec, exact=True, tune=options.tune, cache=cache, budget=timing)
    except plan.NoKernelError:
        return None
    mine, theirs = choice.chosen, variant.chosen
    if not (mine.measured and theirs.measured):  # like with like: a measurement against an estimate says nothing
        mine, theirs = mine.estimate, theirs.estimate
    else:
        mine, theirs = mine.cost, theirs.cost
    if mine is None or theirs is None or not theirs < mine * (1.0 - plan.NOISE):
        return None
    if branch_bytes is not None:
        if not branch_bytes.fits(site_plan, variant.chosen):
            return None
        branch_bytes.take(site_plan, variant.chosen)
    return variant.kernel


@dataclass
class Pending:
    """A replaced site whose deferred kernels (``Choice.deferred``) are timed after the rewrite: in a graph
    inductor compiles, once that compile is done (the graph names ``alias``); in a graph run as Python, before
    a call of the optimized model once their background compile is done (``calls``: the ``SiteCall`` to switch)."""

    alias: registry.Deferred | None
    site_plan: plan.SitePlan
    index: int  # the site's position in ``report.sites``
    calls: list = field(default_factory=list)


def settle_deferred(pending: list[Pending], report: Report, options: Options) -> None:
    """Once the background warm-up (``tuning.warm_up``) is done: time each pending site's deferred kernels against
    the kernel it runs now, point its ``Deferred`` kernel (or switch its ``SiteCall``) to the fastest, and say so
    in its report entry. Run between calls (after inductor's compile, before the graph's first call; or before a
    call of the optimized model): a site's kernel never changes between a forward and its backward. The timing
    runs outside any autocast and inference mode of the caller, on random inputs from torch's generators, put
    back as they were."""
    cache = tuning.TuningCache(tuning.cache_dir(options.cache_dir))
    replayed = tuning.replays_graphs(options)
    for item in pending:
        spec, choice = item.site_plan.spec, item.site_plan.choice
        names = [choice.kernel, *choice.deferred]
        estimates = {c.kernel: c.estimate for c in choice.candidates if c.kernel in names}
        with torch.inference_mode(False), torch.autocast(spec.device.type, enabled=False):
            seconds = tuning.measured_seconds(spec, names, cache, label=plan._label(spec), estimates=estimates,
                                              budget=tuning.Budget.for_device(spec.device), replayed=replayed)
        timed_now = {n: t for n, t in seconds.items() if math.isfinite(t)}
        # a kernel that failed when timed, or was not timed, leaves the site on the one timed before the compile
        best = min(timed_now, key=timed_now.get) if choice.kernel in timed_now else choice.kernel
        if item.alias is not None:
            item.alias.target = registry.get(best)
        for call in item.calls:
            call.switch(best)
        site = report.sites[item.index]
        timed = {k: (t, m) for k, t, m in site.candidate_times}
        timed.update({n: (t, True) for n, t in timed_now.items()})
        ordered = tuple(sorted(((k, t, m) for k, (t, m) in timed.items()), key=lambda c: (not c[2], c[1])))
        others = ", ".join(f"{n} {plan.format_seconds(t)}" for n, t in timed_now.items() if n != best)
        how = (f"{best} measured fastest once compiled ({plan.format_seconds(timed_now[best])}; {others})"
               if best in timed_now else f"{best} kept: the kernels timed once compiled failed or were not timed")
        report.sites[item.index] = dataclasses.replace(
            site, kernel=best, bytes_after=bytes_after(spec, best), candidate_times=ordered,
            reason=f"{site.reason}: {how}")


#: sites of graphs run as Python whose deferred kernels compile in the background, per report (by id): entries
#: ``(report's weak reference, warm-up thread, pending sites, options)``, settled by ``settle_ready``
_WAITING: dict[int, list[tuple]] = {}


def wait_for_compile(report: Report, thread, pending: list[Pending], options: Options) -> None:
    """Keep ``pending`` until ``thread`` (their kernels' background compile) is done: ``settle_ready`` then times
    them, before a call of the optimized model."""
    key = id(report)
    ref = weakref.ref(report, lambda _: _WAITING.pop(key, None))
    _WAITING.setdefault(key, []).append((ref, thread, pending, options))


def settle_ready(report: Report) -> None:
    """Settle the sites of ``report`` whose kernels' background compile is done (``settle_deferred``). Called
    before each call of an optimized model, so a site switches kernels between calls; nothing while dynamo
    traces or a CUDA graph is captured (no timing there)."""
    waiting = _WAITING.get(id(report))
    if not waiting or torch.compiler.is_compiling() or capturing():
        return
    for entry in list(waiting):
        ref, thread, pending, options = entry
        if ref() is not report:  # another report at the same address: that one's entries went with it
            waiting.remove(entry)
            continue
        if thread is not None and thread.is_alive():
            continue
        waiting.remove(entry)
        try:
            settle_deferred(pending, report, options)
        except Exception as err:  # noqa: BLE001 - an optional switch must not fail the model's call
            log.warning("attnopt: timing the kernels compiled in the background failed (%s: %s); the sites keep "
                        "the kernels they run", type(err).__name__, err)
    if not waiting:
        _WAITING.pop(id(report), None)


def waiting(report: Report) -> bool:
    """Whether sites of ``report`` wait for their kernels' background compile (``settle_ready`` times them)."""
    return id(report) in _WAITING


def settle(report: Report, timeout: float | None = None) -> bool:
    """Wait for the background compiles of ``report``'s pending sites, at most ``timeout`` seconds in all (None:
    until they end), then time and switch the sites whose compile ended (``settle_ready``), here rather than
    before a later call. True when no site is left pending."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for _, thread, _, _ in list(_WAITING.get(id(report), ())):
        if thread is not None:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    settle_ready(report)
    return id(report) not in _WAITING


def _plan_and_replace(gm: GraphModule, site_plan: plan.SitePlan, graph_index: int, dry_run: bool,
                      unpadded_kernel: str | None = None, subgraph: bool = False, lean: bool = False,
                      fill_only_kernel: str | None = None, rechoice: plan.Rechoice | None = None,
                      pending: Pending | None = None, tried: trial.TrialSite | None = None) -> Site:
    match, spec, choice = site_plan.match, site_plan.spec, site_plan.choice
    described = dict(
        where=site_plan.where, node=match.anchor.name, graph=graph_index, causal=spec.causal,
        mask_terms=match.masks.mask_terms + (("softcap",) if spec.softcap is not None else ()),
        # a checkpointed body's inputs are all placeholders (parameters too): cross is not told apart there
        cross=not subgraph and _cross(match), notes=tuple(match.masks.notes),
        q_heads=spec.q_heads, kv_heads=spec.kv_heads, q_len=spec.q_len, kv_len=spec.kv_len,
        head_dim=spec.head_dim, dtype=str(spec.dtype), bytes_before=bytes_before(match, spec),
    )
    said = _said_of(match)
    if choice is None:
        kept = site_plan.decision  # the comparison that kept the original, when there was one
        return Site(
            replaced=False, reason=site_plan.error,
            rejected_kernels=() if kept is None else tuple((c.kernel, said(c.reasons)) for c in kept.rejected),
            candidate_times=() if kept is None else tuple(
                (c.kernel, c.cost, c.measured) for c in kept.candidates if c.supported),
            **described,
        )
    if not dry_run:
        alias = None if pending is None else pending.alias
        lists = [found.calls for found in (pending, tried) if found is not None]

        def register(call) -> None:  # the SiteCall that a later timing or the trial may switch
            for calls in lists:
                calls.append(call)

        replace(gm.graph, match, choice.kernel if alias is None else alias.name, unpadded_kernel, lean=lean,
                fill_only_kernel=fill_only_kernel, rechoice=rechoice, register=register if lists else None)
    chosen = choice.chosen
    reason = choice.reason
    if unpadded_kernel is not None:
        reason += f"; batches whose padding keeps every key run {unpadded_kernel}"
    if fill_only_kernel is not None:
        dtype = str(spec.dtype).removeprefix("torch.")
        reason += f"; calls whose mask holds only 0 and {dtype}'s finfo.min run {fill_only_kernel} on it as a boolean mask"
    if pending is not None and pending.alias is not None:
        reason += f"; {', '.join(choice.deferred)} compiled in the background and timed after inductor's compile"
    elif pending is not None:
        reason += (f"; {', '.join(choice.deferred)} compiled in the background, timed before a later call once "
                   "compiled")
    if rechoice is not None:
        reason += "; calls in other shape buckets (batch size and lengths rounded up to a power of two) choose their kernel on their first call"
    return Site(
        replaced=True, reason=reason,
        kernel=choice.kernel, exact=choice.exact, bytes_after=bytes_after(spec, choice.kernel),
        rejected_kernels=tuple((c.kernel, said(c.reasons)) for c in choice.rejected),
        error=None if chosen.exact else chosen.error,
        candidate_times=tuple((c.kernel, c.cost, c.measured) for c in choice.candidates if c.supported),
        **described,
    )


def _said_of(match):
    """How the report words a site's reasons: a dropout probability the graph reads at run time was planned as
    ``PLANNED_DROPOUT`` (any p > 0), which the kernels' reasons would otherwise quote as if it were the model's."""
    if match.dropout_node is None:
        return lambda reasons: reasons
    planned = f"p={PLANNED_DROPOUT}"
    return lambda reasons: tuple(r.replace(planned, "p read at run time") for r in reasons)


def _cross(match) -> bool:
    """Whether q comes from a sequence that k does not: cross-attention.

    Compares the graph inputs (not parameters or buffers) each depends on: in
    self-attention, also with a KV cache, everything q depends on reaches k too.
    Queries from parameters alone (DETR's object queries) against keys from an
    input are cross-attention too.
    """
    q_inputs, k_inputs = _data_inputs(match.q.node), _data_inputs(match.k.node)
    return bool(q_inputs - k_inputs) or (not q_inputs and bool(k_inputs))


def _data_inputs(node) -> frozenset:
    seen, stack, found = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if not is_buffer(n) and not is_parameter(n):
                found.add(n)
            continue
        stack.extend(n.all_input_nodes)
    return frozenset(found)
