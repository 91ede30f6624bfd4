"""The ``attnopt`` torch.compile backend: rewrite attention, then run the graph (inductor by default).

Registered through the ``torch_dynamo_backends`` entry point, so these work once attnopt is
installed::

    compiled = torch.compile(model, backend="attnopt")
    compiled = torch.compile(model, backend="attnopt", options={"max_mem": "24GB", "verify": True})
    compiled = torch.compile(model, backend="attnopt", mode="max-autotune", dynamic=True, fullgraph=True)
    compiled = torch.compile(model, backend=attnopt.Backend(max_mem="24GB"))  # options checked at once
    compiled(x)
    print(attnopt.report_of(compiled))

The options are those of ``attnopt.Options``; ``mode`` is inductor's. Sites are also logged on the
``attnopt`` logger.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings

import torch
from torch.fx import GraphModule

from attnopt.config import Options
from attnopt.kernels.term_cache import new_generation
from attnopt.passes import guards, tuning
from attnopt.passes.graph import is_buffer, is_parameter, private_inputs, seeded, written_inputs
from attnopt.passes.pipeline import optimize_graph, settle_deferred, wait_for_compile
from attnopt.report import AttnoptWarning, Fallback, Report, Site


class Backend:
    """A torch.compile backend with its own options and report::

        backend = attnopt.Backend(max_mem="24GB", verify=True)
        compiled = torch.compile(model, backend=backend)

    The options are those of ``attnopt.Options`` (``compiler`` defaults to "inductor"), checked here
    rather than at the first call. ``report`` (``attnopt.report_of(compiled)``) collects every graph
    compiled through this backend; pass one to collect into it.
    """

    def __init__(self, *, report: Report | None = None, **options):
        if report is not None and not isinstance(report, Report):
            raise TypeError(f"report={report!r} must be an attnopt.Report")
        self.options = Options.build(default_compiler="inductor", **options)
        self.report = report if report is not None else Report()

    def __call__(self, gm: GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
        opts = self.options
        if (mode is not None and mode != "default") or options:  # torch.compile(..., mode=...) or options=...
            opts = Options.build(**{**_given(opts), **(options or {}), **({"mode": mode} if mode else {})})
        return compile_with(gm, example_inputs, opts, self.report)

    def __deepcopy__(self, memo) -> Backend:
        """The same backend: what holds it (transformers deep-copies its generation config on every
        ``generate()`` call) keeps compiling into the same report."""
        return self

    def __repr__(self) -> str:
        return f"attnopt.Backend({self.options})"


def attnopt_backend(gm: GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The backend registered as "attnopt": ``options`` is torch.compile's ``options`` dict, ``mode`` its mode."""
    if not isinstance(options, (dict, type(None))):
        raise TypeError(f"options={options!r} must be a dict of attnopt options, e.g. {{'max_mem': '24GB'}}")
    given = dict(options or {})
    report = given.pop("report", None)
    if report is not None and not isinstance(report, Report):
        raise TypeError(f"options['report']={report!r} must be an attnopt.Report")
    if mode is not None and mode != "default":
        given["mode"] = mode
    opts = Options.build(default_compiler="inductor", **given)
    return compile_with(gm, example_inputs, opts, report or _call_report())


def report_of(compiled) -> Report:
    """What attnopt did to ``compiled``: a model returned by ``attnopt.optimize``, or by
    ``torch.compile(..., backend="attnopt")`` (or ``backend=attnopt.Backend(...)``).

    Before the first call the report is empty; it fills as graphs are captured.
    """
    own = compiled.__dict__.get("attnopt_report") if hasattr(compiled, "__dict__") else None
    if isinstance(own, Report):
        return own
    holder = _attnopt_backend_of(compiled)
    if holder is None:
        raise ValueError(
            f"{type(compiled).__name__} was neither optimized by attnopt.optimize nor compiled with "
            "torch.compile(..., backend='attnopt'): there is no attnopt report for it"
        )
    if isinstance(holder, Backend):
        return holder.report
    given = (holder.kwargs.get("options") or {}).get("report")
    if isinstance(given, Report):  # options={"report": attnopt.Report()}
        return given
    return _wrapper_report(holder)  # before the first call: the one the backend will fill


