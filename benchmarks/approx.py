"""Approximate kernels against exact attention: time, memory and error as N grows.

    python benchmarks/approx.py                       # CPU, N = 1k..16k (32k with --max-length 32768)
    python benchmarks/approx.py --device cuda --max-length 32768

One attention call [1, 4 heads, N, 64], float32, non-causal. ``exact`` is
the fastest exact kernel of the device (``sdpa_cpu`` / ``sdpa_flash``). Each
approximate kernel runs its default settings. Time: median of ``--repeats``
runs after a warm-up. Memory: the kernel's workspace estimate (``memory_bytes``),
and on CUDA the measured peak above the inputs. Error: relative L2 error
against the exact output on two inputs, ``local`` (q = k from a sequence whose
neighbours are alike: attention concentrated near the diagonal, where windows
are accurate) and ``diffuse`` (random q, k at a small scale: attention spread
over all keys, where random features are accurate).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from attnopt.kernels import AttentionSpec, get

KERNELS = ("approx_local_global", "approx_bigbird", "approx_performer")
HEADS, DIM = 4, 64


def inputs(n: int, kind: str, device: str):
    g = torch.Generator().manual_seed(n)
    if kind == "local":
        h = torch.randn(1, HEADS, n + 8, DIM, generator=g)
        h = F.avg_pool1d(h.reshape(HEADS, n + 8, DIM).transpose(1, 2), 9, stride=1).transpose(1, 2)
        q = k = (h * 6.0).reshape(1, HEADS, n, DIM)
    else:
        q, k = (torch.randn(1, HEADS, n, DIM, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(1, HEADS, n, DIM, generator=g)
    return [t.to(device).contiguous() for t in (q, k, v)]


def timed(kernel, q, k, v, spec, repeats: int) -> tuple[float, torch.Tensor, int | None]:
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    out, _ = kernel.forward(q, k, v, spec, 0)
    peak = None
    if q.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out, _ = kernel.forward(q, k, v, spec, 0)
        sync()
        times.append(time.perf_counter() - start)
    if q.is_cuda:
        peak = torch.cuda.max_memory_allocated() - base
    return sorted(times)[len(times) // 2], out, peak


def error(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    exact = get("sdpa_cpu" if args.device == "cpu" else "sdpa_flash")
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= args.max_length]
    print(f"device {args.device}, {torch.get_num_threads()} threads; [1, {HEADS}, N, {DIM}] float32; exact = {exact.name}")
    print()
    print("| N | kernel | time ms | x exact | workspace MiB (est.) | peak MiB | error local | error diffuse |")
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        q, k, v = inputs(n, "local", args.device)
        spec = AttentionSpec.from_tensors(q, k, v)
        repeats = args.repeats if n <= 8192 else 1
        t_exact, want_local, peak = timed(exact, q, k, v, spec, repeats)
        diffuse = inputs(n, "diffuse", args.device)
        want_diffuse = exact.forward(*diffuse, spec, 0)[0]
        rows = [(exact.name, t_exact, exact.memory_bytes(spec), peak, 0.0, 0.0)]
        for name in KERNELS:
            kernel = get(name)
            seconds, out, peak = timed(kernel, q, k, v, spec, repeats)
            rows.append((f"{name} ({kernel.describe()})", seconds, kernel.memory_bytes(spec), peak,
                         error(out, want_local), error(kernel.forward(*diffuse, spec, 0)[0], want_diffuse)))
        for name, seconds, workspace, peak, e_local, e_diffuse in rows:
            peak_text = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(f"| {n} | {name} | {seconds * 1e3:.1f} | {t_exact / seconds:.2f} | {workspace / 2**20:.1f} | "
                  f"{peak_text} | {e_local:.3f} | {e_diffuse:.3f} |", flush=True)


if __name__ == "__main__":
    main()
