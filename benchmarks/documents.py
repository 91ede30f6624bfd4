"""Packed-document attention, one layer of the training benchmark: attnopt's ``triton_flash`` against FlexAttention.

    python benchmarks/documents.py [--length 16384] [--documents 4 16 64] [--heads 16 4] [--head-dim 128]
                                   [--out FILE]

The attention of ``benchmarks/train_step.py``'s packed workload (one row of N tokens holding k documents of
random lengths, causal within each document, GQA), forward and forward + backward, bf16, medians of
``triton.testing.do_bench``. Peers in the same run:

* ``flex``: compiled FlexAttention with a ``create_block_mask`` of ``causal & same document`` (built once,
  outside the timing, as a training loop reuses it across layers) and ``enable_gqa``;
* ``sdpa_efficient``: SDPA's memory-efficient backend with the dense boolean document mask, which is what
  an SDPA model is given (the key/value heads repeated: SDPA's fused kernels take no GQA with a mask);
* ``triton_flash (general bwd)``: attnopt's previous backward for these specs (per-element term loads),
  as a check on what the tile-list band backward changed.

attnopt's tile lists are cached per document-id tensor (``kernels/term_cache.py``) as Flex's block mask is
reused, so neither build is in the timings. Every row is first checked against Flex's output and gradients.
Ratios above 1 mean attnopt is faster.

A second table gives the host time of one forward + backward: ``HOST_CALLS`` calls issued back to back and
synchronized once, the wall time divided by the calls. A call whose host time is near its ``do_bench`` time
is bound by the host (its launches, its Python, or a synchronization inside it), not by its kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnopt
from attnopt.kernels import triton_flash
from attnopt.kernels import triton_flash_bwd_exp as bwd

DTYPE = torch.bfloat16


def document_ids(n: int, documents: int, seed: int) -> torch.Tensor:
    """``[1, n]`` ids of ``documents`` contiguous documents of random lengths (train_step.py's layout)."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=generator)[: documents - 1] + 1
    return torch.zeros(n, dtype=torch.int64).index_fill_(0, cuts, 1).cumsum(0)[None].cuda()


def timed(fn, inputs, backward: bool) -> float:
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    grad = torch.randn_like(fn())

    def step():
        fn().backward(grad)

    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")


#: forward + backward calls issued back to back for the host-time table (few enough that the launch queue,
#: about a thousand launches deep, does not fill and make the host wait on the GPU)
HOST_CALLS = 20


def host_ms(fn, inputs, grad) -> float:
    """Wall milliseconds per forward + backward over ``HOST_CALLS`` calls with one synchronization at the end."""
    fn().backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued * 1e3 / HOST_CALLS


def outputs_and_grads(fn, inputs, grad):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad)
    return [out.detach().float()] + [t.grad.float() for t in inputs]


#: tile-list backward variants ``--variants`` times beside the measured one: smaller key tiles (more programs
#: for short documents), one program per query head, and the D = 64 tiles
DOC_VARIANTS = [
    bwd.Variant(block_m1=64, block_n1=64, block_m2=64, block_n2=64, num_warps=4),
    bwd.Variant(block_m1=32, block_n1=64, block_m2=64, block_n2=32, num_warps=4, num_stages=3),
    bwd.Variant(gqa_in_program=False),
    bwd.Variant(block_m1=64, block_n1=64, block_m2=64, block_n2=64, num_warps=4, gqa_in_program=False),
    bwd.Variant(block_m1=64, block_n1=128, block_m2=64, block_n2=128, num_warps=4),
]


@contextlib.contextmanager
def backward_variant(variant):
    """While entered: triton_flash's backward for these specs runs ``variant`` (a ``bwd.Variant``), its general
    backward (``"general"``), or the measured variant (None)."""
    saved = triton_flash.band_bwd.measured_variant
    if variant is not None:
        triton_flash.band_bwd.measured_variant = lambda spec: None if variant == "general" else variant
    try:
        yield
    finally:
        triton_flash.band_bwd.measured_variant = saved


