"""Every variant of the experimental band forward (``kernels/triton_flash_tma.py``), checked then timed, in one run.

    python benchmarks/forward_sweep.py --out benchmarks/results/forward_sweep.md          # on the GPU, < 8 min
    python benchmarks/forward_sweep.py --device cpu --tiny --out /tmp/forward_sweep.md   # the interpreter
    python benchmarks/forward_sweep.py --cases "dense bool" documents --out benchmarks/results/forward_sweep_listed.md
    python benchmarks/forward_sweep.py --cases "D128 N4k" --tiles 64x64w4s3 64x128w4s3 --lazy
    python benchmarks/forward_sweep.py --cases causal --variants ptr --chunks 0 8 16 --tiles 64x64w4s3

For each case (bf16; B*N = 16k tokens; D 64 and 128 at N = 4k, 16k and 1k, causal and not, GQA 32/8 causal
at 4k, a causal sliding window of 1024 at 8k; then specs with tile lists, D 128: the window handed over as a
dense boolean mask at 8k and 32k, a causal dense mask at 4k, 4, 16 and 64 packed documents in a causal 16k
row) every variant of ``triton_flash_tma.candidate_variants`` (with tile lists, also each with the full-tile run
off), then SDPA cuDNN, SDPA flash (given a dense mask
where the case has one), compiled FlexAttention (``create_block_mask`` for causal, window and documents) and the
current ``triton_flash`` (for specs with tile lists also its general forward, ``triton_flash_fwd``) are first
compared with a float64 reference (output and log-sum-exp); a variant
that disagrees is not timed, its error is printed. Then each is timed (``triton.testing.do_bench``
medians) and one markdown table goes to ``--out`` (rewritten after every case, so a run cut short still
leaves its rows): milliseconds, cuDNN's and Flex's time divided by the row's (above 1: faster than the
peer), the errors, and the fastest correct variant of each case marked.

Before the first case, worker processes compile every variant for every case family on small inputs
(``--workers``): Triton caches the binaries on disk, so the timed process only loads them. Cases run in
order of importance and stop when ``--budget`` seconds have passed.

``--transposed`` gives every implementation q/k/v as HF hands them to attnopt (``[B, N, H, D]`` tensors
seen as ``[B, H, N, D]``) instead of contiguous ones.

``--device cpu --tiny`` runs the same script on tiny shapes with 16-row tiles under TRITON_INTERPRET=1
(set here when not set): a check of the script, not a measurement. On the CPU, SDPA's math backend
stands in for cuDNN and FlexAttention runs eagerly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import pathlib
import re
import statistics
import sys
import time


def _device_argument() -> str:
    """``--device`` read before argparse runs: the interpreter must be chosen before triton is imported."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cuda"


if _device_argument() == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from attnopt.kernels import get, naive_attention  # noqa: E402
from attnopt.kernels import triton_flash_tma as tma  # noqa: E402
from attnopt.kernels.spec import AttentionSpec, Window  # noqa: E402

DTYPE = torch.bfloat16
#: a result is correct when max |out - ref| <= OUT_TOL * max |ref| and max |lse - ref| <= LSE_TOL * max(1, |ref|)
OUT_TOL = 2e-2
LSE_TOL = 1e-3
#: rows of the float64 reference computed at once
REF_CHUNK = 1024
#: sequence length of the compile-ahead inputs (a multiple of 16, as every case's, so Triton specializes alike)
WARM_LEN = 256
TINY_TILES = [(16, 16, 4, 1)]
#: ``--variants``: run only the variants whose name contains one of these texts (all when empty)
VARIANT_FILTER: list[str] = []
#: ``--tiles``: (block_m, block_n, num_warps, num_stages) to sweep instead of the head dim's default tiles
EXTRA_TILES: list[tuple[int, int, int, int]] = []
#: ``--lazy``: each variant also with the lazy rescale (measured slower on an H200: forward_sweep_lazy.md)
LAZY: list[bool] = [False]
#: ``--chunks``: each variant in each of these orders of its tiles (``heads_per_chunk``; 0 = the grid's own)
CHUNKS: list[int] = [0]


