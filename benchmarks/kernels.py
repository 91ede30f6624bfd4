"""TFLOP/s of attnopt's ``triton_flash`` against SDPA (cuDNN, flash, mem-efficient) and compiled FlexAttention.

Run on a GPU: ``python benchmarks/kernels.py [--out results.md] [--quick]``. Every case first
checks attnopt's output against a peer computed in the same run, then times each
provider with ``triton.testing.do_bench`` (median) on random bf16 inputs. FLOPs are
``4 B H Nq Nk D``, halved when causal, x3.5 for fwd+bwd (FlashAttention's convention);
structured cases report milliseconds. Ratios are against peers measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnopt
import attnopt.kernels.triton_flash  # noqa: F401  (registers the kernel)

DTYPE = torch.bfloat16
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION,
                 "mem_eff": SDPBackend.EFFICIENT_ATTENTION}
#: (D, N, causal, pass) rows of shared/ANCHORS.md
DENSE_CASES_128 = [
    (128, 1024, False, "fwd"), (128, 4096, False, "fwd"), (128, 8192, False, "fwd"), (128, 16384, False, "fwd"),
    (128, 1024, True, "fwd"), (128, 4096, True, "fwd"), (128, 16384, True, "fwd"),
    (128, 4096, False, "fwd+bwd"), (128, 4096, True, "fwd+bwd"), (128, 16384, True, "fwd+bwd"),
]
DENSE_CASES_64 = [
    (64, 1024, False, "fwd"), (64, 4096, False, "fwd"), (64, 16384, False, "fwd"), (64, 4096, True, "fwd"),
    (64, 16384, True, "fwd"), (64, 4096, False, "fwd+bwd"), (64, 4096, True, "fwd+bwd"),
]
QUICK_CASES = [(128, 4096, True, "fwd+bwd"), (64, 4096, True, "fwd"), (64, 4096, True, "fwd+bwd")]

_flex = None
_out_path = None


def save(lines):
    """Write the tables so far: a run cut short by its time limit still leaves them."""
    if _out_path:
        with open(_out_path, "w") as f:
            f.write("\n".join(lines) + "\n")


def flex():
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled kernel per shape and mask: more than dynamo's default 8 recompiles
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def randn(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_(grad)


def timed(fn, backward: bool, inputs) -> float:
    """Median milliseconds of fn() (and of its backward through a fixed random dO)."""
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    out = fn()
    grad = torch.randn_like(out)

    def step():
        fn().backward(grad)

    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")


def check(name, ours, ref, tol=3e-2):
    err = (ours.float() - ref.float()).abs().max().item()
    ok = err <= tol
    print(f"  check {name}: max abs err {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        raise SystemExit(f"{name}: triton_flash disagrees with the peer ({err:.2e} > {tol})")


def sdpa(backend, q, k, v, **kw):
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def providers_dense(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask

    n = q.shape[2]
    block_mask = create_block_mask(causal_mod, None, None, n, n) if causal else None
    out = {"triton_flash": lambda: attnopt.attention(q, k, v, causal=causal, kernel="triton_flash")}
    for name in SDPA_BACKENDS:
        out[name] = lambda name=name: sdpa(name, q, k, v, is_causal=causal)
    out["flex"] = lambda: flex()(q, k, v, block_mask=block_mask)
    if q.requires_grad:
        out["atomic"] = lambda: atomic_dq(lambda: attnopt.attention(q, k, v, causal=causal, kernel="triton_flash"))
    return out


def atomic_dq(fn):
    """triton_flash with dQ accumulated by float32 atomics in the dK/dV kernel (an option; the default is the
    dQ kernel, no atomics)."""
    from attnopt.kernels import get

    kernel = get("triton_flash")
    kernel.atomic_dq = True
    try:
        return fn()
    finally:
        kernel.atomic_dq = False


def run_dense(cases, lines):
    lines.append("")
    lines.append("| D | N | causal | pass | triton_flash | cuDNN | FA2 | mem-eff | Flex | vs cuDNN | vs Flex "
                 "| triton_flash atomic dQ |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d, n, causal, mode in cases:
        h, b = 2048 // d, 16384 // n
        bwd = mode == "fwd+bwd"
        q, k, v = (randn(b, h, n, d, grad=bwd) for _ in range(3))
        provs = providers_dense(q, k, v, causal)
        with torch.no_grad():
            check(f"D={d} N={n} causal={causal}", provs["triton_flash"](), provs["fa2"]())
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0) * (3.5 if bwd else 1.0)
        rate = {}
        for name, fn in provs.items():
            try:
                rate[name] = flops / timed(fn, bwd, (q, k, v)) / 1e9
            except Exception as exc:  # a peer may refuse a shape; say so and go on
                print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                rate[name] = float("nan")
        row = (f"| {d} | {n} | {'yes' if causal else 'no'} | {mode} | "
               + " | ".join(f"{rate[p]:.0f}" for p in ("triton_flash", "cudnn", "fa2", "mem_eff", "flex"))
               + f" | {rate['triton_flash'] / rate['cudnn']:.2f} | {rate['triton_flash'] / rate['flex']:.2f} | "
               + (f"{rate['atomic']:.0f} ({rate['atomic'] / rate['cudnn']:.2f}x cuDNN) |" if "atomic" in rate else "- |"))
        print(row, flush=True)
        lines.append(row)
        save(lines)


def run_structured(lines):
    """Sliding window as a dense bool mask, documents, GQA: milliseconds (fwd)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lines += ["", "| case | attnopt (ms) | peer | peer (ms) | speed-up |", "|---|---|---|---|---|"]

    def report(case, ours_ms, peers):
        for peer, ms in peers.items():
            row = f"| {case} | {ours_ms:.3f} | {peer} | {ms:.3f} | {ms / ours_ms:.2f}x |"
            print(row, flush=True)
            lines.append(row)
        save(lines)

    # sliding window 1024 (causal), N=8192, D=128, B=2, H=16, handed over as a dense bool mask
    b, h, n, d, w = 2, 16, 8192, 128, 1024
    q, k, v = (randn(b, h, n, d) for _ in range(3))
    i = torch.arange(n, device="cuda")
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)  # [N, N]

    def window_mod(b_, h_, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    bm = create_block_mask(window_mod, None, None, n, n)
    with torch.no_grad():
        ours = lambda: attnopt.attention(q, k, v, attn_mask=mask, kernel="triton_flash")  # noqa: E731
        check("sliding window (dense bool)", ours(), flex()(q, k, v, block_mask=bm))
        band = lambda: attnopt.attention(q, k, v, causal=True, window=(w - 1, 0), kernel="triton_flash")  # noqa
        check("sliding window (band)", band(), flex()(q, k, v, block_mask=bm))
        peers = {"cuDNN bool mask": timed(lambda: sdpa("cudnn", q, k, v, attn_mask=mask), False, ()),
                 "Flex mask_mod": timed(lambda: flex()(q, k, v, block_mask=bm), False, ())}
        report("window 1024 causal N=8k, dense bool mask", timed(ours, False, ()), peers)
        report("window 1024 causal N=8k, as window term", timed(band, False, ()), peers)

    # documents: B=4, H=16, N=4096, D=128, random document lengths
    b, h, n = 4, 16, 4096
    q, k, v = (randn(b, h, n, d) for _ in range(3))
    doc = torch.sort(torch.randint(0, 12, (b, n), device="cuda"), dim=1).values  # [B, N]

    def doc_mod(b_, h_, q_idx, kv_idx):
        return doc[b_, q_idx] == doc[b_, kv_idx]

    bm = create_block_mask(doc_mod, b, None, n, n)
    dense = (doc[:, :, None] == doc[:, None, :])[:, None]  # [B, 1, N, N]
    with torch.no_grad():
        ours = lambda: attnopt.attention(q, k, v, document_ids=doc, kernel="triton_flash")  # noqa: E731
        check("documents", ours(), flex()(q, k, v, block_mask=bm))
        peers = {"cuDNN bool mask": timed(lambda: sdpa("cudnn", q, k, v, attn_mask=dense), False, ()),
                 "Flex mask_mod": timed(lambda: flex()(q, k, v, block_mask=bm), False, ())}
        report("documents N=4k B=4 (12 docs/seq)", timed(ours, False, ()), peers)

    # GQA 32/8 causal N=4096 D=128 B=4
    b, hq, hkv, n = 4, 32, 8, 4096
    q, k, v = randn(b, hq, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    with torch.no_grad():
        ours = lambda: attnopt.attention(q, k, v, causal=True, kernel="triton_flash")  # noqa: E731
        check("GQA 32/8", ours(), sdpa("fa2", q, k, v, is_causal=True, enable_gqa=True))
        peers = {}
        for name in ("cudnn", "fa2"):
            try:
                peers[f"SDPA {name} enable_gqa"] = timed(
                    lambda name=name: sdpa(name, q, k, v, is_causal=True, enable_gqa=True), False, ())
            except Exception as exc:
                print(f"  {name} enable_gqa failed: {str(exc)[:120]}", flush=True)
        report("GQA 32/8 causal N=4k B=4", timed(ours, False, ()), peers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--quick", action="store_true", help="three dense cases and the structured ones")
    args = parser.parse_args(argv)
    global _out_path
    _out_path = args.out
    torch.manual_seed(0)
    started = time.time()
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{DTYPE}; TFLOP/s (do_bench medians)", ""]
    run_dense(QUICK_CASES if args.quick else DENSE_CASES_128, lines)
    run_structured(lines)
    if not args.quick:
        run_dense(DENSE_CASES_64, lines)
    lines.append(f"\n(total benchmark time {time.time() - started:.0f} s)")
    save(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