def _given(options: Options) -> dict:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _call_report() -> Report:
    """The report of the ``torch.compile`` call this graph belongs to, kept on torch.compile's wrapper of
    this backend (``torch._TorchCompileWrapper``, which calls it for every graph of that call and is found
    among the calling frames); a fresh report when the backend was called otherwise."""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        if getattr(caller, "compiler_fn", None) is attnopt_backend and isinstance(getattr(caller, "kwargs", None), dict):
            return _wrapper_report(caller)
        frame = frame.f_back
    return Report()


def _wrapper_report(wrapper) -> Report:
    if not isinstance(getattr(wrapper, "attnopt_report", None), Report):
        wrapper.attnopt_report = Report()
    return wrapper.attnopt_report


def _attnopt_backend_of(compiled):
    """The attnopt backend (a ``Backend``, or torch.compile's wrapper of ``attnopt_backend``) that
    ``compiled``'s torch.compile context calls, or None."""
    context = getattr(compiled, "dynamo_ctx", None)  # a compiled module
    if context is None and getattr(compiled, "__closure__", None):  # a compiled function
        cells = dict(zip(compiled.__code__.co_freevars, compiled.__closure__))
        context = cells["self"].cell_contents if "self" in cells else None
    callback = getattr(context, "callback", None)
    if callback is None:
        return None
    from torch._dynamo.eval_frame import innermost_backend

    found = innermost_backend(callback)
    for candidate in (found, getattr(found, "compiler_fn", None)):
        if isinstance(candidate, Backend):
            return candidate
    return found if getattr(found, "compiler_fn", None) is attnopt_backend else None


def compile_with(gm, example_inputs, options: Options, report: Report, *, dry_run: bool = False,
                 settles_at_calls: bool = False):
    """``gm`` rewritten and made runnable (``run_compiler``), its sites recorded in ``report``.
    ``settles_at_calls``: the caller calls ``pipeline.settle_ready(report)`` before each call of the model
    (``attnopt.optimize``), so a graph run as Python may time a site's compiling kernels after its first call."""
    first_site = len(report.sites)
    if dry_run:
        run = optimize_graph(gm, options, report, dry_run=True, example_inputs=example_inputs).forward
        _note_graph_breaks(gm, report, report.sites[first_site:])
        return run
    original = guards.clone(gm)

    def build(graph_module, inputs, volatile=frozenset()):
        first = (len(report.sites), report.graphs)
        inductor = options.compiler == "inductor"
        rewritten = optimize_graph(graph_module, options, report, example_inputs=inputs, volatile=volatile,
                                   runtime_branches=not inductor, defer=inductor or settles_at_calls)
        if options.verify:
            rewritten = _verified(rewritten, original, inputs, options, report, first, volatile)
        pending = rewritten.meta.get("attnopt_deferred") or []
        # the kernels whose timing waits for inductor, and those chosen from cached timings: compiled in the
        # background meanwhile (then the first are timed)
        jobs = [(name, item.site_plan.spec) for item in pending for name in item.site_plan.choice.deferred]
        jobs += rewritten.meta.get("attnopt_warm") or []
        warming = tuning.warm_up(jobs) if jobs else None
        if not inductor:  # run as Python: the sites switch before a later call, once compiled (settle_ready)
            if pending:
                wait_for_compile(report, warming, pending, options)
            return run_compiler(rewritten, inputs, options), guards.guarded_inputs(
                rewritten, rewritten.meta["attnopt_reads"], inputs)
        try:
            run = run_compiler(rewritten, inputs, options)
        finally:
            if warming is not None:
                warming.join()
        if pending:
            settle_deferred(pending, report, options)
        return run, guards.guarded_inputs(rewritten, rewritten.meta["attnopt_reads"], inputs)

    run, checks = build(gm, example_inputs)
    _note_graph_breaks(gm, report, report.sites[first_site:])
    return _own_generation(guards.GuardedGraph(original, build, run, checks) if checks else run)


