"""``optimize`` and ``explain``: the user-facing entry points of the pass."""

from __future__ import annotations

import copy
import functools
import types

import torch

from attnopt.backend import compile_with
from attnopt.config import Options
from attnopt.report import Report


def optimize(model: torch.nn.Module, *, max_mem: int | str | None = None, exact: bool = True, **options):
    """Return ``model`` with every attention it computes replaced by attnopt's kernels.

    The result is a shallow copy of ``model`` (same class, same parameters and
    buffers, same call signature) whose ``forward`` is captured by torch.compile
    on first call; each captured graph is rewritten and then run as is
    (``compiler="eager"``, the default: fast start) or through inductor
    (``compiler="inductor"``). What was found is in ``result.attnopt_report``
    after the first call.

    Options: ``max_mem`` (bytes, or "24GB" = 24·10^9 / "24GiB" = 24·2^30),
    ``exact`` (False allows approximate kernels), ``kernel`` (force one kernel by
    name), ``compiler``, ``dynamic`` (passed to torch.compile).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize takes a torch.nn.Module, got {type(model).__name__}")
    opts = Options.build(max_mem=max_mem, exact=exact, **options)
    report = Report()
    optimized = copy.copy(model)
    backend = functools.partial(_backend, options=opts, report=report)
    forward = types.MethodType(type(model).forward, optimized)
    optimized.forward = _own_errors(torch.compile(forward, backend=backend, dynamic=opts.dynamic))
    optimized.attnopt_report = report
    return optimized


def explain(model, args=(), kwargs=None, *, max_mem: int | str | None = None, exact: bool = True, **options) -> Report:
    """Run ``model(*args, **kwargs)`` once and report what ``optimize`` would do; nothing is changed."""
    if not callable(model):
        raise TypeError(f"explain takes a module or function, got {type(model).__name__}")
    opts = Options.build(max_mem=max_mem, exact=exact, **options)
    report = Report()
    backend = functools.partial(_backend, options=opts, report=report, dry_run=True)
    _own_errors(torch.compile(model, backend=backend))(*args, **(kwargs or {}))
    return report


def _own_errors(compiled):
    """Raise attnopt's own errors (a budget no plan fits, bad options) as themselves, not wrapped by dynamo."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            inner = getattr(err, "inner_exception", None)
            if isinstance(inner, (ValueError, TypeError, NotImplementedError)):
                raise inner.with_traceback(None) from None
            raise

    return call


def _backend(gm, example_inputs, *, options: Options, report: Report, dry_run: bool = False):
    return compile_with(gm, example_inputs, options, report, dry_run=dry_run)
