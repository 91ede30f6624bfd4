"""Host time per attention call: what attnopt adds over launching the chosen kernel directly.

Each site of an optimized model (``compiler="eager"``) calls ``attnopt.ops.run_attention``: an
inference call goes straight to the kernel chosen at rewrite time, a training call through the
``attnopt::attention`` custom op (its autograd wrapper and dispatch). On shapes so small that the
device keeps up with the host, the time per call is host time. Columns, per kernel:

* ``direct``: the kernel itself: ``F.scaled_dot_product_attention`` with the backend already
  selected (SDPA kernels), ``kernel.forward`` with a prebuilt spec (Triton and CPU kernels);
* ``site``: ``run_attention`` under ``torch.no_grad()``, what an optimized model runs in inference;
* ``op``: ``torch.ops.attnopt.attention``, what a training step or a compiled graph runs;
* ``site - direct``: the host work attnopt adds per inference call (target: at most 15 us).

    python benchmarks/dispatch.py                   # CUDA when available, else CPU
    python benchmarks/dispatch.py --out benchmarks/results/dispatch.md
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import registry
from attnopt.ops import run_attention, spec_from_args

SDPA_BACKENDS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
KERNELS = {"cuda": ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "triton_flash", "triton_decode", "flex"),
           "cpu": ("sdpa_cpu", "reference")}
#: (name, q/kv heads, query length, key length, causal, align): a prefill tile and a decode step
CASES = (("prefill causal", (4, 4), 64, 64, True, "top_left"),
         ("decode GQA", (8, 2), 1, 256, True, "bottom_right"))


def per_call_us(fn, device: torch.device, calls: int = 1000, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` back-to-back calls."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[len(times) // 2]


def _direct(name: str, q, k, v, spec, args):
    backend = SDPA_BACKENDS.get(name)
    if backend is None:
        kernel = registry.get(name)
        return lambda: kernel.forward(q, k, v, spec, 0)
    causal = args[9] and args[10] == "top_left" and not spec.band_hides_nothing()

    def call():  # the backend selection stays outside the timed call, as in a model that sets it once
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=args[8], enable_gqa=True)
    return call, backend


def rows(device: torch.device, dtype: torch.dtype) -> list[tuple]:
    table = []
    for case, (hq, hkv), nq, nk, causal, align in CASES:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, hq, nq, 64, generator=g).to(device, dtype)
        k, v = (torch.randn(1, hkv, nk, 64, generator=g).to(device, dtype) for _ in range(2))
        args = (q, k, v, None, None, None, None, None, 0.125, causal, align, None, None, None, 0.0, "-inf")
        spec = spec_from_args(*args)
        for name in KERNELS[device.type]:
            kernel = registry.get(name)
            if kernel.not_supported_reasons(spec):
                continue
            direct = _direct(name, q, k, v, spec, args)
            if isinstance(direct, tuple):
                if not causal or align == "top_left" or spec.band_hides_nothing():
                    with sdpa_kernel([direct[1]]):
                        direct_us = per_call_us(direct[0], device)
                else:  # SDPA's is_causal is top-left: no direct call computes this spec
                    direct_us = float("nan")
            else:
                direct_us = per_call_us(direct, device)
            with torch.no_grad():
                site_us = per_call_us(lambda: run_attention(*args, name), device)
                op_us = per_call_us(lambda: torch.ops.attnopt.attention.default(*args, name), device)
            table.append((case, name, direct_us, site_us, op_us, site_us - direct_us))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{name}, torch {torch.__version__}, {dtype}; host microseconds per call, medians of 5 x 1000 calls",
             "", "| case | kernel | direct | site (inference) | op (training / compiled) | site - direct |",
             "|---|---|---|---|---|---|"]
    for case, kernel, direct, site, op, extra in rows(device, dtype):
        lines.append(f"| {case} | {kernel} | {direct:.1f} | {site:.1f} | {op:.1f} | {extra:+.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