def _own_generation(run):
    """``run``, each call of which starts a generation of the term caches (``term_cache.new_generation``): what a
    call builds from its padding or mask tensors is shared by the graph's layers, never handed to a later call,
    whose tensors may have been written around their version counters (``.data``, NumPy) in between."""
    def call(*args):
        new_generation()
        return run(*args)

    return call


def run_compiler(gm: GraphModule, example_inputs, options: Options):
    """The callable that runs a rewritten graph: the graph itself, or inductor's compilation of it
    (in ``options.mode``, with the configuration ``torch.compile(mode=...)`` gives inductor)."""
    if options.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(options.mode, options.dynamic) if options.mode else None
        return compile_fx(gm, example_inputs, config_patches=patches)
    return gm.forward


# ------------------------------------------------------------------ graph breaks

_AT = re.compile(r"\[at ([\w.]+)\]$")
_RESUMED = re.compile(r"^torch_dynamo_resume_in_(\w+)_at_(\d+)$")


def _note_graph_breaks(gm: GraphModule, report: Report, sites: list[Site]) -> None:
    """Record in ``report`` (and warn once) each site left alone because a graph break runs through it.

    Dynamo ends a graph at a break and resumes the code in a new graph: an attention whose
    probabilities are a graph's output (it ended at a break), or whose scores are a graph's input
    (it resumed after one), is split between graphs, and neither graph holds a whole attention.
    """
    why = getattr(gm, "compile_subgraph_reason", None)
    stack = getattr(why, "user_stack", None) or []
    if not stack:
        return
    frame = stack[-1]
    resumed = _RESUMED.match(frame.name)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        if site.graph != report.graphs - 1:  # a checkpointed body's site: its nodes are not this graph's
            continue
        found = _AT.search(site.reason) if not site.replaced else None
        at = nodes.get(found.group(1)) if found else None
        if at is None:
            continue
        if at.op == "output" and getattr(why, "graph_break", False):
            cause = why.reason.strip().splitlines()[0].strip().rstrip(".")
            report.add_fallback(Fallback(
                f"{frame.name} ({frame.filename}:{frame.lineno})",
                f"a graph break ({cause}) splits the attention at {site.where}: its probabilities leave the "
                "graph before the product with the values, so it runs unoptimized; remove the break (a print, "
                ".item(), a data-dependent branch) from between the scores and the output",
                site.graph,
            ))
        elif at.op == "placeholder" and not is_parameter(at) and not is_buffer(at) and resumed:
            report.add_fallback(Fallback(
                f"{resumed.group(1)} ({frame.filename}:{resumed.group(2)})",
                f"a graph break here splits the attention at {site.where}: its scores were computed before "
                "the break, so it runs unoptimized; remove the break (a print, .item(), a data-dependent "
                "branch) from between the inputs and the output of the attention",
                site.graph,
            ))


# ------------------------------------------------------------------ verify

