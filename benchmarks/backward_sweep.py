"""Every variant of the experimental band backward (``kernels/triton_flash_bwd_exp.py``), checked then timed, in one run.

    python benchmarks/backward_sweep.py --out benchmarks/results/backward_sweep.md          # on the GPU, < 8 min
    python benchmarks/backward_sweep.py --device cpu --tiny --out /tmp/backward_sweep.md   # the interpreter

The cases are ``forward_sweep.py``'s (bf16; B*N = 16k tokens, 16 heads; D 64 and 128 at N = 4k, 16k and
1k, causal and not, GQA 32/8 causal at 4k, a causal sliding window of 1024 at 8k; the tile-list cases: dense
boolean masks and packed documents, whose variants are also run with the full-tile run off). For each, every variant
of ``triton_flash_bwd_exp.candidate_variants`` (fed ``triton_flash``'s forward ``(out, lse)``), then SDPA
cuDNN, SDPA flash, compiled FlexAttention and the current ``triton_flash`` backward (as registered: a measured
band variant where ``MEASURED_VARIANTS`` has one, else the general backward's dQ kernel; and the general
backward with its float32-atomic dQ) first give dq/dk/dv for one random dO, compared with a float64
reference; a variant that disagrees is not timed, its error is printed. Then each is timed
(``triton.testing.do_bench`` medians): forward + backward (the variants with ``triton_flash``'s forward)
and the backward alone (from a saved forward). One markdown table goes to ``--out``, rewritten after every
case: milliseconds, cuDNN's and Flex's time divided by the row's (above 1: faster than the peer), the
errors, and the fastest correct variant of each case marked.

Before the first case, worker processes compile every variant for every case family on small inputs
(``--workers``), so the timed process only loads the binaries from Triton's disk cache and never runs a
variant that faulted there. Cases run in order of importance and stop when ``--budget`` seconds have passed.

``--forward tma`` feeds the Triton rows from the forward experiment's default variant instead of
``triton_flash``'s forward (same ``(out, lse)`` contract).

``--device cpu --tiny`` runs the same script on tiny shapes with 16-row tiles under TRITON_INTERPRET=1
(set by ``forward_sweep`` on import): a check of the script, not a measurement. On the CPU, SDPA's math
backend stands in for cuDNN and FlexAttention runs eagerly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import pathlib
import time

import forward_sweep
from forward_sweep import (REF_CHUNK, WARM_LEN, Case, _family, bench, fmt, gpu_cases, inputs, peers,
                           run_within_budget, sweep_setting, tiny_cases)

import torch  # noqa: E402  (after forward_sweep, which chooses the interpreter before triton is imported)

from attnopt.kernels import get, naive_attention  # noqa: E402
from attnopt.kernels import triton_flash_bwd_exp as bwd  # noqa: E402
from attnopt.kernels import triton_flash_tma as tma  # noqa: E402
from attnopt.kernels.spec import AttentionSpec  # noqa: E402
from attnopt.kernels.triton_flash import TritonFlashKernel  # noqa: E402

#: gradients are correct when max |dx - ref| <= GRAD_TOL * max |ref| for each of dq, dk, dv
GRAD_TOL = 3e-2
#: ``--chunks``: the first tiles also in each of these orders of their programs (``heads_per_chunk``)
CHUNKS: list[int] = []
TINY_TILES = [(16, 16, 16, 16, 4, 1), (16, 32, 32, 16, 4, 1)]


def variants_of(case: Case, tiny: bool) -> list[bwd.Variant]:
    """The candidates; for a case with tile lists (a dense mask, documents) each also with the full-tile run off,
    and the first tiles with the listed tiles' indices loaded ahead (with the run and without, and without it in
    one launch)."""
    variants = bwd.candidate_variants(case.d, case.q_heads // case.kv_heads, TINY_TILES if tiny else None,
                                      chunks=tuple(CHUNKS))
    if case.dense or case.documents:
        first = variants[0]
        variants += [dataclasses.replace(v, full_run=False) for v in variants]
        variants += [dataclasses.replace(first, prefetch=True),
                     dataclasses.replace(first, prefetch=True, full_run=False),
                     dataclasses.replace(first, prefetch=True, full_run=False, fused=True)]
    return variants


def grad_inputs(case: Case, device: str, n: int | None = None, transposed: bool = False):
    """q, k, v, spec as ``forward_sweep.inputs`` gives them, and a random dO ``[B, Hq, N, D]``."""
    q, k, v, spec = inputs(case, device, n=n, transposed=transposed)
    g = torch.Generator(device=device).manual_seed(1)
    grad_out = torch.randn(q.shape, generator=g, device=device, dtype=q.dtype)
    return q, k, v, grad_out, spec


# ----------------------------------------------------------------------------- reference and checks
def reference_grads(q, k, v, grad_out, spec: AttentionSpec):
    """float64 ``(dq, dk, dv)``, ``REF_CHUNK`` query rows of one head at a time::

        p = softmax(s);  dv += p^T dO;  ds = p * (dO v^T - rowsum(p * dO v^T));  dq = scale ds k;  dk += scale ds^T q
    """
    dq = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float64, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float64, device=q.device)
    for h in range(spec.q_heads):
        kvh = h // spec.group_size
        k_h, v_h = k[:, kvh].double(), v[:, kvh].double()  # [B, Nk, D]
        for r0 in range(0, spec.q_len, REF_CHUNK):
            r1 = min(r0 + REF_CHUNK, spec.q_len)
            q_c, do_c = q[:, h, r0:r1].double(), grad_out[:, h, r0:r1].double()  # [B, rows, D]
            s = (q_c @ k_h.transpose(-1, -2)) * spec.scale  # [B, rows, Nk]
            keep = spec.keep_tile(r0, r1, 0, spec.kv_len)
            if keep is not None:
                s = s.masked_fill(~keep[:, 0], float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            dp = do_c @ v_h.transpose(-1, -2)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            dv[:, kvh] += p.transpose(-1, -2) @ do_c
            dq[:, h, r0:r1] = (ds @ k_h) * spec.scale
            dk[:, kvh] += (ds.transpose(-1, -2) @ q_c) * spec.scale
    return dq, dk, dv


def grad_errors(grads, ref) -> tuple[list[float], bool]:
    """max |dx - ref| / max |ref| of dq, dk, dv, and whether each is within ``GRAD_TOL``."""
    errs = [(g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-30) for g, r in zip(grads, ref)]
    return errs, all(e <= GRAD_TOL for e in errs)


# ----------------------------------------------------------------------------- implementations
# the backward-alone call reuses one forward's graph (retain_graph=True), which a compiled backward with
# donated buffers refuses ("compiled with non-empty donated buffers"): compiled Flex is built without them
torch._functorch.config.donated_buffer = False


def autograd_calls(case: Case, q, k, v, grad_out, spec: AttentionSpec, device: str) -> dict:
    """name -> (prepare, context): the peers through autograd; ``prepare()`` runs the forward whose graph
    the backward-alone call reuses and returns (fwd+bwd call, bwd-alone call), each giving (dq, dk, dv)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    calls = {}
    for name, (fn, context) in peers(case, *leaves, spec, device).items():
        if name.startswith("triton_flash"):  # its forwards only: its backward is timed below, without autograd
            continue

        def prepare(fn=fn):
            out = fn()[0]
            return (lambda: torch.autograd.grad(fn()[0], leaves, grad_out),
                    lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True))

        calls[name] = (prepare, context)
    return calls


