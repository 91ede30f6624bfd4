"""Where the host time of a `triton_flash` call goes (CUDA only).

For each case, forward and forward + backward: the host time of one call (the GPU idle before it) beside its GPU
time (`do_bench`), every host synchronization the call makes (`torch.cuda.set_sync_debug_mode("error")`, with the
attnopt frames that made it), and the costliest functions of 20 calls (`cProfile`, by own time). A bare Triton
launch (3 and 60 arguments) gives the floor that any Triton-backed call pays on this host.

    python benchmarks/host_cost.py [--top 25] [--cases documents64 window8k causal4k]
"""
import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

import attnopt

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernels import packed_ids  # noqa: E402


@triton.jit
def _touch(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def _touch_many(x_ptr, n, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9,
                e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, f0, f1, f2, f3, f4, f5, f6, f7, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + a0 + f7, mask=offs < n)


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call of ``calls`` back-to-back calls (no sync between them)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def idle_host_us(fn, calls: int) -> float:
    """Host microseconds of one call with the GPU idle before it: median of ``calls``."""
    return idle_host_and_total_us(fn, calls)[0]


def idle_host_and_total_us(fn, calls: int, before=None) -> tuple[float, float]:
    """Microseconds of one call with the GPU idle before it, medians of ``calls``: its host time, and its time
    until its work is done on the device. ``before`` runs ahead of each call, untimed."""
    host, total = [], []
    for _ in range(calls):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        total.append(time.perf_counter() - start)
    return statistics.median(host) * 1e6, statistics.median(total) * 1e6


def launch_floor() -> None:
    x = torch.randn(4096, device="cuda")
    args = list(range(1, 59))
    one = host_us(lambda: _touch[(4,)](x, x.numel(), BLOCK=1024), 2000)
    many = host_us(lambda: _touch_many[(4,)](x, x.numel(), *args, BLOCK=1024), 2000)
    empty = host_us(lambda: torch.empty(4096, device="cuda"), 2000)
    add = host_us(lambda: x.add_(1), 2000)
    print(f"bare Triton launch: {one:.1f} us (3 arguments), {many:.1f} us (60 arguments); torch.empty {empty:.1f} us, "
          f"x.add_ {add:.1f} us", flush=True)


def cases(names):
    gen = torch.Generator().manual_seed(0)
    n = 16384
    out = {"documents64": (1, n, dict(causal=True, document_ids=packed_ids(n, 64, gen))),
           "window8k": (2, 8192, dict(causal=True, window=(1023, 0))),
           "causal4k": (4, 4096, dict(causal=True)),
           "causal1k": (4, 1024, dict(causal=True))}
    return [(name, *out[name]) for name in names]


def syncs(fn) -> list[str]:
    """The attnopt frames of each host synchronization ``fn()`` makes (at most 5)."""
    found = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            return found
        except RuntimeError as exc:
            if "synchroniz" not in str(exc):
                raise
            frames = [f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_tb(exc.__traceback__) if "attnopt" in f.filename or "/kernels/" in
                      f.filename or "/passes/" in f.filename]
            found.append(" <- ".join(reversed(frames[-4:])))
            return found  # the first is enough to act on; fixing it shows the next
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def split(fn) -> None:
    """Host microseconds of each kernel launch, of the backward alone, and of the rest of the call, over 50 calls:
    every ``launch`` of the Triton modules timed where it is called."""
    from attnopt.kernels import triton_flash, triton_flash_bwd_exp, triton_flash_tma

    spent: dict = {}
    modules = (triton_flash, triton_flash_bwd_exp, triton_flash_tma)
    originals = [m._launch for m in modules]

    def timed(kernel, *a, **kw):
        start = time.perf_counter()
        originals[0](kernel, *a, **kw)
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
        spent.setdefault(name, []).append(time.perf_counter() - start)
    for m in modules:
        m._launch = timed
    try:
        total = idle_host_us(fn, 50)
    finally:
        for m, original in zip(modules, originals):
            m._launch = original
    launches = sum(statistics.median(t) for t in spent.values()) * 1e6
    print(f"  per call: {total:.0f} us; launches "
          + ", ".join(f"{name} {statistics.median(t) * 1e6:.0f} us x{len(t) // 50}" for name, t in spent.items())
          + f"; outside the launches {total - launches:.0f} us", flush=True)


class _Identity(torch.autograd.Function):
    """The autograd engine's own cost: a Function whose backward hands the gradient on."""

    @staticmethod
    def forward(ctx, q):
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        return grad


def floors(calls: int = 50) -> None:
    """Host microseconds per forward + backward call (GPU idle before each) of causal 4k (B 4, 16 heads, D 128):
    the autograd engine alone, SDPA cuDNN, compiled Flex, attnopt through ``attnopt.attention``, with Triton's own
    launch, and the backward's parts (``run_backward`` called directly, each launch timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    from attnopt.kernels import launch, triton_flash_bwd_exp
    from kernels import causal_mod, flex

    q, k, v = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    seed = torch.randn_like(q)
    bm = create_block_mask(causal_mod, None, None, 4096, 4096)

    def per_call(fn) -> float:
        for _ in range(3):
            fn()
        return idle_host_us(fn, calls)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(seed)
    rows = {"engine alone (identity Function)": lambda: _Identity.apply(q).backward(seed),
            "SDPA cuDNN": cudnn,
            "Flex (compiled)": lambda: flex()(q, k, v, block_mask=bm).backward(seed),
            "attnopt.attention triton_flash": lambda: attnopt.attention(q, k, v, kernel="triton_flash",
                                                                        causal=True).backward(seed)}
    for label, fn in rows.items():
        print(f"  {label}: {per_call(fn):.0f} us", flush=True)
    launch.BOUND = False
    print(f"  attnopt.attention triton_flash, Triton's own launch: {per_call(rows[label]):.0f} us", flush=True)
    launch.BOUND = True
    with torch.no_grad():
        out = attnopt.attention(q, k, v, kernel="triton_flash", causal=True)
    from attnopt.kernels.spec import AttentionSpec
    spec = AttentionSpec.from_tensors(q, k, v, causal=True)
    lse = torch.randn(4, 16, 4096, device="cuda")
    variant = triton_flash_bwd_exp.measured_variant(spec)
    direct = per_call(lambda: triton_flash_bwd_exp.run_backward(seed, q, k, v, out, lse, spec, variant))
    print(f"  run_backward called directly: {direct:.0f} us", flush=True)
    split(lambda: triton_flash_bwd_exp.run_backward(seed, q, k, v, out, lse, spec, variant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--floors", action="store_true",
                        help="the host time of one forward + backward of the peers, the engine alone, and the backward's parts")
    parser.add_argument("--detail", action="store_true",
                        help="also the callees of launch, the callers of JITFunction.cache_key, and each launch timed")
    parser.add_argument("--cases", nargs="+", default=["documents64", "window8k", "causal4k", "causal1k"])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    launch_floor()
    if args.floors:
        floors()
    for name, b, n, terms in cases(args.cases):
        for bwd in (False, True):
            q, k, v = (torch.randn(b, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
                       for _ in range(3))
            seed = torch.randn_like(q)

            def fn(q=q, k=k, v=v, seed=seed, bwd=bwd, terms=terms):
                out = attnopt.attention(q, k, v, kernel="triton_flash", **terms)
                if bwd:
                    out.backward(seed)
            for _ in range(3):  # compile, measure variants, warm the caches
                fn()
            host = idle_host_us(fn, 10) / 1e3
            gpu = triton.testing.do_bench(fn, warmup=25, rep=200)
            label = f"{name} {'fwd+bwd' if bwd else 'fwd'}"
            print(f"\n## {label}: host {host:.3f} ms per call (GPU idle before it), "
                  f"do_bench {gpu:.3f} ms, back-to-back host {host_us(fn, 20) / 1e3:.3f} ms", flush=True)
            for where in syncs(fn):
                print(f"  host sync: {where}", flush=True)
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            for _ in range(20):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
            body = text.getvalue()
            print(body[body.find("ncalls"):], flush=True)
            if args.detail:
                text = io.StringIO()
                stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
                stats.print_callees(r"launch.py.*\(launch\)")
                stats.print_callers(r"cache_key")
                stats.print_stats(args.top * 2)
                print(text.getvalue(), flush=True)
                split(fn)


if __name__ == "__main__":
    main()
