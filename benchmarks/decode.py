"""Decode bandwidth: triton_decode against SDPA's backends and a device-to-device copy.

One query token over a KV cache of Nk keys, B=8, 32 query heads / 8 kv heads,
D=128, bf16. Decode reads K and V once, so the figure of merit is bytes of K/V
read per second; the ceiling is a plain copy of the same number of bytes
(counted as bytes read + written). SDPA runs twice per backend: on K/V repeated
to 32 heads (what a model without ``enable_gqa`` does; it then reads 4x the
bytes, and the ``KV TB/s`` column still counts the unrepeated K/V a decode
needs) and with ``enable_gqa=True``. Each call is timed eagerly (host launch
overhead included) and as CUDA-graph replays (device time, as a serving loop
runs decode).

    python benchmarks/decode.py            # markdown tables on stdout
    python benchmarks/decode.py --sweep    # also time tile / split configurations at Nk=32k
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnopt.kernels.triton_decode as td
from attnopt.kernels.spec import AttentionSpec

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, Q_LEN = 8, 32, 8, 128, 1
KV_LENS = (4096, 32768, 131072)
DTYPE = torch.bfloat16
SDPA_BACKENDS = {
    "SDPA flash": SDPBackend.FLASH_ATTENTION,
    "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
    "SDPA mem-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn) -> float | None:
    """Median of CUDA-graph replays: device time without the host's launch overhead (as served)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except RuntimeError:
        return None


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host time to enqueue one call, on a cache so short that the device keeps up."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def make_inputs(kv_len: int):
    q = torch.randn(BATCH, Q_HEADS, Q_LEN, HEAD_DIM, device="cuda", dtype=DTYPE)  # [B, Hq, 1, D]
    k = torch.randn(BATCH, KV_HEADS, kv_len, HEAD_DIM, device="cuda", dtype=DTYPE)  # [B, Hkv, Nk, D]
    v = torch.randn(BATCH, KV_HEADS, kv_len, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k, v


def repeat_kv(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)  # [B, Hq, Nk, D]


def check_against_sdpa_math(kv_len: int) -> float:
    q, k, v = make_inputs(kv_len)
    spec = AttentionSpec.from_tensors(q, k, v)
    out, _ = td.decode_attention(q, k, v, spec)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), repeat_kv(k).float(), repeat_kv(v).float())
    return float((out.float() - ref).norm() / ref.norm())


def sdpa_runner(backend, q, k, v, gqa: bool):
    k_in, v_in = (k, v) if gqa else (repeat_kv(k), repeat_kv(v))
    extra = dict(enable_gqa=True) if gqa else {}

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k_in, v_in, **extra)

    run()  # raises here when the backend refuses the inputs
    return run