#: the forwards whose ``(out, lse)`` the Triton backwards take (``--forward``): the registered kernel's, or the
#: forward experiment's default variant
FORWARDS = {
    "triton_flash": lambda q, k, v, spec: get("triton_flash").forward(q, k, v, spec, 0),
    "tma": lambda q, k, v, spec: tma.forward(q, k, v, spec, variant=tma.Variant()),
}


def kernel_calls(q, k, v, grad_out, spec: AttentionSpec, backward, forward: str = "triton_flash") -> tuple:
    """(fwd+bwd call, bwd-alone call) of ``backward(grad_out, q, k, v, out, lse)`` after ``FORWARDS[forward]``."""
    forward_fn = FORWARDS[forward]
    out, lse = forward_fn(q, k, v, spec)
    return (lambda: backward(grad_out, q, k, v, *forward_fn(q, k, v, spec)),
            lambda: backward(grad_out, q, k, v, out, lse))


def triton_flash_backward(kernel: TritonFlashKernel, spec: AttentionSpec):
    return lambda grad_out, q, k, v, out, lse: kernel.backward(grad_out, q, k, v, out, lse, spec, 0, False, False)[:3]


def variant_backward(variant: bwd.Variant, spec: AttentionSpec):
    return lambda grad_out, q, k, v, out, lse: bwd.backward(grad_out, q, k, v, out, lse, spec, variant=variant)


# ----------------------------------------------------------------------------- compile ahead
#: set in a compile-ahead worker whose CUDA context an earlier job broke
_context_lost = False