def tile(text: str) -> tuple[int, int, int, int]:
    """``"64x128w4s3"`` -> (64, 128, 4, 3)."""
    match = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"tile {text!r}: write BLOCK_MxBLOCK_NwWARPSsSTAGES, e.g. 64x128w4s3")
    return tuple(int(g) for g in match.groups())


@dataclasses.dataclass(frozen=True)
class Case:
    d: int
    n: int
    batch: int
    q_heads: int
    kv_heads: int
    causal: bool
    window: int | None = None  # keys i - window + 1 .. i (with causal)
    #: the band handed over as the [N, N] boolean mask a model builds (tile lists), not as terms
    dense: bool = False
    #: packed documents per row (document ids, tile lists), with the band
    documents: int = 0

    @property
    def name(self) -> str:
        n = f"{self.n // 1024}k" if self.n % 1024 == 0 else str(self.n)
        kind = f"window {self.window}" if self.window else ("causal" if self.causal else "full")
        heads = f" GQA {self.q_heads}/{self.kv_heads}" if self.q_heads != self.kv_heads else ""
        listed = " as a dense bool mask" if self.dense else (f" + {self.documents} documents" if self.documents else "")
        return f"D{self.d} N{n} {kind}{heads}{listed}"

    def terms(self, n: int, device: str) -> dict:
        terms = {"causal": self.causal, "window": None if self.window is None else Window(self.window - 1, 0)}
        if self.dense:
            i = torch.arange(n, device=device)
            keep = i[:, None] >= i[None, :] if self.causal else torch.ones(n, n, dtype=torch.bool, device=device)
            terms = {"mask": keep & (i[:, None] - i[None, :] < self.window) if self.window else keep}
        if self.documents:
            ids = packed_documents(self.batch, n, self.documents, device)
            terms.update(q_doc=ids, kv_doc=ids)
        return terms


def packed_documents(batch: int, n: int, documents: int, device: str) -> torch.Tensor:
    """``[batch, n]`` non-decreasing document ids: ``documents`` packed sequences of random lengths per row
    (the same for every run: seeded)."""
    g = torch.Generator().manual_seed(documents)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(n - 1, generator=g)[: max(min(documents, n) - 1, 0)] + 1
        rows.append(torch.zeros(n, dtype=torch.long).index_fill_(0, cuts, 1).cumsum(0))
    return torch.stack(rows).to(device)


