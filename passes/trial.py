"""A site's kernel chosen in the model itself: the model's first inference calls, timed with each finalist.

The planner times each candidate kernel on its own, in bursts of calls of that one kernel. In a model, a site's
call sits among some fifty other launches per layer, and where the forward is bound by the host (a left-padded
2k Llama on an H200: ``benchmarks/results/padded_rounds.md``) a kernel whose launch path costs more host time can
be the faster kernel in the planner's timing and the slower one in the model. Which way it goes depends on the
host: the same forward measured 7.8 ms of host time on one machine and 16.3 ms on another of the same kind,
against 10.2 ms on the device.

So, on CUDA, a model's inference calls after its graphs are planned are the measurement. Up to ``FINALISTS``
configurations take turns, call by call: every site on the kernel the planner chose, then every site on its
runner-up, then on its third (a site's finalists: the exact kernels that fit ``max_mem``, need no more memory
than the original code or the choice, and that the planner measured within ``CLOSE`` of its choice). Each call is
timed from an idle device to its last kernel's end (one synchronization before the call and one after). Calls are
compared within their shape bucket (each tensor argument's sizes rounded up to a power of two), each
configuration's first call in a bucket left out (its allocations and first launches). Once one bucket holds
``ROUNDS`` calls of each, the configuration with the lowest median stays if it beats the planner's by more than
``plan.NOISE``; otherwise the planner's does. The report's entry of each site says what was measured. Every
finalist computes the site's function exactly, so the calls of the trial give the model's output up to rounding,
as any kernel does.

Taken part in: replaced sites of graphs run as Python (``compiler="eager"``) on CUDA, planned on measurements
(``tune``), with static shapes (a graph with symbolic shapes re-chooses per shape bucket, ``plan.Rechoice``).
Calls that need gradients, CUDA graph captures and tracing run the planner's configuration, untimed. One call is
timed at a time: a call from another thread meanwhile runs untimed, on whatever the sites run then (every
configuration is exact). A trial that no bucket completes within ``MAX_CALLS`` inference calls ends on the
planner's configuration.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from attnopt.kernels.spec import AttentionSpec
from attnopt.kernels.term_cache import capturing
from attnopt.report import Report

from . import plan
from .memory import bytes_after
from .tuning import ORIGINAL, rounded_up

log = logging.getLogger("attnopt")

#: a kernel whose planner time is within this factor of the chosen kernel's is a finalist: in the padded 2k and 1k
#: Llama a Triton launch costs 0.15-0.25 ms more host time per call than cuDNN's, against device times of
#: 0.2-0.33 ms per call, so kernels 1.3-1.7x apart in the planner's timing changed places in the model
CLOSE = 2.5
#: kernels per site in the trial, its kernel now included: so many configurations take turns
FINALISTS = 3
#: timed calls of each configuration, per shape bucket, after its first
ROUNDS = 3
#: inference calls after which a trial that no bucket completed ends on the planner's configuration
MAX_CALLS = 24
#: device types whose sites take part: where the host launches work that the device runs later, so that a
#: kernel's timing on its own can miss what its launch costs in the model
DEVICES = ("cuda",)
#: the clock the calls are timed with
clock = time.perf_counter


@dataclass
class TrialSite:
    """A replaced site that may run another kernel: its calls, the kernels allowed in its place, and its spec."""

    index: int  # the site's position in ``report.sites``
    spec: AttentionSpec
    allowed: tuple[str, ...]  # exact kernels other than the chosen one that fit max_mem
    device: torch.device
    calls: list = field(default_factory=list)  # the ``ops.SiteCall`` objects that run the site's kernel


def allowed_kernels(site_plan: plan.SitePlan, graph_plan: plan.GraphPlan) -> tuple[str, ...]:
    """The exact kernels that may replace ``site_plan``'s choice in the model: supported, not the original code,
    keeping the graph's planned peak within ``max_mem`` with this site's workspace taken by them, and needing no
    more memory than the original code or the chosen kernel (the optimized model's peak stays the planned one's or
    below the original's)."""
    choice = site_plan.choice
    if choice is None or not choice.exact or choice.kernel == ORIGINAL:
        return ()
    chosen, budget, peak = choice.chosen, graph_plan.budget, graph_plan.peak_after.bytes
    most = max([chosen.footprint, *(c.footprint for c in choice.candidates if c.original)])
    return tuple(c.kernel for c in choice.candidates
                 if c.supported and c.exact and not c.original and c.kernel != choice.kernel and c.footprint <= most
                 and (budget is None or peak - chosen.footprint + c.footprint <= budget))


def eligible(site_plan: plan.SitePlan, options, rechoice) -> bool:
    """Whether a replaced site of a graph run as Python takes part in its model's trial."""
    return (options.tune and options.kernel is None and options.exact and rechoice is None
            and site_plan.choice is not None and site_plan.spec.device.type in DEVICES)


class Trial:
    """The trial of one report's sites (see the module's docstring). ``run`` makes one call of the model."""

    def __init__(self, report: Report):
        self.report = weakref.ref(report)
        self.sites: list[TrialSite] = []
        #: per site taking part: (site, its finalists, its kernel now first); None until the first timed call
        self.finalists: list[tuple[TrialSite, tuple[str, ...]]] | None = None
        self.configs = 1  # configuration i: every site on its i-th finalist (or its first, when it has fewer)
        self.config = 0
        self.counts: dict[tuple, int] = {}  # shape bucket -> calls that ran a site taking part
        self.samples: dict[tuple, list[float]] = {}  # (bucket, configuration) -> seconds per call
        self.calls = 0
        self.ended = False
        #: held through a timed call: a call from another thread meanwhile runs untimed, as the sites are
        self._lock = threading.Lock()

    def add(self, site: TrialSite) -> None:
        """A site of a graph captured now: the trial starts again with it (a configuration's meaning changed)."""
        self._use(0)
        self.sites.append(site)
        self.finalists, self.configs, self.counts, self.samples, self.calls = None, 1, {}, {}, 0

    def run(self, fn, args: tuple, kwargs: dict):
        """``fn(*args, **kwargs)`` (a call of the optimized model), timed in the trial when it is an inference call."""
        if self.ended or not self._lock.acquire(blocking=False):  # another thread's call is timed now
            return fn(*args, **kwargs)
        try:
            if self.ended:
                return fn(*args, **kwargs)
            return self._run(fn, args, kwargs)
        finally:
            self._lock.release()

    def _run(self, fn, args: tuple, kwargs: dict):
        if torch.is_grad_enabled() or capturing() or torch.compiler.is_compiling():
            self._use(0)
            return fn(*args, **kwargs)
        report = self.report()
        if report is None:
            return fn(*args, **kwargs)
        if self.finalists is None:
            self.finalists = self._finalists(report)
            self.configs = max((len(kernels) for _, kernels in self.finalists), default=1)
            if self.configs < 2:
                self._end(report)
                return fn(*args, **kwargs)
        finalists, key = self.finalists, _bucket(args, kwargs)
        n = self.counts.get(key, 0)
        config = n % self.configs
        self._use(config)
        devices = {site.device for site, _ in finalists}
        before = sum(call.calls for site, _ in finalists for call in site.calls)
        _synchronize(devices)
        start = clock()
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            self._use(0)
            if config:  # the other finalists are not tried again after a call that failed with them
                log.warning("attnopt: a call of the model failed with other kernels of its trial; the sites keep "
                            "the kernels the planner chose")
                self._end(report)
            raise
        _synchronize(devices)
        seconds = clock() - start
        if self.finalists is not finalists:  # the call captured a graph whose sites joined the trial: it starts again
            return out
        self._use(0)  # between the trial's calls every site runs the planner's kernel
        self.calls += 1
        if sum(call.calls for site, _ in finalists for call in site.calls) != before:  # a site taking part ran
            self.counts[key] = n + 1
            if n >= self.configs:  # each configuration's first call in a bucket is left out
                self.samples.setdefault((key, config), []).append(seconds)
            timed = [self.samples.get((key, i), ()) for i in range(self.configs)]
            if all(len(t) >= ROUNDS for t in timed):
                self._decide(report, [statistics.median(t) for t in timed], sum(map(len, timed)))
                return out
        if self.calls >= MAX_CALLS:
            self._end(report)
        return out

    def _finalists(self, report: Report) -> list[tuple[TrialSite, tuple[str, ...]]]:
        """Per site: its kernel now (the planner's, or the one a later timing switched it to), then the allowed
        kernels the planner measured fastest after it, up to ``FINALISTS`` in all, each within ``CLOSE`` of it."""
        found = []
        for site in self.sites:
            entry = report.sites[site.index]
            times = {kernel: seconds for kernel, seconds, measured in entry.candidate_times if measured}
            mine = times.get(entry.kernel)
            if mine is None:
                continue
            others = sorted((k for k in site.allowed if k != entry.kernel and times.get(k, math.inf) <= CLOSE * mine),
                            key=times.get)
            if others:
                found.append((site, (entry.kernel, *others[:FINALISTS - 1])))
        return found

    def _end(self, report: Report | None) -> None:
        self.ended = True
        _end(report)

    def _use(self, config: int) -> None:
        if config == self.config or not self.finalists:
            self.config = config if self.finalists else 0
            return
        for site, kernels in self.finalists:
            for call in site.calls:
                call.use(_of(kernels, config))
        self.config = config

    def _decide(self, report: Report, seconds: list[float], timed: int) -> None:
        best = min(range(self.configs), key=seconds.__getitem__)
        keep = best if seconds[best] < seconds[0] * (1.0 - plan.NOISE) else 0
        for site, kernels in self.finalists:
            kernel = _of(kernels, keep)
            for call in site.calls:
                call.switch(kernel)
            entry = report.sites[site.index]
            each = ", ".join(f"{_of(kernels, i)} {plan.format_seconds(t)}" for i, t in enumerate(seconds))
            said = (f"in the model's own inference calls ({timed} timed, the sites' finalists in turn), per call: "
                    f"{each}: {kernel} kept")
            changed = dict(kernel=kernel, bytes_after=bytes_after(site.spec, kernel)) if kernel != entry.kernel else {}
            report.sites[site.index] = dataclasses.replace(entry, reason=f"{entry.reason}; {said}", **changed)
        self.config = keep
        log.info("attnopt: in-model trial of %d site(s): configuration %d of %d kept", len(self.finalists), keep,
                 self.configs)
        self._end(report)


def _of(kernels: tuple[str, ...], config: int) -> str:
    """A site's kernel in configuration ``config``: its finalist there, or its first where it has fewer."""
    return kernels[config] if config < len(kernels) else kernels[0]


def _synchronize(devices) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _bucket(args: tuple, kwargs: dict) -> tuple:
    """The shape bucket of a call: each tensor argument's sizes rounded up to a power of two (a decode step whose
    cache grows by one key stays in its bucket)."""
    found = []
    for name, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, torch.Tensor):
            found.append((name, tuple(rounded_up(int(s)) for s in value.shape)))
    return tuple(found)


#: id of a report -> its trial, while one runs
_TRIALS: dict[int, Trial] = {}


def add(report: Report, site: TrialSite) -> None:
    """Enter a replaced site of ``report`` into its model's trial (started here if none runs)."""
    key = id(report)
    trial = _TRIALS.get(key)
    if trial is None or trial.report() is not report:
        trial = _TRIALS[key] = Trial(report)
        weakref.finalize(report, _TRIALS.pop, key, None)
    trial.add(site)


def running(report: Report) -> Trial | None:
    """The trial of ``report``'s sites, while one runs."""
    trial = _TRIALS.get(id(report))
    return trial if trial is not None and trial.report() is report else None


def _end(report: Report | None) -> None:
    if report is not None:
        _TRIALS.pop(id(report), None)
