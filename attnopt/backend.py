"""The ``attnopt`` torch.compile backend: rewrite attention, then run the graph (inductor by default).

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="attnopt", options={"max_mem": "24GB"})`` works
once attnopt is installed. Pass ``options={"report": attnopt.Report()}`` to
collect what was found; sites are also logged on the ``attnopt`` logger.
"""

from __future__ import annotations

from attnopt.config import Options
from attnopt.passes.pipeline import optimize_graph, run_compiler
from attnopt.report import Report


def attnopt_backend(gm, example_inputs, options: dict | None = None):
    given = dict(options or {})
    report = given.pop("report", None) or Report()
    opts = Options.build(default_compiler="inductor", **given)
    return compile_with(gm, example_inputs, opts, report)


def compile_with(gm, example_inputs, options: Options, report: Report, *, dry_run: bool = False):
    gm = optimize_graph(gm, options, report, dry_run=dry_run, example_inputs=example_inputs)
    if dry_run:
        return gm.forward
    return run_compiler(gm, example_inputs, options)