#: largest accepted relative L2 difference between the original's and the rewritten graph's outputs:
#: a few units of rounding in each dtype; a wrong mask or scale differs by orders of magnitude more
VERIFY_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _verified(rewritten: GraphModule, original: GraphModule, inputs, options: Options, report: Report,
              first: tuple[int, int], volatile) -> GraphModule:
    """``rewritten`` when it computes what ``original`` does on ``inputs``; else the graph rewritten again
    with each site whose replacement alone changes the outputs left as it was, with a warning naming it.

    Both graphs run on copies of the inputs they write in place, and from the same random state: a graph
    whose outputs change from one seed to another (dropout in training) cannot be compared, and is
    recorded as not verified. ``first``: the report's number of sites and of graphs before this graph.
    """
    first, first_graph = first
    sites = [s for s in report.sites[first:] if s.replaced]
    if not sites:
        return rewritten
    expected = _outputs(original, inputs, seed=0)
    if _same(_outputs(rewritten, inputs, seed=0), expected):
        _mark(report, first, "verified on the first inputs")
        return rewritten
    if not _same(_outputs(original, inputs, seed=1), expected):
        _mark(report, first, "not verified: the graph is random (dropout in training, sampling)")
        return rewritten
    wrong = {}
    for site in sites:  # one replacement at a time: the others kept as they were
        alone = {s.node: "verify" for s in sites if s is not site}
        trial = optimize_graph(guards.clone(original), options, Report(), example_inputs=inputs, volatile=volatile,
                               runtime_branches=options.compiler == "eager", keep=alone)
        if not _same(_outputs(trial, inputs, seed=0), expected):
            wrong[site.node] = site
    if not wrong:  # no single site: the replacements differ only together
        wrong = {s.node: s for s in sites}
    for site in wrong.values():
        warnings.warn(
            f"attnopt: verify: replacing the attention at {site.where} ({site.node}, graph {site.graph}) with "
            f"{site.kernel} changed the outputs on the first inputs; the original code is kept there",
            AttnoptWarning, stacklevel=2,
        )
    del report.sites[first:]  # rewritten again below, into the same graph numbers
    report.graphs = first_graph
    report.memory = [m for m in report.memory if m.graph < first_graph]
    kept = {node: f"verify: its replacement ({site.kernel}) changed the outputs on the first inputs"
            for node, site in wrong.items()}
    restored = optimize_graph(guards.clone(original), options, report, example_inputs=inputs, volatile=volatile,
                              runtime_branches=options.compiler == "eager", keep=kept)
    _mark(report, first, "verified on the first inputs")
    return restored


def _outputs(gm: GraphModule, inputs, seed: int) -> list[torch.Tensor]:
    """The tensors ``gm`` returns on ``inputs``, run from random state ``seed``, then, for a training graph
    (inputs that require grad, outputs that depend on them), the gradients of those inputs for fixed random
    output gradients: a replacement whose forward is right and backward wrong differs too. Inputs the graph
    writes in place are copied first, so the real call sees them as they were; nothing accumulates in
    ``.grad``."""
    args = private_inputs(inputs, written_inputs(gm))
    # gradients as the call itself would make them: not under no_grad (parameters require grad in eval too)
    wanted = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad] if torch.is_grad_enabled() else []
    with seeded(inputs, seed), torch.set_grad_enabled(bool(wanted)):
        out = gm(*args)
        flat = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        found = [t.detach() for t in flat]
        differentiable = [t for t in flat if t.requires_grad]
        if differentiable:
            generator = torch.Generator().manual_seed(0)  # the same output gradients for every run compared
            seeds = [torch.randn(t.shape, generator=generator).to(t.device, t.dtype) for t in differentiable]
            grads = torch.autograd.grad(differentiable, wanted, seeds, allow_unused=True)
            found += [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(wanted, grads)]
    return found


def _same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected):
        if g.shape != e.shape or g.dtype != e.dtype:
            return False
        if not g.is_floating_point():
            if not torch.equal(g, e):
                return False
            continue
        finite = e.isfinite()
        if not torch.equal(g.isfinite(), finite) or not torch.equal(g[~finite].nan_to_num(), e[~finite].nan_to_num()):
            return False
        g64, e64 = g[finite].double(), e[finite].double()
        scale = e64.norm().clamp(min=torch.finfo(e.dtype).tiny)
        if not (g64 - e64).norm() <= VERIFY_TOL.get(e.dtype, 1e-4) * scale:
            return False
    return True


def _mark(report: Report, first: int, note: str) -> None:
    """Add ``note`` to the replaced sites recorded from index ``first`` on."""
    for i in range(first, len(report.sites)):
        if report.sites[i].replaced:
            report.sites[i] = dataclasses.replace(report.sites[i], notes=(*report.sites[i].notes, note))