def _warm(case: Case, variant: bwd.Variant, device: str) -> str | None:
    """Run one variant on small inputs of a case's family (compiles it into Triton's disk cache). The run
    is also a canary: a variant that faults here is not run by the timed process, whose CUDA context a
    fault would break for every later row. Returns the error, or None."""
    global _context_lost
    if _context_lost:
        return None  # not known to fail: the timed process compiles and checks it itself
    try:
        q, k, v, grad_out, spec = grad_inputs(case, device, n=WARM_LEN if device == "cuda" else case.n)
        kernel_calls(q, k, v, grad_out, spec, variant_backward(variant, spec))[1]()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # reported by the timed process
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:  # an illegal access poisons the context: later jobs here would fail for it
                _context_lost = True
        return f"{type(exc).__name__}: {exc}"
    return None


def compile_ahead(cases, tiny, device, workers, timeout) -> dict:
    """Compile every (family, variant) in ``workers`` processes; returns {(family, variant): error}. The
    workers are terminated when ``timeout`` seconds have passed, so none competes with the timed runs."""
    jobs = list({(_family(c), v): None for c in cases for v in variants_of(c, tiny)})
    if workers <= 0 or not jobs:
        return {}
    print(f"compiling {len(jobs)} (case family, variant) pairs in {workers} processes", flush=True)
    failed, deadline = {}, time.time() + timeout
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = {job: pool.apply_async(_warm, (*job, device)) for job in jobs}
        for (family, variant), result in pending.items():
            try:
                error = result.get(timeout=max(deadline - time.time(), 0.1))
            except multiprocessing.TimeoutError:
                print(f"  compiling ahead stopped after {timeout:.0f} s; the rest compiles when first run", flush=True)
                break
            except Exception as exc:  # the worker itself failed: the timed process runs the variant itself
                print(f"  compiling ahead failed ({type(exc).__name__}: {exc}); continuing", flush=True)
                continue
            if error:
                failed[(family, variant)] = error
                print(f"  compile failed: {family.name} {variant.name}: {error[:200]}", flush=True)
    return failed


# ----------------------------------------------------------------------------- the sweep
@dataclasses.dataclass
class Row(forward_sweep.Row):
    """A forward sweep's row whose ``ms`` is forward + backward, with the backward alone and the gradients'
    errors (its output and lse errors stay empty)."""

    bwd_ms: float | None = None
    errs: list[float] | None = None


def run_one(name, prepare, context, ref, device, variant: bool) -> Row:
    """Check the gradients of the fwd+bwd call of ``prepare()`` against ``ref``, then time both its calls."""
    row = Row(name, variant=variant)
    try:
        with context():
            fwd_bwd, bwd_only = prepare()
            grads = fwd_bwd()
            row.errs, row.ok = grad_errors(grads, ref)
            del grads
            if not row.ok:
                row.note = "WRONG: " + ("not timed" if variant else "timed anyway")
            if row.ok or not variant:
                row.ms = bench(fwd_bwd, device)
                row.bwd_ms = bench(bwd_only, device)
    except Exception as exc:  # a variant this GPU cannot build, a backend that refuses the case
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return row


def sweep_case(case: Case, tiny: bool, device: str, compile_errors: dict, transposed: bool,
               forward: str = "triton_flash") -> list[Row]:
    q, k, v, grad_out, spec = grad_inputs(case, device, transposed=transposed)
    ref = reference_grads(q, k, v, grad_out, spec)
    if tiny:  # the chunked reference is itself checked against autograd through the whole-matrix oracle
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        whole = torch.autograd.grad(naive_attention(*leaves, spec), leaves, grad_out.double())
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(ref, whole)), "chunked reference is wrong"
    rows = []
    for name, (prepare, context) in autograd_calls(case, q, k, v, grad_out, spec, device).items():
        rows.append(run_one(name, prepare, context, ref, device, False))
    for name, kernel in (("triton_flash (as registered, deterministic)", TritonFlashKernel()),
                         ("triton_flash (atomic dQ)", TritonFlashKernel(atomic_dq=True))):
        prepare = functools.partial(kernel_calls, q, k, v, grad_out, spec, triton_flash_backward(kernel, spec),
                                    forward)
        rows.append(run_one(name, prepare, contextlib.nullcontext, ref, device, False))
    for variant in variants_of(case, tiny):
        error = compile_errors.get((_family(case), variant))
        reasons = bwd.unsupported_reasons(grad_out, q, k, v, spec, variant)
        if error or reasons:
            rows.append(Row(variant.name, note=error or "; ".join(reasons), variant=True))
            continue
        prepare = functools.partial(kernel_calls, q, k, v, grad_out, spec, variant_backward(variant, spec), forward)
        rows.append(run_one(variant.name, prepare, contextlib.nullcontext, ref, device, True))
    for row in rows:
        print(f"  {row.impl}: fwd+bwd {fmt(row.ms)} ms, bwd {fmt(row.bwd_ms)} ms, "
              f"err {'/'.join(fmt(e, '.1e') for e in row.errs or [])} {row.note}", flush=True)
    return rows