def rows_for(kv_len: int):
    """``(copy TB/s, [(name, ms or None, bytes it reads)], K+V bytes, config)`` for one cache length."""
    q, k, v = make_inputs(kv_len)
    kv_bytes = k.numel() * k.element_size() * 2
    src = torch.randn(kv_bytes // 2, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(functools.partial(dst.copy_, src))
    del src, dst  # free the copy buffers before the kernels run
    spec = AttentionSpec.from_tensors(q, k, v)
    ours = lambda: td.decode_attention(q, k, v, spec)  # noqa: E731
    rows = [("triton_decode", bench_ms(ours), graph_ms(ours), kv_bytes)]
    for (name, backend), gqa in itertools.product(SDPA_BACKENDS.items(), (False, True)):
        label = f"{name} ({'enable_gqa' if gqa else 'repeated K/V'})"
        try:
            run = sdpa_runner(backend, q, k, v, gqa)
        except RuntimeError:
            rows.append((label, None, None, 0))
            continue
        rows.append((label, bench_ms(run), graph_ms(run), kv_bytes if gqa else kv_bytes * Q_HEADS // KV_HEADS))
        del run
        torch.cuda.empty_cache()
    return 2 * kv_bytes / (copy_ms * 1e-3) / 1e12, rows, kv_bytes, td.choose_config(spec)


def print_table(kv_len: int) -> None:
    copy_tbs, rows, kv_bytes, config = rows_for(kv_len)
    sdpa = [r for r in rows if r[0].startswith("SDPA") and r[1] is not None]
    best_eager = min(r[1] for r in sdpa)
    best_graph = min((r[2] for r in sdpa if r[2] is not None), default=None)
    print(f"\n### Nk = {kv_len} (K+V = {kv_bytes / 2**20:.0f} MiB; copy {copy_tbs:.2f} TB/s; "
          f"triton_decode splits={config.num_splits}, BLOCK_N={config.block_n})\n")
    print("| kernel | bytes read (MiB) | eager (us) | KV TB/s | vs copy | vs best SDPA "
          "| graph replay (us) | KV TB/s | vs copy | vs best SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, eager, graph, read in rows:
        if eager is None:
            print(f"| {name} | refused | | | | | | | | |")
            continue
        cells = [f"{read / 2**20:.0f}"]
        for ms, best in ((eager, best_eager), (graph, best_graph)):
            if ms is None:
                cells += ["n/a"] * 4
                continue
            kv_tbs = kv_bytes / (ms * 1e-3) / 1e12
            vs_best = f"{best / ms:.2f}" if best is not None else ""
            cells += [f"{ms * 1e3:.1f}", f"{kv_tbs:.2f}", f"{kv_tbs / copy_tbs:.2f}", vs_best]
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_host_overhead(kv_len: int = 64) -> None:
    """Enqueue cost per call at a tiny cache, where the host, not the device, sets the pace."""
    q, k, v = make_inputs(kv_len)
    spec = AttentionSpec.from_tensors(q, k, v)
    config = td.choose_config(spec)
    parts = {
        "triton_decode (choose_config + 1 launch)": lambda: td.decode_attention(q, k, v, spec),
        "triton_decode, 2 splits (+ merge launch)": lambda: td.decode_attention(
            q, k, v, spec, td.DecodeConfig(config.block_m, config.block_n, 2)),
        "choose_config alone": lambda: td.choose_config(spec),
        "torch.empty": lambda: torch.empty(16, device="cuda"),
    }
    for name in ("SDPA cuDNN", "SDPA flash"):
        parts[f"{name} (enable_gqa)"] = lambda b=SDPA_BACKENDS[name]: sdpa_runner(b, q, k, v, True)()
    print(f"\n### Host time per call, Nk = {kv_len} (us)\n")
    print("| call | us |")
    print("|---|---|")
    for name, fn in parts.items():
        try:
            print(f"| {name} | {host_us_per_call(fn):.1f} |")
        except RuntimeError:
            print(f"| {name} | refused |")


def sweep(kv_len: int = 32768) -> None:
    q, k, v = make_inputs(kv_len)
    spec = AttentionSpec.from_tensors(q, k, v)
    kv_bytes = k.numel() * k.element_size() * 2
    default = td.choose_config(spec)
    results = []
    for block_n, warps, stages, splits in itertools.product((32, 64, 128), (4, 8), (2, 3, 4),
                                                            (default.num_splits, 8, 16, 33)):
        config = td.DecodeConfig(block_m=default.block_m, block_n=block_n, num_splits=splits,
                                 num_warps=warps, num_stages=stages)
        try:
            ms = bench_ms(lambda: td.decode_attention(q, k, v, spec, config))
        except Exception as exc:  # out of shared memory and similar: skip the configuration
            print(f"skip {config}: {type(exc).__name__}")
            continue
        results.append((ms, config))
    results.sort(key=lambda r: r[0])
    print(f"\n### sweep at Nk = {kv_len} (default {default})\n")
    print("| BLOCK_N | warps | stages | splits | time (us) | KV TB/s |")
    print("|---|---|---|---|---|---|")
    for ms, c in results[:12]:
        print(f"| {c.block_n} | {c.num_warps} | {c.num_stages} | {c.num_splits} | {ms * 1e3:.1f} "
              f"| {kv_bytes / (ms * 1e-3) / 1e12:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time tile / split configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# Decode: B={BATCH}, {Q_HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, Nq={Q_LEN}, bf16\n")
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}; "
          "triton.testing.do_bench medians, random inputs.\n")
    print(f"Correctness: triton_decode vs SDPA math (fp32), Nk=4096: relative error "
          f"{check_against_sdpa_math(4096):.2e}")
    if args.sweep:
        sweep()
    for kv_len in KV_LENS:
        print_table(kv_len)
    print_host_overhead()


if __name__ == "__main__":
    main()