def check(name: str, count: int, got, want) -> None:
    errors = [(g - w).abs().max().item() / max(1.0, w.abs().max().item()) for g, w in zip(got, want)]
    print(f"  check {name}, {count} documents: out/dq/dk/dv max error vs flex "
          f"{', '.join(f'{e:.2e}' for e in errors)}", flush=True)
    if max(errors) > 5e-2:
        raise SystemExit(f"{name} disagrees with flex on {count} documents: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--documents", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--heads", type=int, nargs=2, default=[16, 4], metavar=("Q", "KV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--variants", action="store_true",
                        help="also time forward + backward with the backward variants of DOC_VARIANTS")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's table of one triton_flash forward + backward per count")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    n, (hq, hkv), d = args.length, args.heads, args.head_dim
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; B=1, heads "
             f"{hq}/{hkv}, N={n}, D={d}, {DTYPE}, causal within documents; ms (do_bench medians)", "",
             "| documents | pass | triton_flash | triton_flash (general bwd) | flex | sdpa_efficient (dense mask) "
             "| vs flex | vs sdpa |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    flex_ms, variant_rows, host_rows = {}, [], []  # flex_ms: the last (forward + backward) Flex time per count
    for count in args.documents:
        doc = document_ids(n, count, seed=n * 1000 + count)
        ids = doc[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (ids[q_idx] == ids[kv_idx])

        block_mask = create_block_mask(mask_mod, None, None, n, n)
        dense = ((ids[:, None] == ids[None, :]) & torch.ones(n, n, dtype=torch.bool, device="cuda").tril())
        q = torch.randn(1, hq, n, d, device="cuda", dtype=DTYPE, requires_grad=True)
        k, v = (torch.randn(1, hkv, n, d, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(2))
        inputs = (q, k, v)
        providers = {
            "triton_flash": lambda: attnopt.attention(q, k, v, causal=True, document_ids=doc, kernel="triton_flash"),
            "general": lambda: attnopt.attention(q, k, v, causal=True, document_ids=doc, kernel="triton_flash"),
            "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=hq != hkv),
            "sdpa": lambda: _sdpa(q, k, v, dense, hq // hkv),
        }
        grad = torch.randn(1, hq, n, d, device="cuda", dtype=DTYPE)
        want = outputs_and_grads(providers["flex"], inputs, grad)
        for name in ("triton_flash", "general"):
            with backward_variant("general" if name == "general" else None):
                check(name, count, outputs_and_grads(providers[name], inputs, grad), want)
        if args.profile:
            profile(providers["triton_flash"], grad, count)
        for backward in (False, True):
            ms = {}
            for name, fn in providers.items():
                with backward_variant("general" if name == "general" else None):
                    ms[name] = timed(fn, inputs, backward)
            flex_ms[count] = ms["flex"]
            row = (f"| {count} | {'fwd+bwd' if backward else 'fwd'} | {ms['triton_flash']:.3f} | "
                   f"{ms['general']:.3f} | {ms['flex']:.3f} | {ms['sdpa']:.3f} | "
                   f"{ms['flex'] / ms['triton_flash']:.2f}x | {ms['sdpa'] / ms['triton_flash']:.2f}x |")
            lines.append(row)
            print(row, flush=True)
        hosts = {name: host_ms(providers[name], inputs, grad) for name in ("triton_flash", "flex")}
        host_rows.append(f"| {count} | {hosts['triton_flash']:.3f} | {ms['triton_flash']:.3f} | {hosts['flex']:.3f} "
                         f"| {ms['flex']:.3f} |")
        print(host_rows[-1], flush=True)
        if args.variants:
            for variant in DOC_VARIANTS:
                with backward_variant(variant):
                    check(variant.name, count, outputs_and_grads(providers["triton_flash"], inputs, grad), want)
                    ms = timed(providers["triton_flash"], inputs, True)
                variant_rows.append(f"| {count} | {variant.name} | {ms:.3f} | {flex_ms[count] / ms:.2f}x |")
                print(variant_rows[-1], flush=True)
        torch.cuda.empty_cache()
    lines += ["", f"Host time of one forward + backward ({HOST_CALLS} calls issued, then one synchronization), "
              "beside its do_bench time:", "",
              "| documents | triton_flash host ms | triton_flash ms | flex host ms | flex ms |", "|---|---|---|---|---|",
              *host_rows]
    if variant_rows:
        lines += ["", "Forward + backward with other tile-list backward variants (`--variants`):", "",
                  "| documents | backward variant | ms | vs flex |", "|---|---|---|---|", *variant_rows]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def profile(fn, grad, count: int) -> None:
    """Kernels and host ops of three forward + backward calls: where the time goes besides the kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn().backward(grad)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn().backward(grad)
        torch.cuda.synchronize()
    print(f"profile, {count} documents, 3 calls:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


def _sdpa(q, k, v, dense, group):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=dense)


if __name__ == "__main__":
    main()
