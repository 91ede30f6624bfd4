"""The ``attnopt`` torch.compile backend: rewrite attention, then run the graph (inductor by default).

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="attnopt", options={"max_mem": "24GB"})`` works
once attnopt is installed. Pass ``options={"report": attnopt.Report()}`` to
collect what was found; sites are also logged on the ``attnopt`` logger.
"""

from __future__ import annotations

from attnopt.config import Options
from attnopt.passes import guards
from attnopt.passes.pipeline import optimize_graph, run_compiler
from attnopt.report import Report


def attnopt_backend(gm, example_inputs, options: dict | None = None):
    given = dict(options or {})
    report = given.pop("report", None) or Report()
    opts = Options.build(default_compiler="inductor", **given)
    return compile_with(gm, example_inputs, opts, report)


def compile_with(gm, example_inputs, options: Options, report: Report, *, dry_run: bool = False):
    if dry_run:
        return optimize_graph(gm, options, report, dry_run=True, example_inputs=example_inputs).forward
    original = guards.clone(gm)

    def build(graph_module, inputs, volatile=frozenset()):
        rewritten = optimize_graph(graph_module, options, report, example_inputs=inputs, volatile=volatile,
                                   runtime_branches=options.compiler == "eager")
        run = run_compiler(rewritten, inputs, options)
        return run, guards.guarded_inputs(rewritten, rewritten.meta["attnopt_reads"], inputs)

    run, checks = build(gm, example_inputs)
    if not checks:
        return run
    return guards.GuardedGraph(original, build, run, checks)
