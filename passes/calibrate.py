"""Calibration: the error of approximate plans, measured on the model's output for the example inputs.

``Calibration`` rewrites a copy of the captured graph with exact kernels and
runs it once on the example inputs (``torch.fx.Interpreter``), keeping each
site's op arguments (q, k, v and mask terms as the op receives them), its exact
output, and the graph's exact outputs. Then:

* ``site_error`` runs one kernel on one site's captured arguments: the relative
  L2 error ``||approx - exact|| / ||exact||`` of that attention alone (finite
  entries only), a diagnostic and the planner's guide to which settings are
  worth a whole-graph run; it also times the call.
* ``output_error`` runs the whole copy with some sites on approximate kernels
  and returns the relative L2 error of the graph's outputs (the model's output
  when the model is one graph): the number ``tol`` bounds.

Inputs are always concrete: under dynamic shapes the backend receives the
symbolic sizes (``SymInt``) beside real tensors, and every size is replaced by
the value of this call before anything runs. The copy is run in ``no_grad``,
so a training graph is calibrated on its forward. Every run starts from the same random state (a training
graph's dropout draws the same masks in each) and from copies of the inputs the graph writes in place (the
caller's buffers, caches and counters see the real call alone), and torch's generators are restored after
it. The exact run uses each
site's planned exact kernel (an O(N)-memory kernel where the original code is
kept), so calibration stays within the memory the exact plan was sized for, plus one copy of each input the
graph writes in place (a static cache written by the forward is copied for each run): ``plan.approximate``
counts that copy against ``max_mem`` and keeps the exact plan, without calibrating, where it does not fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node

from attnopt.kernels import registry

from .detect import Match, find_sites
from .graph import private_inputs, seeded, written_inputs
from .rewrite import replace

ATTENTION = torch.ops.attnopt.attention.default
#: every run of the copy starts from this random state: a training graph's dropout draws the same masks in the
#: exact run and in each approximate one, so their difference is the approximation's
SEED = 0


@dataclass
class SiteValues:
    args: tuple  # the arguments of the site's ``attnopt::attention`` call, real tensors
    output: torch.Tensor  # the exact kernel's output on them [B, Hq, Nq, Dv]


def concrete(example_inputs) -> list:
    """The example inputs with every symbolic size replaced by its value in this call."""
    found = []
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            x = int(x.node.hint)
        elif isinstance(x, torch.SymFloat):
            x = float(x.node.hint)
        elif isinstance(x, torch.SymBool):
            x = bool(x.node.hint)
        found.append(x)
    return found


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` over the entries where ``want`` is finite; inf when ``got`` is not there."""
    want, got = want.to(torch.float64), got.to(torch.float64)
    finite = torch.isfinite(want)
    diff = torch.where(finite, got - want, torch.zeros_like(want))
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    norm = torch.where(finite, want, torch.zeros_like(want)).norm()
    return float(diff.norm() / norm.clamp_min(1e-30))


