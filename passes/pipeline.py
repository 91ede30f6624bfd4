"""The pass pipeline on one captured graph: detect, analyze, plan, rewrite, report."""

from __future__ import annotations

import logging

from torch.fx import GraphModule

from attnopt.config import Options
from attnopt.report import Report, Site

from . import plan
from .detect import Match, Rejection, find_sites
from .graph import module_path, shape_of
from .memory import bytes_after, bytes_before
from .rewrite import replace, spec_of

log = logging.getLogger("attnopt")


def optimize_graph(gm: GraphModule, options: Options, report: Report, *, dry_run: bool = False) -> GraphModule:
    """Rewrite every attention site of ``gm`` that can be replaced exactly; record each in ``report``."""
    graph_index = report.graphs
    report.graphs += 1
    report.dry_run = dry_run
    for found in find_sites(gm.graph):
        if isinstance(found, Rejection):
            site = Site(
                where=module_path(found.anchor), node=found.anchor.name, graph=graph_index, replaced=False,
                reason=f"{found.reason} [at {found.at.name}]",
            )
        else:
            site = _plan_and_replace(gm, found, options, graph_index, dry_run)
        log.info("attnopt site %s (%s): %s", site.where, "replaced" if site.replaced else "left alone", site.reason)
        report.sites.append(site)
    if not dry_run:
        gm.graph.lint()
        gm.recompile()
    return gm


def _plan_and_replace(gm: GraphModule, match: Match, options: Options, graph_index: int, dry_run: bool) -> Site:
    spec = spec_of(match)
    described = dict(
        where=module_path(match.anchor), node=match.anchor.name, graph=graph_index, causal=spec.causal,
        mask_terms=spec.mask_terms, cross=_cross(match),
        q_heads=spec.q_heads, kv_heads=spec.kv_heads, q_len=spec.q_len, kv_len=spec.kv_len,
        head_dim=spec.head_dim, dtype=str(spec.dtype), bytes_before=bytes_before(match, spec),
    )
    try:
        choice = plan.choose(spec, exact=options.exact, forced=options.kernel)
    except plan.NoKernelError as err:
        if options.kernel is not None:
            raise
        return Site(replaced=False, reason=str(err).splitlines()[0], **described)
    if not dry_run:
        replace(gm.graph, match, choice.kernel)
    return Site(
        replaced=True, reason=choice.reason,
        kernel=choice.kernel, exact=choice.exact, bytes_after=bytes_after(spec, choice.kernel),
        rejected_kernels=tuple((c.kernel, c.reasons) for c in choice.rejected), **described,
    )


def _cross(match: Match) -> bool:
    """Whether q and k come from different sequences: their token dims differ in provenance.

    Without a provenance analysis, a site is cross-attention when the key length
    differs from the query length; equal lengths are reported as self-attention.
    """
    q, k = shape_of(match.q), shape_of(match.k)
    return q is not None and k is not None and q[-2] != k[-2]


def run_compiler(gm: GraphModule, example_inputs, options: Options):
    """The callable that runs a rewritten graph: the graph itself, or inductor's compilation of it."""
    if options.compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward

