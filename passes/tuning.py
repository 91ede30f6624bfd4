"""Tuning: time a site's candidates (its kernels and its original code) once, and remember the result on disk.

Location: ``Options.cache_dir``, else ``$ATTNOPT_CACHE_DIR``, else
``~/.cache/attnopt/tuning/``. One JSON file per (device, library versions,
spec signature with shapes bucketed to powers of two); deleting the folder
only costs re-measuring. Writes go to a temporary file in the same folder and
are renamed into place (``os.replace`` is atomic), so concurrent processes
never see half a file: the last writer wins, and every writer measured the
same thing. Reads take no lock; a file that does not parse is a miss and is
rewritten by the next measurement.

What is timed: each kernel on random inputs of the site's shapes (masks all
"keep", additive terms zero: the timing of a kernel does not depend on the
values except through tile skipping, which follows the spec's structure),
forward only for inference, forward + backward when the site trains. The
original code is timed the same way through a stand-in built from the spec
(``original_forward``), never by running the user's graph, which may have
side effects: eager attention materializes its scores in the original dtype,
an SDPA call is ``F.scaled_dot_product_attention`` as the original made it.

Time budget: a measurement must not make the first call slow. On the CPU, where
one attention at a long length can take seconds, a site family (one cache key)
gets ``BUDGET_S`` seconds and a whole plan ``PLAN_BUDGET_S``. The candidates are
timed at the real sequence lengths and head dims, but on as many of the
``batch x kv-head`` rows as fit the budget (at least one), and the time is scaled
to all rows: attention's work is linear in them. A candidate whose estimate does
not fit what is left of the budget, or whose score-sized tensors would not fit
``MAX_MEASURE_BYTES``, is not timed and keeps its estimate; the report marks each
time as measured or estimated. A later run measures what an earlier one left out.
The candidates run in interleaved rounds (one run of each in turn, medians of up to
``REPEATS``), so a change in the machine's load touches all of them alike; on the
CPU, where nothing compiles, the warm-up runs a small shape. CUDA has no budget:
its warm-up at the real shape compiles and autotunes. A CPU timing whose rounds spread widely
(``NOISY_SPREAD``: the machine was busy) is used but marked in its file, and the next process that needs
it measures it again, so one busy moment does not decide a shape for good. Timings longer than
``PROGRESS_AFTER_S`` print a plain progress line on stderr; in a log, a warm-up of ``SLOW_WARMUP_S`` or more
(a compile) gets a line of its own, and the ``attnopt`` logger at INFO names each warm-up as it starts.

A graph that runs inside CUDA graphs (inductor with ``mode="reduce-overhead"``, as Hugging Face compiles a
static cache's decode step) pays no host time per call: there each inference candidate is captured in a CUDA
graph of ``REPLAY_CALLS`` calls and timed by its replays (``time_replayed``), so a decode kernel is compared
with the original by what the GPU does, not by Python dispatch that the replay skips. A candidate that cannot
be captured cannot run there either: it fails its timing. These timings have cache keys of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from attnopt.kernels import fills, registry
from attnopt.kernels.layout import repeat_groups
from attnopt.kernels.sdpa import needs_mask, sdpa_mask
from attnopt.kernels.spec import NAN_FILLS, AttentionSpec, Fill, with_fields

log = logging.getLogger("attnopt")

CACHE_ENV = "ATTNOPT_CACHE_DIR"
#: the cache files' format; 3: timed calls take new term tensors (``calls_terms``), so a timing taken while they
#: found the previous call's tile lists, masks and rows without keys is not reused
FORMAT = 3
#: timed runs per candidate after one warm-up (fewer when the budget runs out)
REPEATS = 5
PROGRESS_AFTER_S = 0.5
#: a candidate's warm-up this long is named on its own line in a log (where the progress line is written once)
SLOW_WARMUP_S = 5.0
#: the candidate name of "keep the site as it was"
ORIGINAL = "original"
#: seconds of timing per site family, and per plan (all families), by device type; None: no limit
BUDGET_S = {"cpu": 1.5, "cuda": None}
PLAN_BUDGET_S = {"cpu": 4.0, "cuda": None}
#: a kernel estimated this many times slower than the fastest candidate, and above FAR_SLOWER_MIN_S, is not
#: timed (``plan_timing``). The floor: estimates leave out host time, so a microsecond-sized call (a decode step:
#: SDPA estimated at 0.3 us, the decode kernel at 8 us, measured 0.4 ms against tens of us) is always timed
FAR_SLOWER, FAR_SLOWER_MIN_S = 20.0, 1e-3
#: a kernel that compiles its code on first use (``Kernel.compiles``: FlexAttention through inductor, triton_flash's
#: large Triton kernels) is timed on a GPU only when its estimate is this factor below the fastest kernel of a
#: lower compile tier: a kernel estimated as fast or slower cannot pay its compile back. Compiling Flex's backward
#: for a training call takes minutes (measured on an H200 with a cold inductor cache, 16k packed documents:
#: 4.4 min for the model's first FlexAttention step, over 8 min inside the planner); an inference call's forward
#: takes seconds, and in a fresh process it starts inductor (attnopt's first-call overhead on an HF Llama at 4k on
#: the H200: 14.1 s, 90% of plain torch.compile's first call, 13.7 s of it timing the candidates). triton_flash's
#: forward took 1.4-1.7 s per term set with a cold Triton cache, and timing it for the pure-causal variant of an
#: HF Llama with padding (where cuDNN wins) cost one of them (benchmarks/results/compile_time.md). Its timing,
#: once in the cache, counts like any other
COMPILED_LEAD = 1.25
#: devices where a graph compiled by inductor times its sites' compiling kernels after that compile, having
#: compiled them in the background meanwhile (``deferrable``, ``warm_up``): on the CPU the two compiles would share
#: its cores, and the timing would run beside inductor's compile workers
DEFER_DEVICES = ("cuda",)
#: inductor's modes that time kernels on the device while compiling: no timing of attnopt's runs beside them
AUTOTUNING_MODES = ("max-autotune", "max-autotune-no-cudagraphs")
#: queries and keys of the CPU warm-up run
WARMUP_LENGTH = 128
#: a CPU timing whose rounds spread more than this (second slowest over fastest run of one candidate, runs
#: of at least NOISY_MIN_S) was taken on a busy machine: it is used, and measured again by the next process
#: that needs it. One slow round is jitter; microsecond runs always spread and decide little
NOISY_SPREAD, NOISY_MIN_S = 1.5, 1e-3
#: on a GPU a call shorter than BURST_BELOW_S is timed as a burst of BURST_CALLS calls before one
#: synchronization: in a model such calls overlap with the next launch, so what one costs there is its host
#: time or its GPU time, whichever is longer, not both plus a synchronization (a decode step: tens of us)
BURST_BELOW_S, BURST_CALLS = 1e-3, 8
#: calls captured in one CUDA graph when a candidate is timed by replays (``time_replayed``)
REPLAY_CALLS = 16
#: the largest score-sized tensor a timing may allocate (the original materializes [B, H, Nq, Nk])
MAX_MEASURE_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}

# CPU cost model of eager attention, fitted on a 2-core CI-class machine (within ~30% of the measured
# time from N = 1k to 4k; only ratios between candidates matter)
#: float32 matmul FLOP/s of a score-sized product
CPU_MATMUL_FLOPS = 1.2e11
#: bytes/s of an elementwise pass over memory already mapped
CPU_BYTES_PER_S = 2e10
#: bytes/s of writing a freshly allocated tensor above the allocator's mmap threshold (page faults)
CPU_FRESH_BYTES_PER_S = 4e9
#: glibc returns allocations above this size to the system and faults them in again on the next use
CPU_MMAP_THRESHOLD = 32 << 20
#: seconds of dispatch per PyTorch op on the CPU
CPU_OP_OVERHEAD_S = 5e-6
#: GPU eager: HBM bytes/s and one launch per op
CUDA_BYTES_PER_S = 3e12
CUDA_OP_OVERHEAD_S = 8e-6


def cache_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "attnopt" / "tuning"


def rounded_up(n: int) -> int:
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
    if device.type == "cpu":
        return f"cpu-{torch.get_num_threads()}threads"
    return device.type


def shape_bucket(batch: int, q_len: int, kv_len: int) -> tuple[int, int, int]:
    """The bucket of a call's batch and lengths, each rounded up to a power of two: what one timing serves."""
    return rounded_up(batch), rounded_up(q_len), rounded_up(kv_len)


def cache_key(spec: AttentionSpec, replayed: bool = False, padding: torch.Tensor | None = None,
              sharing: int = 1) -> str:
    """Device name, library versions and the bucketed spec signature (and whether the candidates were timed
    by CUDA graph replays, the share of rows a captured ``padding`` left without a key, in eighths, and the
    sites sharing the terms, ``sharing``, to a power of two), hashed to a file name."""
    batch, q_len, kv_len = shape_bucket(spec.batch, spec.q_len, spec.kv_len)
    shaped = spec.with_(q_len=q_len, kv_len=kv_len, batch=batch)
    parts = [FORMAT, _device_name(spec.device), _versions(), repr(shaped.signature())]
    if replayed:
        parts.append("replayed")
    if padding is not None:
        parts.append(f"rows without keys {round(8 * empty_share(spec, padding))}/8")
    if sharing > 1:
        parts.append(f"terms shared by {1 << (sharing.bit_length() - 1)}")
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def replays_graphs(options) -> bool:
    """Whether graphs compiled with ``options`` run inside CUDA graphs: inductor in a mode that turns them on
    ("reduce-overhead", "max-autotune"), or with inductor's own switch on."""
    if options.compiler != "inductor":
        return False
    from torch._inductor import config, list_mode_options

    patches = list_mode_options(options.mode, options.dynamic) if options.mode else {}
    return bool(patches.get("triton.cudagraphs", config.triton.cudagraphs))


def replayable(spec: AttentionSpec, replayed: bool) -> bool:
    """Whether ``spec``'s candidates are timed by CUDA graph replays: an inference call on a GPU, in a graph
    that runs inside CUDA graphs (a training call keeps the usual timing)."""
    return replayed and spec.device.type == "cuda" and not spec.requires_grad and spec.dropout_p == 0.0


