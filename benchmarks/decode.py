"""Decode bandwidth: triton_decode against SDPA's backends and a device-to-device copy.

One query token over a KV cache of Nk keys, B=8, 32 query heads / 8 kv heads,
D=128, bf16. Decode reads K and V once, so the figure of merit is bytes of K/V
read per second; the ceiling is a plain copy of the same number of bytes
(counted as bytes read + written). SDPA runs twice per backend: on K/V repeated
to 32 heads (what a model without ``enable_gqa`` does; it then reads 4x the
bytes, and the ``KV TB/s`` column still counts the unrepeated K/V a decode
needs) and with ``enable_gqa=True``.

    python benchmarks/decode.py            # markdown tables on stdout
    python benchmarks/decode.py --sweep    # also time tile / split configurations at Nk=32k
"""

from __future__ import annotations

import argparse
import itertools

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
    copy_ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    spec = AttentionSpec.from_tensors(q, k, v)
    rows = [("triton_decode", bench_ms(lambda: td.decode_attention(q, k, v, spec)), kv_bytes)]
    for (name, backend), gqa in itertools.product(SDPA_BACKENDS.items(), (False, True)):
        label = f"{name} ({'enable_gqa' if gqa else 'repeated K/V'})"
        try:
            ms = bench_ms(sdpa_runner(backend, q, k, v, gqa))
        except RuntimeError:
            ms = None
        rows.append((label, ms, kv_bytes if gqa else kv_bytes * Q_HEADS // KV_HEADS))
        torch.cuda.empty_cache()
    return 2 * kv_bytes / (copy_ms * 1e-3) / 1e12, rows, kv_bytes, td.choose_config(spec)


def print_table(kv_len: int) -> None:
    copy_tbs, rows, kv_bytes, config = rows_for(kv_len)
    sdpa_best = min(ms for name, ms, _ in rows if name.startswith("SDPA") and ms is not None)
    print(f"\n### Nk = {kv_len} (K+V = {kv_bytes / 2**20:.0f} MiB; copy {copy_tbs:.2f} TB/s; "
          f"triton_decode splits={config.num_splits}, BLOCK_N={config.block_n})\n")
    print("| kernel | time (us) | bytes read (MiB) | KV TB/s | vs copy | speed vs best SDPA |")
    print("|---|---|---|---|---|---|")
    for name, ms, read in rows:
        if ms is None:
            print(f"| {name} | refused | | | | |")
            continue
        kv_tbs = kv_bytes / (ms * 1e-3) / 1e12
        print(f"| {name} | {ms * 1e3:.1f} | {read / 2**20:.0f} | {kv_tbs:.2f} | {kv_tbs / copy_tbs:.2f} "
              f"| {sdpa_best / ms:.2f} |")


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


if __name__ == "__main__":
    main()