def gpu_cases() -> list[Case]:
    """Most important first (issue 12's targets are at N >= 4k)."""
    dense = [Case(d, n, 16384 // n, 16, 16, causal) for n in (4096, 16384) for d in (128, 64) for causal in (True, False)]
    structured = [Case(128, 4096, 4, 32, 8, True), Case(128, 8192, 2, 16, 16, True, 1024),
                  Case(64, 8192, 2, 16, 16, True, 1024)]
    short = [Case(d, 1024, 16, 16, 16, causal) for d in (128, 64) for causal in (True, False)]
    listed = [Case(128, 8192, 2, 16, 16, True, 1024, dense=True), Case(128, 32768, 1, 16, 16, True, 1024, dense=True),
              Case(128, 16384, 1, 16, 16, True, documents=16), Case(128, 16384, 1, 16, 16, True, documents=64),
              Case(128, 16384, 1, 16, 16, True, documents=4), Case(128, 4096, 4, 16, 16, True, dense=True)]
    return dense + structured + short + listed


def tiny_cases() -> list[Case]:
    return [Case(32, 48, 2, 2, 2, True), Case(32, 48, 2, 2, 2, False), Case(16, 32, 2, 2, 2, True),
            Case(32, 48, 1, 4, 2, True), Case(32, 64, 1, 2, 2, True, 16), Case(32, 64, 1, 4, 2, True, 16, dense=True),
            Case(32, 64, 2, 4, 2, True, documents=3)]


def variants_of(case: Case, tiny: bool) -> list[tma.Variant]:
    """The candidates; for a case with tile lists (a dense mask, documents) each also with the full-tile run off."""
    variants = tma.candidate_variants(case.d, case.q_heads // case.kv_heads, TINY_TILES if tiny else EXTRA_TILES
                                      or None, lazy=LAZY[0], chunks=tuple(CHUNKS))
    if case.dense or case.documents:
        variants += [dataclasses.replace(v, full_run=False) for v in variants]
    return [v for v in variants if not VARIANT_FILTER or any(text in v.name for text in VARIANT_FILTER)]


def inputs(case: Case, device: str, n: int | None = None, seed: int = 0, transposed: bool = False):
    """q, k, v ``[B, H, N, D]``: contiguous, or (``transposed``) views of ``[B, N, H, D]`` as HF passes them."""
    n = case.n if n is None else n
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(heads):
        shape = (case.batch, n, heads, case.d) if transposed else (case.batch, heads, n, case.d)
        t = torch.randn(shape, generator=g, device=device, dtype=DTYPE)
        return t.transpose(1, 2) if transposed else t

    q, k, v = randn(case.q_heads), randn(case.kv_heads), randn(case.kv_heads)
    return q, k, v, AttentionSpec.from_tensors(q, k, v, **case.terms(n, device))


# ----------------------------------------------------------------------------- reference and checks
def reference(q, k, v, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(out, lse)``, ``REF_CHUNK`` query rows of one head at a time (the whole float64 score
    tensor of a 16k case is 32 GiB)."""
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float64, device=q.device)
    for h in range(spec.q_heads):
        k_h = k[:, h // spec.group_size].double()  # [B, Nk, D]
        v_h = v[:, h // spec.group_size].double()
        for r0 in range(0, spec.q_len, REF_CHUNK):
            r1 = min(r0 + REF_CHUNK, spec.q_len)
            s = (q[:, h, r0:r1].double() @ k_h.transpose(-1, -2)) * spec.scale  # [B, rows, Nk]
            keep = spec.keep_tile(r0, r1, 0, spec.kv_len)
            if keep is not None:
                s = s.masked_fill(~keep[:, 0], float("-inf"))
            lse[:, h, r0:r1] = torch.logsumexp(s, dim=-1)
            out[:, h, r0:r1] = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v_h
    return out, lse


def errors(out, lse, ref_out, ref_lse) -> tuple[float, float | None, bool]:
    """(max |out - ref| / max |ref|, max |lse - ref| or None, correct?)"""
    scale = ref_out.abs().max().item()
    out_err = (out.double() - ref_out).abs().max().item() / max(scale, 1e-30)
    ok = out_err <= OUT_TOL
    lse_err = None
    if lse is not None:
        lse_err = (lse.double() - ref_lse).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
        same_empty = torch.equal(lse.isneginf(), ref_lse.isneginf())
        ok = ok and same_empty and lse_err <= LSE_TOL * max(1.0, ref_lse.nan_to_num(0.0, 0.0, 0.0).abs().max().item())
    return out_err, lse_err, ok


def bench(fn, device: str) -> float:
    """Median milliseconds."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- peers
def flex(device: str):
    """Compiled FlexAttention on the GPU (as ``benchmarks/kernels.py`` compiles it); eager on the CPU."""
    if device == "cuda":
        from kernels import flex as compiled_flex  # benchmarks/kernels.py (this script's folder)

        return compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def peers(case: Case, q, k, v, spec: AttentionSpec, device: str) -> dict:
    """name -> (call returning (out, lse or None), context it is called and timed in)."""
    from torch.nn.attention.flex_attention import create_block_mask

    gqa = case.q_heads != case.kv_heads
    kw: dict = {"enable_gqa": gqa}
    w = case.window

    doc = spec.q_doc

    def band_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        keep = keep & (q_idx - kv_idx < w) if w else keep
        return keep & (doc[b, q_idx] == doc[b, kv_idx]) if doc is not None else keep

    if w or doc is not None:  # SDPA takes the band (and documents) as a dense boolean mask
        keep = spec.keep_tile(0, case.n, 0, case.n)
        kw["attn_mask"] = keep if keep.shape[0] == 1 else keep.expand(case.batch, case.q_heads, -1, -1)
    else:
        kw["is_causal"] = case.causal
    batch = None if doc is None else case.batch
    block_mask = create_block_mask(band_mod, batch, None, case.n, case.n, device=device) if case.causal else None
    flex_fn = flex(device)
    cudnn = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH
    kernel = get("triton_flash")
    return {
        "SDPA cuDNN" if device == "cuda" else "SDPA math (cuDNN's stand-in on cpu)": (
            lambda: (F.scaled_dot_product_attention(q, k, v, **kw), None), lambda: sdpa_kernel(cudnn)),
        "SDPA flash": (lambda: (F.scaled_dot_product_attention(q, k, v, **kw), None),
                       lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
        "Flex" if device == "cuda" else "Flex (eager on cpu)": (
            lambda: (flex_fn(q, k, v, block_mask=block_mask, enable_gqa=gqa), None), contextlib.nullcontext),
        "triton_flash": (lambda: kernel.forward(q, k, v, spec, 0), contextlib.nullcontext),
        **({"triton_flash, general forward": (lambda: kernel.forward(q, k, v, spec, 0), general_forward)}
           if tma.listed(spec) else {}),
    }


def general_forward():
    """A context in which ``triton_flash`` runs its general kernels (``triton_flash_fwd``), not the band forward's
    measured variant (what it ran for specs with tile lists before the band forward took them):
    ``benchmarks/kernels.py``'s switch."""
    from kernels import general_kernels  # benchmarks/kernels.py (this script's folder)

    return general_kernels()


# ----------------------------------------------------------------------------- compile ahead
#: set in a compile-ahead worker whose CUDA context an earlier job broke (an illegal access poisons it)
_context_lost = False


def _warm(job) -> tuple[tuple, str | None]:
    """Run one variant on small inputs of a case's family (compiles it into Triton's disk cache). The run
    is also a canary: a variant that faults here is not run by the timed process, whose CUDA context a
    fault would break for every later row. Returns the job and its error, or None."""
    global _context_lost
    case, variant, device = job
    if _context_lost:
        return job, None  # not known to fail: the timed process compiles and checks it itself
    try:
        q, k, v, spec = inputs(case, device, n=WARM_LEN if device == "cuda" else case.n)
        with torch.no_grad():
            tma.forward(q, k, v, spec, variant=variant)
        if device == "cuda":
            torch.cuda.synchronize()
        return job, None
    except Exception as exc:  # reported by the timed process
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                _context_lost = True
        return job, f"{type(exc).__name__}: {exc}"


def _family(case: Case) -> Case:
    """What the compiled code depends on: head dim, group (1 is specialized), band; not the lengths."""
    return dataclasses.replace(case, n=WARM_LEN, batch=1)


def compile_ahead(cases, tiny, device, workers, timeout) -> dict:
    """Compile every (family, variant) in ``workers`` processes; returns {(family, variant): error}."""
    jobs = list({(_family(c), v, device): None for c in cases for v in variants_of(c, tiny)})
    if workers <= 0 or not jobs:
        return {}
    failed, deadline = {}, time.time() + timeout
    print(f"compiling {len(jobs)} (case family, variant) pairs in {workers} processes", flush=True)
    try:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.imap_unordered(_warm, jobs)
            for _ in jobs:
                (family, variant, _), error = results.next(timeout=max(deadline - time.time(), 1))
                if error:
                    failed[(family, variant)] = error
                    print(f"  compile failed: {family.name} {variant.name}: {error[:200]}", flush=True)
    except multiprocessing.TimeoutError:
        print(f"  compiling ahead stopped after {timeout:.0f} s; the rest compiles when first run", flush=True)
    except Exception as exc:  # the pool itself failed: the timed process compiles everything on first use
        print(f"  compiling ahead failed ({type(exc).__name__}: {exc}); continuing without it", flush=True)
    return failed


# ----------------------------------------------------------------------------- the sweep
@dataclasses.dataclass
class Row:
    impl: str
    ms: float | None = None
    out_err: float | None = None
    lse_err: float | None = None
    note: str = ""
    variant: bool = False
    ok: bool = False


def run_one(name, fn, context, ref, device, variant: bool) -> Row:
    row = Row(name, variant=variant)
    try:
        with context(), torch.no_grad():
            out, lse = fn()
            row.out_err, row.lse_err, row.ok = errors(out, lse, *ref)
            del out, lse
            if not row.ok:
                row.note = "WRONG: " + ("not timed" if variant else "timed anyway")
            if row.ok or not variant:
                row.ms = bench(fn, device)
    except Exception as exc:  # a variant this GPU cannot build, a backend that refuses the case
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return row


def sweep_case(case: Case, tiny: bool, device: str, compile_errors: dict, transposed: bool) -> list[Row]:
    q, k, v, spec = inputs(case, device, transposed=transposed)
    ref = reference(q, k, v, spec)
    if tiny:  # the chunked reference is itself checked against the whole-matrix oracle
        assert torch.allclose(ref[0], naive_attention(q, k, v, spec), atol=1e-9), "chunked reference is wrong"
    rows = [run_one(name, fn, ctx, ref, device, False) for name, (fn, ctx) in peers(case, q, k, v, spec, device).items()]
    for variant in variants_of(case, tiny):
        error = compile_errors.get((_family(case), variant))
        reasons = tma.unsupported_reasons(q, k, v, spec, variant)
        if error or reasons:
            rows.append(Row(variant.name, note=error or "; ".join(reasons), variant=True))
            continue
        fn = lambda variant=variant: tma.forward(q, k, v, spec, variant=variant)  # noqa: E731
        rows.append(run_one(variant.name, fn, contextlib.nullcontext, ref, device, True))
    for row in rows:
        print(f"  {row.impl}: {fmt(row.ms)} ms, err {fmt(row.out_err, '.1e')} {row.note}", flush=True)
    return rows


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def table(results: dict, skipped: list[Case]) -> list[str]:
    lines = ["| case | implementation | ms | vs cuDNN | vs Flex | out rel err | lse err | note |",
             "|---|---|---|---|---|---|---|---|"]
    summary = ["| case | best variant | ms | vs cuDNN | vs Flex | triton_flash vs cuDNN | triton_flash vs Flex |",
               "|---|---|---|---|---|---|---|"]
    for case, rows in results.items():
        cudnn = next((r.ms for r in rows if r.impl.startswith("SDPA cuDNN") or r.impl.startswith("SDPA math")), None)
        flex_ms = next((r.ms for r in rows if r.impl.startswith("Flex")), None)

        def ratio(peer, ms):
            return "" if peer is None or ms is None else f"{peer / ms:.2f}"

        timed = [r for r in rows if r.variant and r.ok and r.ms is not None]
        best = min(timed, key=lambda r: r.ms) if timed else None
        for r in rows:
            name = f"**{r.impl}** (best)" if r is best else r.impl
            lines.append(f"| {case.name} | {name} | {fmt(r.ms)} | {ratio(cudnn, r.ms)} | {ratio(flex_ms, r.ms)} "
                         f"| {fmt(r.out_err, '.1e')} | {fmt(r.lse_err, '.1e')} | {r.note.replace('|', '/')} |")
        ours = next((r for r in rows if r.impl == "triton_flash"), None)
        summary.append(f"| {case.name} | {best.impl if best else 'none correct'} | {fmt(best.ms if best else None)} "
                       f"| {ratio(cudnn, best.ms if best else None)} | {ratio(flex_ms, best.ms if best else None)} "
                       f"| {ratio(cudnn, ours.ms if ours else None)} | {ratio(flex_ms, ours.ms if ours else None)} |")
    out = lines + ["", "Best correct variant per case:", ""] + summary
    if skipped:
        out += ["", "Not run (time budget): " + ", ".join(c.name for c in skipped)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and 16-row tiles (for the interpreter)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new case starts")
    parser.add_argument("--workers", type=int, default=None, help="compile-ahead processes (0: none)")
    parser.add_argument("--cases", nargs="*", default=[],
                        help="run only cases whose name contains one of these texts")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="run only variants whose name contains one of these texts ('64x64 w4', 'lazy')")
    parser.add_argument("--tiles", nargs="*", type=tile, default=[],
                        help="tiles to sweep instead of the head dim's defaults, e.g. 64x128w4s3 128x128w8s3")
    parser.add_argument("--lazy", action="store_true", help="each variant also with the lazy rescale")
    parser.add_argument("--chunks", nargs="*", type=int, default=[0],
                        help="each variant in each of these tile orders (heads_per_chunk; 0: the grid's own)")
    parser.add_argument("--transposed", action="store_true",
                        help="inputs as HF hands them over: [B, N, H, D] tensors seen as [B, H, N, D]")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("forward_sweep: no CUDA device here; use --device cpu --tiny to check the script")
    start = time.time()
    VARIANT_FILTER[:] = args.variants
    EXTRA_TILES[:] = args.tiles
    LAZY[0] = args.lazy
    CHUNKS[:] = args.chunks
    cases = [c for c in (tiny_cases() if args.tiny else gpu_cases())
             if not args.cases or any(text in c.name for text in args.cases)]
    workers = args.workers if args.workers is not None else (2 if args.tiny else min(8, os.cpu_count() or 1))
    compile_errors = compile_ahead(cases, args.tiny, args.device, workers, timeout=args.budget / 3)
    head = [f"{sweep_setting(args, cases)}; correct = max |out - ref| <= {OUT_TOL} max |ref| and "
            f"|lse - ref| <= {LSE_TOL} max(1, |ref|) against float64", ""]
    run_within_budget(cases, start, args.budget, lambda case: sweep_case(
        case, args.tiny, args.device, compile_errors, args.transposed), head, table, args.out)


def sweep_setting(args, cases) -> str:
    """The table's first words: machine, versions, dtype, layout, tokens, unit, what a ratio means."""
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    layout = "[B, N, H, D] seen as [B, H, N, D]" if args.transposed else "contiguous [B, H, N, D]"
    return (f"{machine}, torch {torch.__version__}, triton {triton.__version__}; bf16, {layout}, B*N = "
            f"{cases[0].batch * cases[0].n if cases else 0} tokens; milliseconds (medians); 'vs X' = X's time / "
            "this row's time (above 1: faster than X)")


def run_within_budget(cases, start: float, budget: float, sweep, head: list[str], table, out) -> None:
    """``sweep(case)`` for the cases in order until ``budget`` seconds after ``start`` (later ones are listed as
    not run); ``head + table(results, skipped)`` is written to ``out`` after every case, and printed at the end."""
    results, skipped = {}, []
    for case in cases:
        if time.time() - start > budget:
            skipped.append(case)
        else:
            print(f"{case.name} ({time.time() - start:.0f} s)", flush=True)
            results[case] = sweep(case)
        if out:
            out.write_text("\n".join(head + table(results, skipped)) + "\n")
    print("\n".join(head + table(results, skipped)))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