@dataclass
class TuningCache:
    """Measured seconds per candidate name, one JSON file per key."""

    root: Path
    hits: int = 0
    misses: int = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, float] | None:
        times = self.read(key)
        if times is None:
            self.misses += 1
        else:
            self.hits += 1
        return times

    def is_noisy(self, key: str) -> bool:
        """Whether the file's timings were taken on a busy machine (``put(..., noisy=True)``)."""
        try:
            return bool(json.loads(self.path(key).read_text()).get("noisy", False))
        except (OSError, ValueError, AttributeError):
            return False

    def read(self, key: str) -> dict[str, float] | None:
        """The file's seconds, without counting a hit or a miss; None when absent or unreadable."""
        try:
            data = json.loads(self.path(key).read_text())
            return {str(k): float(v) for k, v in data["seconds"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def put(self, key: str, seconds: dict[str, float], noisy: bool = False) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "seconds": seconds, **({"noisy": True} if noisy else {})}, f)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Budget:
    """Seconds of timing left to one plan (all its site families); None: no limit."""

    seconds: float | None
    spent: float = 0.0

    @staticmethod
    def for_device(device: torch.device) -> Budget:
        return Budget(PLAN_BUDGET_S.get(device.type))

    def left(self) -> float:
        return math.inf if self.seconds is None else max(0.0, self.seconds - self.spent)


# ------------------------------------------------------------------ the original code
@dataclass(frozen=True)
class Original:
    """The code a site would replace, as the planner times and sizes it.

    ``kind``: "softmax" (eager: scores, masks, softmax, product, each a tensor) or
    "sdpa" (one ``F.scaled_dot_product_attention`` call). ``memory_bytes``: its
    attention memory as the memory model estimates it (``memory.bytes_before``).
    """

    kind: str
    memory_bytes: int = 0

    @property
    def key(self) -> str:
        """Its entry in a cache file, beside the kernels' names."""
        return f"{ORIGINAL}:{self.kind}"


def original_inputs(spec: AttentionSpec, kind: str) -> dict:
    """The masks the original receives beside q, k, v, built outside the timed call as the original gets
    them built: eager's ``keep`` and ``additive`` terms, or SDPA's ``attn_mask`` (None under ``is_causal``)."""
    if kind == "sdpa":
        return {"attn_mask": sdpa_mask(spec)}
    keep, additive = spec.materialize()
    return {"keep": keep, "additive": additive}


def original_forward(q, k, v, spec: AttentionSpec, kind: str, inputs: dict) -> torch.Tensor:
    """The original attention ``[B, Hq, Nq, Dv]``, computed the way the original code computes it."""
    dropout_p = spec.dropout_p if spec.requires_grad else 0.0
    if kind == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=inputs["attn_mask"], is_causal=inputs["attn_mask"] is None and spec.causal,
            scale=spec.scale, dropout_p=dropout_p, enable_gqa=spec.group_size > 1,
        )
    if spec.group_size > 1:  # eager attention repeats K/V heads (HF's repeat_kv)
        k, v = repeat_groups(k, v, spec.group_size)
    s = (q @ k.transpose(-1, -2)) * spec.scale  # [B, Hq, Nq, Nk]
    if spec.softcap is not None:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    if inputs["keep"] is not None:
        fill = float("-inf") if spec.fill in (*NAN_FILLS, Fill.SAFE) else torch.finfo(s.dtype).min
        s = s.masked_fill(~inputs["keep"], fill)
    for term in inputs["additive"]:
        s = s + term
    p = torch.softmax(s, dim=-1)
    return (F.dropout(p, dropout_p) if dropout_p > 0.0 else p) @ v


def original_estimate(spec: AttentionSpec, original: Original) -> float:
    """Estimated seconds of the original code, on the kernels' cost scale.

    An SDPA call costs what PyTorch's SDPA kernel for it costs. Eager attention
    is memory-bound: each op writes a score-sized ``[B, Hq, Nq, Nk]`` tensor that
    the next reads, and on a CPU a tensor above the allocator's mmap threshold
    is faulted in page by page on every call, which costs more than the products.
    """
    if original.kind == "sdpa":
        if spec.device.type == "cpu":
            return registry.get("sdpa_cpu").cost(spec)
        names = ("sdpa_efficient",) if needs_mask(spec) else ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
        return min(registry.get(n).cost(spec) for n in names)
    elements = spec.batch * spec.q_heads * spec.q_len * spec.kv_len
    size = elements * spec.dtype.itemsize
    flops = 2.0 * elements * (spec.head_dim + spec.v_head_dim)
    additive = sum(t is not None and t.dtype != torch.bool for t in (spec.bias, spec.mask))
    # score-sized tensors written: product, scale, softcap (2), masked_fill, each additive term, softmax
    written = 3 + 2 * (spec.softcap is not None) + spec.has_boolean_mask + additive
    read = written + 2  # each is read by the next op; softmax reads its input twice
    ops = written + 2
    if spec.device.type == "cuda":
        return (written + read) * size / CUDA_BYTES_PER_S + flops / 4e14 + ops * CUDA_OP_OVERHEAD_S
    fresh = written * size / CPU_FRESH_BYTES_PER_S if size > CPU_MMAP_THRESHOLD else 0.0
    return flops / CPU_MATMUL_FLOPS + (written + read) * size / CPU_BYTES_PER_S + fresh + ops * CPU_OP_OVERHEAD_S


# ------------------------------------------------------------------ timing
def empty_share(spec: AttentionSpec, padding: torch.Tensor) -> float:
    """The share of the rows of ``spec``'s call that the band and the key padding ``padding [B, Nk]`` leave
    without a key."""
    return float(fills.rows_without_keys(spec.with_(key_padding=padding)).float().mean())


