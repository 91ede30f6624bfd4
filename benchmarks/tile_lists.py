"""The band kernels' tile-list walk with the full-tile run on and off, against the general kernels and Flex, in
one process with the variants interleaved.

    python benchmarks/tile_lists.py --out benchmarks/results/tile_lists.md

For each structured-mask case of ``benchmarks/kernels.py --masks`` (packed documents, key padding, window +
documents, a window handed over as a dense boolean mask; bf16, D 128, 16 heads, causal) the same
``attnopt.attention(..., kernel="triton_flash")`` call is timed four ways: the band kernels' measured variant
with the full-tile run on (``full_run=True``), the same with it off, the general kernels (``triton_flash_fwd``,
``triton_flash_bwd``), and compiled FlexAttention with its hand-written ``mask_mod``. Forward, and forward +
backward. Every way is first checked against Flex (output, and dq/dk/dv). The ways are timed in ``--rounds``
interleaved rounds (``do_bench`` medians each, the median of the rounds reported), so a machine that slows
down during the run slows them all. "host us": one call's host time with the GPU idle before it (median of 5);
a call whose host time reaches its GPU time is bound by the host, not by its kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys

import torch
import triton

import attnopt
from attnopt.kernels import triton_flash

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from host_cost import idle_host_us  # noqa: E402
from kernels import check, flex, mask_cases, timed  # noqa: E402

WAYS = ("run on", "run off", "general", "flex")


@contextlib.contextmanager
def way(name: str):
    """While entered, ``triton_flash`` runs the band kernels' measured variants with the full-tile run as ``name``
    says, or its general kernels (``"general"``)."""
    fwd, bwd = triton_flash.band_fwd, triton_flash.band_bwd
    saved = fwd.measured_variant, bwd.measured_variant

    def forced(measured, run):
        def pick(spec):
            variant = measured(spec)
            return None if variant is None or run is None else dataclasses.replace(variant, full_run=run)
        return pick

    run = {"run on": True, "run off": False}.get(name)
    if name != "flex":
        fwd.measured_variant, bwd.measured_variant = forced(saved[0], run), forced(saved[1], run)
    try:
        yield
    finally:
        fwd.measured_variant, bwd.measured_variant = saved


def main(argv=None) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="kernels.py's quick cases (8k window, 4 and 64 documents)")
    args = parser.parse_args(argv)
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16, D 128, "
             f"16 heads, causal; ms, the median of {args.rounds} interleaved rounds of `do_bench` medians; 'vs Flex' "
             "= Flex's time / the way's (above 1: faster than Flex)", "",
             "| case | pass | run on | run off | general | Flex | run on vs Flex | run off vs Flex | general vs Flex "
             "| host us (run on) | fastest |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = []
    for name, b, n, terms, mod, dense in mask_cases(args.quick):
        if dense is not None:  # the window as the dense boolean mask a model hands over (the band itself has no lists)
            name, terms = f"{name} as a dense bool mask", {"attn_mask": dense}
        cases.append((name, b, n, terms, mod))
    for name, b, n, terms, mod in cases:
        bm = create_block_mask(mod, b, None, n, n)
        for mode in ("fwd", "fwd+bwd"):
            bwd = mode == "fwd+bwd"
            q, k, v = (torch.randn(b, 16, n, 128, device="cuda", dtype=torch.bfloat16).requires_grad_(bwd)
                       for _ in range(3))
            ours = lambda: attnopt.attention(q, k, v, kernel="triton_flash", **terms)  # noqa: E731
            calls = dict.fromkeys(WAYS[:3], ours)
            calls["flex"] = lambda: flex()(q, k, v, block_mask=bm)
            ref = calls["flex"]()
            grad = torch.randn_like(ref)
            ref_grads = torch.autograd.grad(ref, (q, k, v), grad) if bwd else ()
            for w in WAYS[:3]:
                with way(w):
                    out = ours()
                    check(f"{name} {mode} {w}", out, ref)
                    for label, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), grad) if bwd else (), ref_grads):
                        check(f"{name} {mode} {w} d{label}", a / r.abs().max(), r / r.abs().max())
            del out, ref, ref_grads
            ms = {w: [] for w in WAYS}
            for _ in range(args.rounds):
                for w in WAYS:
                    with way(w):
                        ms[w].append(timed(calls[w], bwd, (q, k, v)))
            med = {w: statistics.median(t) for w, t in ms.items()}
            with way("run on"), torch.no_grad() if not bwd else contextlib.nullcontext():
                seed = torch.randn_like(ours().detach())
                host = idle_host_us((lambda: ours().backward(seed)) if bwd else ours, 5)
            fastest = min(WAYS[:3], key=med.get)
            row = (f"| {name} | {mode} | " + " | ".join(f"{med[w]:.3f}" for w in WAYS) + " | "
                   + " | ".join(f"{med['flex'] / med[w]:.2f}" for w in WAYS[:3]) + f" | {host:.0f} | {fastest} |")
            print(row, "  rounds:", {w: [round(t, 3) for t in ts] for w, ts in ms.items()}, flush=True)
            lines.append(row)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
            del calls
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
