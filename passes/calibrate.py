"""Calibration: the error of approximate kernels, measured on the example inputs of each site.

``capture_sites`` rewrites a copy of the captured graph with the exact kernel
and runs it once (``torch.fx.Interpreter`` on the real example inputs the
backend received), keeping each site's op arguments (q, k, v, mask terms as
the op receives them) and exact output. ``site_error`` runs a kernel on those
values and returns its relative L2 error ``||approx - exact|| / ||exact||``
(finite entries only). The pipeline only calibrates when ``exact=False`` lets
approximate kernels in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Interpreter, Node

from attnopt.kernels import registry

from .detect import Match, find_sites
from .rewrite import replace

ATTENTION = torch.ops.attnopt.attention.default


@dataclass
class SiteValues:
    args: tuple  # the arguments of the site's ``attnopt::attention`` call, real tensors
    output: torch.Tensor  # the exact kernel's output on them [B, Hq, Nq, Dv]


def capture_sites(gm: GraphModule, example_inputs) -> list[SiteValues]:
    """Each attention site's op arguments and exact output, in ``find_sites`` order, on ``example_inputs``.

    Works on a copy of the graph (``gm`` is not changed): every site is
    replaced with the exact reference kernel, and an interpreter run records
    what each op call receives and returns.
    """
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    work = GraphModule(gm, graph)
    calls = []
    for found in find_sites(work.graph):
        if isinstance(found, Match):
            before = set(work.graph.nodes)
            replace(work.graph, found, "reference")
            calls += [n for n in work.graph.nodes if n not in before and n.target is ATTENTION]
    wanted = set(calls)
    values: dict[Node, SiteValues] = {}

    class Capture(Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in wanted:
                args = self.fetch_args_kwargs_from_env(n)[0]
                values[n] = SiteValues(tuple(args), result[0])
            return result

    work.recompile()
    with torch.no_grad():
        Capture(work).run(*example_inputs)
    return [values[n] for n in calls]


def site_error(kernel_name: str, site: SiteValues) -> float:
    """Relative L2 error of ``kernel_name`` against the exact output on the captured values."""
    from attnopt.ops import spec_from_args

    kernel = registry.get(kernel_name)
    q, k, v = site.args[:3]
    spec = spec_from_args(*site.args[:-1])
    with torch.no_grad():
        out, _ = kernel.forward(q, k, v, spec, 0)
    want = site.output.to(torch.float64)
    got = out.to(torch.float64)
    finite = torch.isfinite(want)
    diff = torch.where(finite, got - want, torch.zeros_like(want))
    norm = torch.where(finite, want, torch.zeros_like(want)).norm()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.norm() / norm.clamp_min(1e-30))