def spread_rows(padding: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``batch`` rows of a key padding ``[B, Nk]``, evenly spaced: a sliced timing's share of padded rows."""
    if padding is None or batch >= padding.shape[0]:
        return padding
    return padding[torch.linspace(0, padding.shape[0] - 1, batch).round().long().to(padding.device)]


def example_tensors(spec: AttentionSpec, requires_grad: bool, padding: torch.Tensor | None = None):
    """Random q, k, v and neutral mask terms (all "keep", additive zero) on the spec's device, for timing;
    ``padding`` (bool ``[B, Nk]``, keep): the key padding instead of a neutral one."""
    device, dtype = spec.device, spec.dtype
    q = torch.randn(spec.batch, spec.q_heads, spec.q_len, spec.head_dim, device=device, dtype=dtype)
    k = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.head_dim, device=device, dtype=dtype)
    v = torch.randn(spec.batch, spec.kv_heads, spec.kv_len, spec.v_head_dim, device=device, dtype=dtype)

    def neutral(term, fill):
        return None if term is None else torch.full(tuple(term.shape), fill, dtype=term.dtype, device=device)

    kp, mask = spec.key_padding, spec.mask
    kp = padding.to(device) if padding is not None else neutral(
        kp, True if kp is not None and kp.dtype == torch.bool else spec.kv_len)
    real = spec.with_(
        device=device, q_doc=neutral(spec.q_doc, 0), kv_doc=neutral(spec.kv_doc, 0), bias=neutral(spec.bias, 0),
        key_padding=kp,
        mask=neutral(mask, True if mask is not None and mask.dtype == torch.bool else 0),
    )
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v, real


def rows(spec: AttentionSpec) -> int:
    """The ``batch x kv-head`` rows of a call: its work is linear in them."""
    return spec.batch * spec.kv_heads