def _outputs(value) -> list[torch.Tensor]:
    """The floating-point tensors of a graph's output, in order."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _outputs(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _outputs(item)]
    return []


class Calibration:
    """A copy of ``gm`` whose sites run ``exact_kernels`` (None: the site keeps its code), run once on the inputs."""

    def __init__(self, gm: GraphModule, example_inputs, exact_kernels: list[str | None]):
        graph = Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        self.work = GraphModule(gm, graph)
        self.inputs = concrete(example_inputs)
        self.exact_kernels = list(exact_kernels)
        self.calls: list[Node | None] = []
        matches = [f for f in find_sites(self.work.graph) if isinstance(f, Match)]
        assert len(matches) == len(exact_kernels), "the copy's sites differ from the planned ones"
        for match, kernel in zip(matches, exact_kernels):
            if kernel is None:
                self.calls.append(None)
                continue
            before = set(self.work.graph.nodes)
            replace(self.work.graph, match, kernel)
            self.calls.append(next(n for n in self.work.graph.nodes if n not in before and n.target is ATTENTION))
        wanted = {n: i for i, n in enumerate(self.calls) if n is not None}
        values: dict[int, SiteValues] = {}

        class Capture(Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if n in wanted:
                    values[wanted[n]] = SiteValues(tuple(self.fetch_args_kwargs_from_env(n)[0]), result[0])
                return result

        self.work.recompile()
        self.written = written_inputs(self.work)
        start = time.perf_counter()
        with torch.no_grad(), seeded(self.inputs, SEED):
            self.want = _outputs(Capture(self.work).run(*private_inputs(self.inputs, self.written)))
        self.exact_seconds = time.perf_counter() - start
        self.sites: list[SiteValues | None] = [values.get(i) for i in range(len(self.calls))]

    def site_error(self, index: int, kernel_name: str) -> tuple[float, float]:
        """``(relative error, seconds)`` of ``kernel_name`` on site ``index``'s captured arguments."""
        from attnopt.ops import spec_from_args

        site = self.sites[index]
        kernel = registry.get(kernel_name)
        q, k, v = site.args[:3]
        spec = spec_from_args(*site.args[:-1])
        start = time.perf_counter()
        with torch.no_grad():
            out, _ = kernel.forward(q, k, v, spec, 0)
        seconds = time.perf_counter() - start
        return relative_error(out, site.output), seconds

    def output_error(self, kernels: list[str | None]) -> float:
        """Relative error of the graph's outputs with site i on ``kernels[i]`` (None: its exact kernel).

        The largest over the graph's floating-point outputs.
        """
        for call, kernel, exact in zip(self.calls, kernels, self.exact_kernels):
            if call is not None:
                call.args = (*call.args[:-1], kernel or exact)
        self.work.recompile()
        try:
            with torch.no_grad(), seeded(self.inputs, SEED):
                got = _outputs(self.work(*private_inputs(self.inputs, self.written)))
        finally:
            for call, exact in zip(self.calls, self.exact_kernels):
                if call is not None:
                    call.args = (*call.args[:-1], exact)
        return max((relative_error(g, w) for g, w in zip(got, self.want)), default=0.0)



# ------------------------------------------------------------------ plan search
@dataclass(frozen=True)
class Option:
    """One way to run one site: ``kernel`` (None: its exact plan), its seconds and its own measured error."""

    kernel: str | None
    seconds: float
    error: float = 0.0


def plans_by_speed(options: list[list[Option]]) -> list[tuple[Option, ...]]:
    """Candidate plans from slowest (all exact) to fastest.

    Plan ``t`` runs every site on its fastest option whose own error is at most
    ``t``; ``t`` goes through every site error measured, so a site whose
    attention one setting reproduces well takes it early, and a site that every
    approximation hurts stays exact longest. Each distinct plan appears once.
    """
    thresholds = sorted({o.error for site in options for o in site})
    found: list[tuple[Option, ...]] = []
    for t in thresholds:
        plan = tuple(min((o for o in site if o.error <= t), key=lambda o: o.seconds) for site in options)
        if not found or plan != found[-1]:
            found.append(plan)
    return found


def search(plans: list, output_error, tol: float, *, max_runs: int, deadline: float) -> tuple[int | None, dict]:
    """The fastest of ``plans`` (ordered slowest to fastest) whose ``output_error(plan)`` is under ``tol``.

    The fastest is tried first; when it fails, a bisection over the rest (the
    error grows, roughly, as the plans get faster) within ``max_runs`` runs and
    until ``deadline`` (``time.perf_counter()``). Returns the index found (None:
    none accepted) and every error measured, by index.
    """
    measured: dict[int, float] = {}

    def accepted(i: int) -> bool:
        if i not in measured:
            measured[i] = output_error(plans[i])
        return measured[i] < tol

    lo, hi, best = 0, len(plans) - 1, None
    if hi >= 0 and accepted(hi):
        return hi, measured
    hi -= 1
    while lo <= hi and len(measured) < max_runs and time.perf_counter() < deadline:
        mid = (lo + hi + 1) // 2
        if accepted(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best, measured
