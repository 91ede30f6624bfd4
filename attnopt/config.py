"""Typed options of ``optimize``, ``explain`` and the ``attnopt`` torch.compile backend."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

#: decimal units are powers of 1000, binary units ("iB") powers of 1024, as in SI / IEC
UNITS = {
    "b": 1, "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str | None, *, name: str = "max_mem") -> int | None:
    """Bytes from an int or a string like "24GB" (10^9 units) or "24GiB" (2^30 units)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{name}={value!r} has type {type(value).__name__}: give bytes as an int or a string like '24GB'"
        )
    if isinstance(value, int):
        number, unit = value, ""
    else:
        found = _SIZE.match(value)
        if not found or found.group(2).lower() not in UNITS:
            raise ValueError(
                f"{name}={value!r} is not a memory size: use an int of bytes or a number with a unit, "
                "e.g. '24GB' (10^9 bytes), '24GiB' (2^30 bytes), '512MB', '1.5TB'"
            )
        number, unit = float(found.group(1)), found.group(2).lower()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be a positive size")
    return size


#: environment variable giving the default of ``tune`` ("0"/"1"): a test suite or CI job sets it once
TUNE_ENV = "ATTNOPT_TUNE"
_FALSE, _TRUE = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def default_tune() -> bool:
    """``tune`` when not given: ``$ATTNOPT_TUNE`` when set, else True."""
    value = os.environ.get(TUNE_ENV)
    if value is None or value.strip() == "":
        return True
    if value.strip().lower() in _FALSE:
        return False
    if value.strip().lower() in _TRUE:
        return True
    raise ValueError(f"{TUNE_ENV}={value!r} is not allowed: set it to 1 (measure the candidates) or 0 (cost model only)")


COMPILERS = ("eager", "inductor")
#: inductor's modes (``torch.compile(mode=...)``), for ``compiler="inductor"``
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: default accepted relative L2 error of an approximate kernel, ||approx - exact|| / ||exact||, per site
DEFAULT_TOL = 0.05


@dataclass(frozen=True)
class Options:
    """What the user asked for. ``compiler`` runs the rewritten graph: "eager" or "inductor".

    ``tol``: with ``exact=False``, an approximate kernel is accepted for a site only when its
    relative L2 error on the example inputs is below ``tol`` (default ``DEFAULT_TOL`` = 5%).
    ``tune``: time each site's candidates, the kernels and the original code, on the CPU or the
    GPU, within a small time budget on the first call (cached on disk per shape bucket, see
    ``attnopt.passes.tuning``); with ``tune=False`` rank by the cost models. Default: True, or
    ``$ATTNOPT_TUNE`` ("0" or "1") when set.
    ``keep_original``: the original code of each site is a candidate (default): a site is replaced
    only by a kernel faster than it beyond timing noise, or as fast and smaller. False replaces
    every site some kernel supports, whatever its speed (to test rewrites, or to compare kernels).
    ``cache_dir``: where tuning results live (default ``$ATTNOPT_CACHE_DIR`` or
    ``~/.cache/attnopt/tuning``).
    ``mode``: inductor's mode for the rewritten graph (``compiler="inductor"`` only), as in
    ``torch.compile(mode=...)``: "default", "reduce-overhead" (CUDA graphs), "max-autotune",
    "max-autotune-no-cudagraphs".
    ``verify``: on each graph's first call, run the original and the rewritten graph on the same
    inputs and compare their outputs (and, for a training graph, the gradients of its inputs that require
    grad); a site whose replacement changes them is restored to its original code, with a warning naming
    it. A safety net, off by default (it costs two extra runs of the graph on its first call, with their
    backward in training, more when a site differs).
    """

    max_mem: int | None = None
    exact: bool = True
    kernel: str | None = None
    compiler: str = "eager"
    dynamic: bool | None = None
    tol: float = DEFAULT_TOL
    tune: bool = True
    cache_dir: str | None = None
    keep_original: bool = True
    mode: str | None = None
    verify: bool = False

    @staticmethod
    def build(*, default_compiler: str = "eager", **given) -> Options:
        known = {f.name for f in fields(Options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"unknown attnopt option(s) {unknown}: known options are {sorted(known)}")
        given.setdefault("compiler", default_compiler)
        given["max_mem"] = parse_bytes(given.get("max_mem"))
        tol = given.get("tol", DEFAULT_TOL)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
            raise ValueError(f"tol={tol!r} is not allowed: give the accepted relative error as a float in (0, 1), e.g. 0.05")
        if "tune" not in given:
            given["tune"] = default_tune()
        for flag in ("exact", "tune", "keep_original", "verify"):
            if not isinstance(given.get(flag, False), bool):
                raise TypeError(f"{flag}={given[flag]!r} must be True or False")
        if given.get("dynamic") is not None and not isinstance(given["dynamic"], bool):
            raise TypeError(f"dynamic={given['dynamic']!r} must be True, False or None (as in torch.compile)")
        if given["compiler"] not in COMPILERS:
            raise ValueError(f"compiler={given['compiler']!r} is not allowed: use one of {COMPILERS}")
        mode = given.get("mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed: use one of {MODES} (inductor's modes)")
        if mode is not None and given["compiler"] != "inductor":
            raise ValueError(f"mode={mode!r} is a mode of inductor: pass compiler='inductor' with it, or leave "
                             f"mode out with compiler={given['compiler']!r}")
        for name in ("kernel", "cache_dir"):
            if given.get(name) is not None and not isinstance(given[name], (str, os.PathLike)):
                raise TypeError(f"{name}={given[name]!r} has type {type(given[name]).__name__}: give a string")
        kernel = given.get("kernel")
        if kernel is not None:
            from attnopt.kernels import registry

            registry.get(kernel)
        return Options(**given)
