"""Tuning: measure the candidate kernels of a site on the GPU once, and remember the result on disk.

Location: ``Options.cache_dir``, else ``$ATTNOPT_CACHE_DIR``, else
``~/.cache/attnopt/tuning/``. One JSON file per (device, library versions,
spec signature with shapes bucketed to powers of two); deleting the folder
only costs re-measuring. Writes go to a temporary file in the same folder and
are renamed into place (``os.replace`` is atomic), so concurrent processes
never see half a file: the last writer wins, and every writer measured the
same thing. Reads take no lock; a file that does not parse is a miss and is
rewritten by the next measurement.

Measurement runs each kernel on random inputs of the site's shapes (masks all
"keep", additive terms zero: the timing of a kernel does not depend on the
values except through tile skipping, which follows the spec's structure),
forward only for inference, forward + backward when the site trains. Tunings
longer than a second print a plain progress line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec

CACHE_ENV = "ATTNOPT_CACHE_DIR"
FORMAT = 1
REPEATS = 5
PROGRESS_AFTER_S = 1.0


def cache_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "attnopt" / "tuning"


def _bucket(n: int) -> int:
    """Round a size up to a power of two: nearby lengths share one measurement."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _versions() -> str:
    import attnopt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch-{torch.__version__}_triton-{triton_version}_attnopt-{attnopt.__version__}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def cache_key(spec: AttentionSpec) -> str:
    """Device name, library versions and the bucketed spec signature, hashed to a file name."""
    shaped = spec.with_(q_len=_bucket(spec.q_len), kv_len=_bucket(spec.kv_len), batch=_bucket(spec.batch))
    text = json.dumps([FORMAT, _device_name(spec.device), _versions(), repr(shaped.signature())])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class TuningCache:
    """Measured seconds per kernel name, one JSON file per key."""

    root: Path
    hits: int = 0
    misses: int = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, float] | None:
        try:
            data = json.loads(self.path(key).read_text())
            times = {str(k): float(v) for k, v in data["seconds"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.misses += 1
            return None
        self.hits += 1
        return times

    def put(self, key: str, seconds: dict[str, float]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "seconds": seconds}, f)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def example_tensors(spec: AttentionSpec, requires_grad: bool):
    """Random q, k, v and neutral mask terms on the spec's device, for timing."""
    device, dtype = spec.device, spec.dtype
    q = torch.randn(spec.batch, spec.q_heads, spec.q_len, spec.head_dim, device=device, dtype=dtype)
    k = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim, device=device, dtype=dtype)
    v = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.v_head_dim, device=device, dtype=dtype)

    def neutral(term, fill):
        if term is None:
            return None
        return torch.full(tuple(term.shape), fill, dtype=term.dtype, device=device)

    terms = dict(
        key_padding=None if spec.key_padding is None else (
            neutral(spec.key_padding, True) if spec.key_padding.dtype == torch.bool
            else neutral(spec.key_padding, spec.kv_len)
        ),
        q_doc=neutral(spec.q_doc, 0), kv_doc=neutral(spec.kv_doc, 0), bias=neutral(spec.bias, 0),
        mask=None if spec.mask is None else neutral(spec.mask, True if spec.mask.dtype == torch.bool else 0),
    )
    real = spec.with_(device=device, **terms)
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v, real


def time_kernel(name: str, spec: AttentionSpec) -> float:
    """Median seconds of one forward (+ backward when the spec trains) of kernel ``name``."""
    kernel = registry.get(name)
    q, k, v, real = example_tensors(spec, requires_grad=False)

    def once():
        out, lse = kernel.forward(q, k, v, real, 0)
        if spec.requires_grad:
            kernel.backward(torch.ones_like(out), q, k, v, out, lse, real, 0, False, False)

    once()  # compile / warm up
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize(spec.device)
        start = time.perf_counter()
        once()
        torch.cuda.synchronize(spec.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Progress:
    """A plain-text progress line on stderr, shown once a tuning has run for more than a second."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start, self.done = total, label, time.perf_counter(), 0

    def step(self, what: str) -> None:
        self.done += 1
        if time.perf_counter() - self.start > PROGRESS_AFTER_S:
            bar = "#" * (20 * self.done // self.total)
            sys.stderr.write(f"\rattnopt tuning {self.label} [{bar:<20}] {self.done}/{self.total} {what:<20}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def measured_seconds(spec: AttentionSpec, names: list[str], cache: TuningCache, *, label: str = "") -> dict[str, float]:
    """Seconds per candidate kernel on ``spec``'s shapes: from the cache, else measured and stored.

    A kernel that fails when run is left out (the planner then keeps its estimate).
    """
    key = cache_key(spec)
    cached = cache.get(key)
    if cached is not None and all(n in cached for n in names):
        return {n: cached[n] for n in names}
    seconds = dict(cached or {})
    progress = Progress(len(names), label)
    for name in names:
        if name not in seconds:
            try:
                seconds[name] = time_kernel(name, spec)
            except (RuntimeError, ValueError, NotImplementedError):
                seconds[name] = float("inf")
        progress.step(name)
    cache.put(key, seconds)
    return {n: seconds[n] for n in names}


def enabled(spec: AttentionSpec, tune: bool) -> bool:
    """Tuning runs on CUDA devices only, when asked for."""
    return tune and spec.device.type == "cuda" and torch.cuda.is_available()