def sliced(spec: AttentionSpec, n_rows: int) -> AttentionSpec:
    """The spec on its first ``n_rows`` ``batch x kv-head`` rows (each kv head with its query-head group)."""
    if n_rows >= rows(spec):
        return spec
    kv_heads = min(spec.kv_heads, n_rows)
    batch = max(1, n_rows // spec.kv_heads)
    q_heads = kv_heads * spec.group_size

    def cut(term, batch_dim: int | None, head_dim: int | None):
        if term is None:
            return None
        shape = list(term.shape)
        if batch_dim is not None and len(shape) >= -batch_dim and shape[batch_dim] == spec.batch > 1:
            shape[batch_dim] = batch
        if head_dim is not None and len(shape) >= -head_dim and shape[head_dim] == spec.q_heads > 1:
            shape[head_dim] = q_heads
        return torch.empty(shape, dtype=term.dtype, device="meta")

    kp = spec.key_padding
    return spec.with_(
        batch=batch, q_heads=q_heads, kv_heads=kv_heads,
        key_padding=None if kp is None else cut(kp, -kp.dim(), None),
        q_doc=cut(spec.q_doc, -2, None), kv_doc=cut(spec.kv_doc, -2, None),
        bias=cut(spec.bias, -4, -3), mask=cut(spec.mask, -4, -3),
    )


def shrunk(spec: AttentionSpec, length: int = WARMUP_LENGTH) -> AttentionSpec:
    """The spec on one row and at most ``length`` queries and keys: a warm-up that runs the same code."""
    spec = sliced(spec, 1)
    n_q, n_k = min(spec.q_len, length), min(spec.kv_len, length)

    def cut(term, dims: dict[int, int]):
        if term is None:
            return None
        shape = list(term.shape)
        for dim, new in dims.items():
            if len(shape) >= -dim and shape[dim] > 1:
                shape[dim] = new
        return torch.empty(shape, dtype=term.dtype, device="meta")

    kp = spec.key_padding
    if kp is not None and kp.dtype == torch.bool:  # integer lengths [B] need no cut
        kp = cut(kp, {-1: n_k})
    return spec.with_(
        q_len=n_q, kv_len=n_k, key_padding=kp, q_doc=cut(spec.q_doc, {-1: n_q}), kv_doc=cut(spec.kv_doc, {-1: n_k}),
        bias=cut(spec.bias, {-2: n_q, -1: n_k}), mask=cut(spec.mask, {-2: n_q, -1: n_k}),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(name: str, spec: AttentionSpec, original: Original | None, padding: torch.Tensor | None = None,
            sharing: int = 1):
    """A callable running one forward (+ backward when the spec trains) of candidate ``name`` on ``spec``
    (``padding``: its key padding, else a neutral one). A kernel's calls take new term tensors every ``sharing``
    calls (``calls_terms``)."""
    if name == ORIGINAL:
        q, k, v, real = example_tensors(spec, requires_grad=spec.requires_grad, padding=padding)
        inputs = original_inputs(real, original.kind)

        def once():
            out = original_forward(q, k, v, real, original.kind, inputs)
            if spec.requires_grad:
                out.backward(torch.ones_like(out))

        return once
    kernel = registry.get(name)
    q, k, v, real = example_tensors(spec, requires_grad=False, padding=padding)
    if not spec.requires_grad and spec.dropout_p == 0.0:
        # what an inference call of a replaced site runs (``attnopt.ops.SiteCall``): the kernel's prepared
        # call, without the log-sum-exp and bookkeeping of ``forward`` (a decode step's kernel takes less
        # time than that bookkeeping, so timing ``forward`` would favour the original there)
        call, terms = kernel.prepare(real), calls_terms(real, sharing)
        return lambda: call(q, k, v, terms())

    terms = calls_terms(real, sharing)
    if spec.requires_grad and spec.device.type in _eager_training_devices():
        return _training_runner(name, kernel, q, k, v, terms)

    def once():
        call = terms()
        out, lse = kernel.forward(q, k, v, call, 0)
        if spec.requires_grad:
            kernel.backward(torch.ones_like(out), q, k, v, out, lse, call, 0, False, False)

    return once


def fresh_terms(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with a new view of each term tensor, as a model's forward hands them over: a site's key padding and
    document ids are views made per forward (``rewrite.key_padding_rows``, ``rewrite.id_rows``). So what a kernel
    builds from a term and keeps per tensor object (tile lists, SDPA's mask, which rows see no key) is built
    again, as in the model, and not found in a cache that the model's next forward never hits."""
    terms = {name: t.view_as(t) for name in _TERMS if (t := getattr(spec, name)) is not None}
    return spec if not terms else with_fields(spec, **terms)


def calls_terms(spec: AttentionSpec, sharing: int):
    """A function giving each timed call its spec: ``fresh_terms`` every ``sharing`` calls, the same terms in
    between. ``sharing`` sites that read their terms from the same nodes get one tensor per forward
    (``rewrite._shared``): the first builds what the kernel keeps per term, the others find it. So each timed
    call costs a site's share of that build, as in the model."""
    state = [0, spec]

    def terms() -> AttentionSpec:
        if state[0] % sharing == 0:
            state[1] = fresh_terms(spec)
        state[0] += 1
        return state[1]

    return terms


_TERMS = ("key_padding", "q_doc", "kv_doc", "bias", "mask")


def _eager_training_devices() -> tuple[str, ...]:
    from attnopt import ops  # the op imports the planner: imported when first timed

    return ops.EAGER_TRAINING_DEVICES


def _training_runner(name: str, kernel, q, k, v, terms):
    """What a training call of a replaced site runs (``attnopt.ops.SiteCall`` under autograd): the kernel's forward
    and backward inside the op's autograd function. Its host work per call is then counted as the original's
    (autograd through a few ATen ops) is: where a step is bound by the host, that work is the step's time."""
    from attnopt import ops

    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def once():
        spec = terms()
        out = ops._eager_training(spec, kernel, ops.op_args(q, k, v, spec, name))
        out.backward(torch.ones_like(out))

    return once


def time_candidates(runs: dict, device: torch.device, *, deadline: float = math.inf, repeats: int = REPEATS,
                    progress: Progress | None = None, warmups: dict | None = None,
                    spread: dict | None = None) -> dict[str, float]:
    """Median seconds of each callable in ``runs``, timed in interleaved rounds.

    Each runs once to warm up (compilation, first touch), then up to
    ``repeats`` rounds run every candidate once in turn, so a change in the
    machine's load touches all of them alike. On a GPU a call shorter than
    ``BURST_BELOW_S`` runs ``BURST_CALLS`` times per round before one
    synchronization, and counts the average. A candidate is dropped when its
    next run would pass ``deadline`` (a ``time.perf_counter()`` value); one
    with no timed run is left out of the result. ``warmups``: a cheaper call
    per candidate to warm up with (on the CPU nothing compiles, so a small
    shape initializes as well as the real one); the first round then runs
    every candidate whatever the deadline, as the caller sized it to fit. ``spread``, when given, receives
    each candidate's second slowest over fastest timed run (candidates timed at least three times, each run
    at least ``NOISY_MIN_S``).
    """
    last: dict[str, float] = {}
    for name, once in (warmups if warmups is not None else runs).items():
        if warmups is not None or time.perf_counter() < deadline:
            log.info("attnopt: timing %s: %s warm-up", progress.label if progress else "", name)
            _sync(device)
            start = time.perf_counter()
            once()
            _sync(device)
            last[name] = time.perf_counter() - start
            if progress is not None:
                progress.warmed(name, last[name])
        if progress is not None:
            progress.step(f"{name} (warm-up)")
    times: dict[str, list[float]] = {name: [] for name in last}
    burst = {name: BURST_CALLS if device.type == "cuda" and t < BURST_BELOW_S else 1 for name, t in last.items()}
    for round_index in range(repeats):
        for name in list(last):
            checked = round_index > 0 or warmups is None
            if checked and time.perf_counter() + last[name] * burst[name] > deadline:
                del last[name]
                continue
            once = runs[name]
            start = time.perf_counter()
            for _ in range(burst[name]):
                once()
            _sync(device)
            last[name] = (time.perf_counter() - start) / burst[name]
            times[name].append(last[name])
        if progress is not None:
            progress.step("")
    if spread is not None:
        spread.update({name: sorted(t)[-2] / min(t) for name, t in times.items()
                       if len(t) >= 3 and min(t) >= NOISY_MIN_S})
    return {name: sorted(t)[len(t) // 2] for name, t in times.items() if t}


def time_replayed(runs: dict, device: torch.device, *, deadline: float = math.inf, repeats: int = REPEATS,
                  calls: int = REPLAY_CALLS, progress: Progress | None = None) -> dict[str, float]:
    """Median seconds of one call of each callable in ``runs`` as a CUDA graph replays it: each is warmed up on a
    side stream (compilation, autotuning), captured ``calls`` times into one graph, then its replays are timed
    in interleaved rounds (``time_candidates``). The time is the GPU's alone: no Python, no launches. A
    candidate whose capture fails (a host sync, a CPU tensor) is inf: it cannot run inside a CUDA graph."""
    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    found: dict[str, float] = {}
    stream = torch.cuda.Stream(device)
    callers = torch.cuda.current_stream(device)
    for name, once in runs.items():
        if time.perf_counter() >= deadline:
            break
        captured = False
        try:
            stream.wait_stream(callers)
            with torch.cuda.stream(stream):
                once()
            callers.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    once()
            graphs[name], captured = graph, True
        except (RuntimeError, ValueError, NotImplementedError) as err:
            _failed(name, progress.label if progress else "a CUDA graph", err, captured=True)
            found[name] = math.inf
        finally:
            if not captured:
                _after_failed_capture(device, callers)
    seconds = time_candidates({name: graph.replay for name, graph in graphs.items()}, device, deadline=deadline,
                              repeats=repeats, progress=progress)
    found.update({name: t / calls for name, t in seconds.items()})
    return found


def _after_failed_capture(device: torch.device, callers) -> None:
    """Undo what a capture that failed leaves behind. ``torch.cuda.graph``'s exit ends the capture first, and when
    that raises (a host sync invalidated it) two things are never undone:

    - its capture stream stays current: everything the caller (and the model) ran next would go there;
    - the device's default generator stays in capture mode: the user's next ``torch.randn`` or dropout on the
      device raises "Offset increment outside graph capture". Its state is replaced by a copy (same seed and
      offset, so the user's random numbers go on as they would have) that is not capturing.
    """
    if torch.cuda.current_stream(device) != callers:
        torch.cuda.set_stream(callers)
    generator = torch.cuda.default_generators[_cuda_index(device)]
    generator.graphsafe_set_state(generator.clone_state())


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def time_kernel(name: str, spec: AttentionSpec) -> float:
    """Median seconds of one forward (+ backward when the spec trains) of kernel ``name`` at the full shape."""
    return time_candidates({name: _runner(name, spec, None)}, spec.device)[name]


class Progress:
    """A plain-text progress line on stderr once a timing has run for more than ``PROGRESS_AFTER_S``.

    On a terminal the line is redrawn as candidates finish; in a log it is written once, at the end.
    """

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start, self.done, self.shown = total, label, time.perf_counter(), 0, False
        self.live = sys.stderr.isatty()

    def warmed(self, name: str, seconds: float) -> None:
        """In a log, a warm-up that took ``SLOW_WARMUP_S`` or more (a compile, an autotune) gets a line of its own."""
        if not self.live and seconds >= SLOW_WARMUP_S:
            sys.stderr.write(f"attnopt timing {self.label}: {name} warmed up in {seconds:.1f} s (compiling)\n")
            sys.stderr.flush()

    def step(self, what: str) -> None:
        self.done = min(self.total, self.done + 1)
        elapsed = time.perf_counter() - self.start
        if not self.shown and elapsed <= PROGRESS_AFTER_S:
            return
        finished = self.done == self.total
        if self.live:
            self.shown = True
            bar = "#" * (20 * self.done // max(1, self.total))
            sys.stderr.write(f"\rattnopt timing {self.label} [{bar:<20}] {self.done}/{self.total} {what:<20}")
        elif finished:
            sys.stderr.write(f"attnopt timing {self.label}: {elapsed:.1f} s (once per shape, then cached)")
        if finished:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class Plan:
    """Which candidates to time on how many rows, within the budget."""

    n_rows: int
    timed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _original_bytes_per_row(spec: AttentionSpec) -> float:
    """Bytes the eager stand-in holds at once per row: a score-sized input, output and float32 copy."""
    return 3 * spec.group_size * spec.q_len * spec.kv_len * max(4, spec.dtype.itemsize)


def plan_timing(spec: AttentionSpec, estimates: dict[str, float], budget_s: float,
                fastest: float | None = None, cheaper: dict[int, float] | None = None) -> Plan:
    """The rows to time on, so that every candidate's runs fit ``budget_s`` by their estimates.

    Candidates are taken cheapest estimate first (the original first of all:
    it is the baseline); one whose estimate no longer fits is skipped. The
    original is also skipped when even one row of its scores would not fit
    ``MAX_MEASURE_BYTES``; the rows are then sized for the kernels alone. On a
    GPU, where the budget is unlimited, a kernel estimated ``FAR_SLOWER`` times
    (and ``FAR_SLOWER_MIN_S`` over) the fastest kernel's estimate (``fastest``, over every candidate of the
    site, timed before or not) is skipped too: no GPU estimate is that far off,
    and timing it (the reference kernel: minutes for a long training call)
    would hold up the first call. On a GPU, a kernel that
    compiles on first use is skipped unless its estimate is below the fastest
    estimate of a lower compile tier (``cheaper``: the fastest estimate of each tier of
    ``Kernel.compiles``, likewise over every candidate; by default of ``estimates``) divided by
    ``COMPILED_LEAD``: it must be expected to win clearly.
    The CPU's own budget bounds its timing.
    """
    total_rows = rows(spec)
    per_row = max(sum(estimates.values()), 1e-9) * (1 + REPEATS) / total_rows
    n_rows = total_rows if math.isinf(budget_s) else max(1, min(total_rows, int(budget_s / per_row)))
    cap = MAX_MEASURE_BYTES.get(spec.device.type, MAX_MEASURE_BYTES["cpu"])
    fitting = int(cap // max(_original_bytes_per_row(spec), 1))
    if ORIGINAL in estimates and fitting >= 1:
        n_rows = min(n_rows, fitting)
    plan = Plan(n_rows)
    left = budget_s
    kernels = [e for n, e in estimates.items() if n != ORIGINAL and e > 0]
    fastest = fastest if fastest is not None else min(kernels, default=None)
    cheaper = fastest_by_tier(estimates) if cheaper is None else cheaper
    gpu = spec.device.type == "cuda"
    for name in sorted(estimates, key=lambda n: (n != ORIGINAL, estimates[n])):
        cost = estimates[name] * n_rows / total_rows * (1 + min(REPEATS, 2))
        far = (name != ORIGINAL and gpu and fastest is not None and fastest > 0
               and estimates[name] > max(FAR_SLOWER * fastest, FAR_SLOWER_MIN_S))
        far = far or (gpu and not leads(name, estimates[name], cheaper))
        if (name == ORIGINAL and fitting < 1) or cost > left or far:
            plan.skipped.append(name)
            continue
        plan.timed.append(name)
        left -= cost
    return plan


def timing_plan(spec: AttentionSpec, todo: list[str], estimates: dict[str, float], budget_s: float) -> Plan:
    """``plan_timing`` for the candidates ``todo`` of a site whose kernels are all in ``estimates``: the fastest
    estimate, and each compile tier's, are over every kernel of the site, ``todo`` or not. A kernel timed later
    (``deferrable``: ``triton_flash``, compiled in the background) or earlier (cached) still decides whether a
    kernel that compiles longer leads it: without it, a training site of packed documents on the GPU led FlexAttention
    by cuDNN's estimate alone, and its first call compiled Flex's forward and backward for minutes."""
    known = {n: e for n, e in estimates.items() if n != ORIGINAL}
    return plan_timing(spec, {n: estimates.get(n, 0.0) for n in todo}, budget_s,
                       fastest=min([e for e in known.values() if e > 0], default=None), cheaper=fastest_by_tier(known))


def leads(name: str, estimate: float, cheaper: dict[int, float]) -> bool:
    """Whether ``name``'s estimate leads every kernel of a lower compile tier (``cheaper``, as
    ``fastest_by_tier`` gives it) by ``COMPILED_LEAD``: a kernel that compiles is worth its compile only then.
    True for a kernel of the lowest tier present."""
    lead_over = min([e for tier, e in cheaper.items() if tier < _tier(name)], default=None)
    return lead_over is None or estimate * COMPILED_LEAD <= lead_over


def deferrable(spec: AttentionSpec, names: list[str], estimates: dict[str, float], cache: TuningCache,
               replayed: bool = False) -> list[str]:
    """Which of ``names`` a graph compiled by inductor times after that compile (``plan.candidates``' ``defer``):
    the kernels that compile Triton code (``Kernel.compiles`` is ``COMPILES_TRITON``: triton_flash) and lead the
    lower tiers (``leads``), not yet timed on this spec's shapes (in ``cache``). The others are timed now.
    FlexAttention is not deferred: it compiles through ``torch.compile``, whose lock the thread compiling the
    graph holds, so its warm-up in another thread would wait for a caller that waits for it."""
    known = {n: e for n, e in estimates.items() if n != ORIGINAL}
    cheaper = fastest_by_tier(known)
    cached = cache.get(cache_key(spec, replayable(spec, replayed))) or {}
    return [n for n in names if n != ORIGINAL and n not in cached and _tier(n) == registry.COMPILES_TRITON
            and leads(n, known.get(n, 0.0), cheaper)]


def warm_up(jobs: list[tuple[str, AttentionSpec]]) -> threading.Thread:
    """Run each ``(kernel, spec)`` once, as its timing will, in a thread started here: what it compiles on first
    use (its Triton kernels, FlexAttention's inductor graph) is compiled while the caller goes on (inductor's
    compile of the graph). On the device's current stream of that thread; random inputs from torch's generators,
    put back as they were (``fork_rng``). A kernel that fails is left for its timing to report. Join the thread
    before timing the kernels."""

    def run():
        for name, spec in jobs:
            cuda = spec.device.type == "cuda"
            devices = [_cuda_index(spec.device)] if cuda else []
            try:
                # a new thread's current CUDA device is the first one, whatever the caller's
                with torch.random.fork_rng(devices=devices), \
                        (torch.cuda.device(spec.device) if cuda else contextlib.nullcontext()), \
                        (torch.no_grad() if not spec.requires_grad else torch.enable_grad()):
                    _runner(name, spec, None)()
                    _sync(spec.device)
            except Exception as err:  # noqa: BLE001 - a thread's error would be lost: the timing reports it
                log.info("attnopt: warming up %s in the background failed (%s); its timing reports it", name, err)

    # not a daemon: a script that returns while the thread compiles or runs its kernel waits for it, instead of
    # tearing CUDA and the interpreter down under it
    thread = threading.Thread(target=run, name="attnopt-warm-up", daemon=False)
    thread.start()
    return thread


def _tier(name: str) -> int:
    """What ``name``'s first call compiles (``Kernel.compiles``); the original compiles nothing."""
    return registry.COMPILES_NOTHING if name == ORIGINAL else registry.get(name).compiles


def fastest_by_tier(estimates: dict[str, float]) -> dict[int, float]:
    """The fastest positive estimate of the kernels of each compile tier (the original left out)."""
    best: dict[int, float] = {}
    for name, seconds in estimates.items():
        if name != ORIGINAL and seconds > 0:
            tier = _tier(name)
            best[tier] = min(best.get(tier, math.inf), seconds)
    return best


def measured_seconds(spec: AttentionSpec, names: list[str], cache: TuningCache, *, label: str = "",
                     original: Original | None = None, estimates: dict[str, float] | None = None,
                     budget: Budget | None = None, replayed: bool = False,
                     padding: torch.Tensor | None = None, sharing: int = 1) -> dict[str, float]:
    """Seconds per candidate on ``spec``'s shapes: from the cache, else measured within the budget and stored.

    ``names`` are kernel names and, with ``original``, ``ORIGINAL``. The result
    holds only what was measured (now or before): a candidate that fails when
    run, or that the budget leaves out, is missing (the planner keeps its
    estimate). ``replayed``: the site's graph runs inside CUDA graphs (``replays_graphs``), so an inference
    call on a GPU is timed by replays (``time_replayed``). ``padding`` (bool ``[B, Nk]``): the key padding to
    time on instead of a neutral one (``plan.captured_padding``), its rows taken evenly when fewer are timed.
    ``sharing``: the sites that share this site's term tensors in a forward (``plan.term_sharing``), over whom
    the kernels' per-term work is spread (``calls_terms``).
    """
    replay = replayable(spec, replayed)
    key = cache_key(spec, replay, padding, sharing)
    entry = {n: (original.key if n == ORIGINAL else n) for n in names}
    cached = cache.get(key) or {}
    cpu = spec.device.type == "cpu"
    # a CPU timing taken on a busy machine decides nothing for good: this process measures it again
    todo = list(names) if cpu and cached and cache.is_noisy(key) else [n for n in names if entry[n] not in cached]
    if todo:
        device_budget = BUDGET_S.get(spec.device.type)
        left = budget.left() if budget is not None else math.inf
        family = min(left, math.inf if device_budget is None else device_budget)
        plan = timing_plan(spec, todo, estimates or {}, family)
        small = sliced(spec, plan.n_rows)
        scale = rows(spec) / rows(small)
        start = time.perf_counter()
        # the candidates' random inputs, and what they draw when run (a dropout seed), come from torch's
        # generators: the user's stream of random numbers (their dropout masks) must go on as without attnopt.
        # dynamo keeps it around a compile itself, but a new shape bucket is timed at the call (rechoice)
        with torch.random.fork_rng(devices=[_cuda_index(spec.device)] if spec.device.type == "cuda" else []):
            runs, warmups, found = {}, {}, {}
            for name in plan.timed:
                try:
                    runs[name] = _runner(name, small, original, padding=spread_rows(padding, small.batch),
                                         sharing=sharing)
                    if spec.device.type == "cpu":
                        warm = shrunk(small)  # its padding's too where it keeps the keys (a short call)
                        keys = padding is not None and warm.kv_len == padding.shape[-1]
                        warmups[name] = _runner(name, warm, original,
                                                padding=spread_rows(padding, warm.batch) if keys else None)
                except (RuntimeError, ValueError, NotImplementedError) as err:
                    _failed(name, label or key, err)
                    found[entry[name]] = math.inf  # cannot run this call: never time it again
            progress = Progress(len(runs) + REPEATS, label)
            spread: dict[str, float] = {}
            with torch.no_grad() if not spec.requires_grad else torch.enable_grad():
                try:
                    if replay:
                        seconds = time_replayed(runs, spec.device, deadline=start + family, progress=progress)
                    else:
                        seconds = time_candidates(runs, spec.device, deadline=start + family, progress=progress,
                                                  warmups=warmups or None, spread=spread)
                except (RuntimeError, ValueError, NotImplementedError):
                    seconds = _one_by_one(runs, spec.device, start + family, label or key,
                                          time_replayed if replay else time_candidates)
        found.update({entry[name]: t * scale for name, t in seconds.items()})
        if budget is not None:
            budget.spent += time.perf_counter() - start
        if found:
            cached = {**(cache.read(key) or {}), **found}  # what another process stored meanwhile, too
            noisy = cpu and any(ratio > NOISY_SPREAD for ratio in spread.values())
            if noisy:
                log.info("attnopt: timings of %s spread up to %.1fx between runs (a busy machine): used now, "
                         "measured again next time", label or key, max(spread.values()))
            try:
                cache.put(key, cached, noisy=noisy)
            except OSError as err:  # a read-only or full disk costs re-measuring next time, not the call
                log.warning("attnopt: tuning results not cached in %s: %s", cache.root, err)
    return {n: cached[entry[n]] for n in names if entry[n] in cached}


def _one_by_one(runs: dict, device: torch.device, deadline: float, label: str, timer=None) -> dict[str, float]:
    """Time each candidate alone with ``timer`` (``time_candidates`` or ``time_replayed``), after one of them
    failed in the interleaved rounds; a failing one is inf."""
    found = {}
    for name, once in runs.items():
        try:
            found.update((timer or time_candidates)({name: once}, device, deadline=deadline))
        except (RuntimeError, ValueError, NotImplementedError) as err:
            _failed(name, label, err)
            found[name] = math.inf
    return found


def _failed(name: str, label: str, err: Exception, captured: bool = False) -> None:
    """A candidate that raised when run for timing is never chosen for these shapes: say why, once.
    ``captured``: it raised while captured in a CUDA graph, as the site's graph will run it."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if captured:  # CUDA's own message names the capture, not the host sync or CPU tensor that broke it
        log.warning("attnopt: %s cannot run inside a CUDA graph, as the graph of %s runs (its capture failed: %s: "
                    "%s); it is not used for these shapes", name, label, type(err).__name__, first[:300])
        return
    log.warning("attnopt: %s failed when timed on %s (%s: %s); it is not used for these shapes",
                name, label, type(err).__name__, first[:300])


def enabled(spec: AttentionSpec, tune: bool) -> bool:
    """Tuning runs on the CPU and on CUDA devices, when asked for."""
    if not tune:
        return False
    return spec.device.type == "cpu" or (spec.device.type == "cuda" and torch.cuda.is_available())