def table(results: dict, skipped: list[Case]) -> list[str]:
    lines = ["| case | implementation | fwd+bwd ms | vs cuDNN | vs Flex | bwd ms | vs cuDNN | vs Flex "
             "| dq/dk/dv rel err | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = ["| case | best variant | fwd+bwd ms | vs cuDNN | vs Flex | bwd vs cuDNN | bwd vs Flex "
               "| triton_flash fwd+bwd vs cuDNN | vs Flex | registered vs atomic dQ |",
               "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(peer, ms):
        return "" if peer is None or ms is None else f"{peer / ms:.2f}"

    for case, rows in results.items():
        cudnn = next((r for r in rows if r.impl.startswith(("SDPA cuDNN", "SDPA math"))), Row(""))
        flex = next((r for r in rows if r.impl.startswith("Flex")), Row(""))
        timed = [r for r in rows if r.variant and r.ok and r.ms is not None]
        best = min(timed, key=lambda r: r.ms) if timed else Row("none correct")
        for r in rows:
            name = f"**{r.impl}** (best)" if r is best else r.impl
            lines.append(f"| {case.name} | {name} | {fmt(r.ms)} | {ratio(cudnn.ms, r.ms)} "
                         f"| {ratio(flex.ms, r.ms)} | {fmt(r.bwd_ms)} | {ratio(cudnn.bwd_ms, r.bwd_ms)} "
                         f"| {ratio(flex.bwd_ms, r.bwd_ms)} | {'/'.join(fmt(e, '.1e') for e in r.errs or [])} "
                         f"| {r.note.replace('|', '/')} |")
        det, atomic = (next((r for r in rows if r.impl.startswith(p)), Row("")) for p in (
            "triton_flash (as registered", "triton_flash (atomic"))
        summary.append(f"| {case.name} | {best.impl} | {fmt(best.ms)} | {ratio(cudnn.ms, best.ms)} "
                       f"| {ratio(flex.ms, best.ms)} | {ratio(cudnn.bwd_ms, best.bwd_ms)} "
                       f"| {ratio(flex.bwd_ms, best.bwd_ms)} | {ratio(cudnn.ms, det.ms)} "
                       f"| {ratio(flex.ms, det.ms)} | {ratio(atomic.ms, det.ms)} |")
    out = lines + ["", "Best correct variant per case (by forward + backward):", ""]
    out += summary
    if skipped:
        out += ["", "Not run (time budget): " + ", ".join(c.name for c in skipped)]
    return out


#: command-line options: (flag, argparse keywords)
OPTIONS = [
    ("--out", dict(type=pathlib.Path, default=None, help="markdown table, rewritten after every case")),
    ("--device", dict(choices=("cuda", "cpu"), default="cuda")),
    ("--tiny", dict(action="store_true", help="tiny shapes and 16-row tiles (for the interpreter)")),
    ("--budget", dict(type=float, default=420.0, help="seconds after which no new case starts")),
    ("--workers", dict(type=int, default=None, help="compile-ahead processes (0: none)")),
    ("--cases", dict(nargs="*", default=[], help="run only cases whose name contains one of these texts")),
    ("--forward", dict(choices=tuple(FORWARDS), default="triton_flash",
                       help="the forward of the Triton rows' forward + backward and of their saved (out, lse)")),
    ("--transposed", dict(action="store_true",
                          help="inputs as HF hands them over: [B, N, H, D] tensors seen as [B, H, N, D]")),
    ("--chunks", dict(nargs="*", type=int, default=[],
                      help="the first tiles also in each of these program orders (heads_per_chunk)")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, options in OPTIONS:
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("backward_sweep: no CUDA device here; use --device cpu --tiny to check the script")
    start = time.time()
    CHUNKS[:] = args.chunks
    cases = [c for c in (tiny_cases() if args.tiny else gpu_cases())
             if not args.cases or any(text in c.name for text in args.cases)]
    workers = (2 if args.tiny else min(8, os.cpu_count() or 1)) if args.workers is None else args.workers
    compile_errors = compile_ahead(cases, args.tiny, args.device, workers, timeout=args.budget / 3)
    head = [f"{sweep_setting(args, cases)}; correct = max |dx - ref| <= {GRAD_TOL} max |ref| for dq, dk and dv "
            f"against float64; the Triton rows' forward: {args.forward}", ""]
    run_within_budget(cases, start, args.budget, lambda case: sweep_case(
        case, args.tiny, args.device, compile_errors, args.transposed, args.forward), head, table, args.out)

if __name__ == "__main__":
    main()
