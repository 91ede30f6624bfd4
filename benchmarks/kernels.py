"""TFLOP/s of attnopt's ``triton_flash`` against SDPA (cuDNN, flash, mem-efficient) and compiled FlexAttention.

Run on a GPU: ``python benchmarks/kernels.py [--out results.md] [--quick] [--masks [--budget S]]``
(``--masks``: the structured masks alone, forward and forward + backward, against Flex's ``mask_mod``). Every case first
checks attnopt's output against a peer computed in the same run, then times each
provider with ``triton.testing.do_bench`` (median) on random bf16 inputs. FLOPs are
``4 B H Nq Nk D``, halved when causal, x3.5 for fwd+bwd (FlashAttention's convention);
structured cases report milliseconds. Ratios are against peers measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
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


def packed_ids(n: int, documents: int, gen: torch.Generator) -> torch.Tensor:
    """Document ids ``[1, n]`` of ``documents`` packed sequences of random lengths (every one non-empty)."""
    cuts = torch.randperm(n - 1, generator=gen)[: documents - 1] + 1
    starts = torch.zeros(n, dtype=torch.long)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to("cuda")


def mask_cases(quick: bool):
    """(name, B, N, attnopt keyword arguments, Flex mask_mod, the dense bool mask [B, 1, N, N] or None) of the
    structured-mask targets: sliding window 1024 at 8k and 32k, packed documents (4-64 per 16k row), key padding,
    window + documents. Every case is causal, as the models that make them are."""
    gen = torch.Generator().manual_seed(0)
    w = 1024
    cases = []
    for n in (8192,) if quick else (8192, 32768):
        def window_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)
        i = torch.arange(n, device="cuda")
        dense = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w))[None, None]
        cases.append((f"window {w} @ {n // 1024}k", 16384 // n or 1, n, dict(causal=True, window=(w - 1, 0)),
                      window_mod, dense))
    n = 16384
    for documents in (4, 64) if quick else (4, 16, 64):
        doc = packed_ids(n, documents, gen)

        def doc_mod(b, h, q_idx, kv_idx, doc=doc):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
        cases.append((f"documents {documents} @ 16k", 1, n, dict(causal=True, document_ids=doc), doc_mod, None))
    b, n = 4, 4096
    lengths = torch.randint(n // 2, n + 1, (b,), generator=gen).to("cuda")

    def padding_mod(b_, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (kv_idx < lengths[b_])
    cases.append(("key padding B4 @ 4k", b, n, dict(causal=True, key_padding_mask=lengths), padding_mod, None))
    n, doc = 16384, packed_ids(16384, 16, gen)

    def window_doc_mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < w)
    cases.append((f"window {w} + 16 documents @ 16k", 1, n, dict(causal=True, window=(w - 1, 0), document_ids=doc),
                  window_doc_mod, None))
    return cases


@contextlib.contextmanager
def general_kernels(on: bool = True):
    """While entered (and ``on``): triton_flash runs its general kernels (``triton_flash_fwd``, ``triton_flash_bwd``),
    not the band kernels' measured variants."""
    from attnopt.kernels import triton_flash

    saved = triton_flash.band_fwd.measured_variant, triton_flash.band_bwd.measured_variant
    if on:
        triton_flash.band_fwd.measured_variant = triton_flash.band_bwd.measured_variant = lambda spec: None
    try:
        yield
    finally:
        triton_flash.band_fwd.measured_variant, triton_flash.band_bwd.measured_variant = saved


def run_masks(lines, quick: bool, budget_s: float, started: float, trace: int = 0, only: tuple[str, ...] = ()):
    """The structured masks against Flex with its hand-written mask_mod (and cuDNN on the dense bool mask), forward
    and forward + backward, D 128, 16 heads: milliseconds. attnopt is ``triton_flash`` given the terms; "attnopt,
    dense" is the same kernel handed the dense bool mask a model would build (its tile map is built in the call);
    "general kernels" is the same call on ``triton_flash_fwd``'s and ``triton_flash_bwd``'s kernels. ``trace``: the host
    time of one attnopt call and its ``trace`` costliest GPU kernels and host ops (``torch.profiler``), then Flex's.
    ``only``: the cases whose name contains one of these texts (all when empty)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lines += ["", "Structured masks, D 128, 16 heads, bf16, causal; ms (do_bench medians); 'vs X' = X's time / attnopt's "
              "(above 1: attnopt faster). Outputs (and, with the backward, dq/dk/dv) checked against Flex first.", "",
              "| case | pass | attnopt | Flex | vs Flex | attnopt, general kernels | attnopt, dense bool mask "
              "| dense vs Flex | cuDNN, dense bool mask | vs cuDNN |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, b, n, terms, mod, dense in mask_cases(quick):
        if only and not any(text in name for text in only):
            continue
        bm = create_block_mask(mod, b, None, n, n)
        for mode in ("fwd", "fwd+bwd"):
            if time.time() - started > budget_s:
                lines.append(f"| {name} | {mode} | (not run: the {budget_s:.0f} s budget was spent) |")
                save(lines)
                return
            bwd = mode == "fwd+bwd"
            q, k, v = (randn(b, 16, n, 128, grad=bwd) for _ in range(3))
            provs = {"attnopt": lambda: attnopt.attention(q, k, v, kernel="triton_flash", **terms),
                     "flex": lambda: flex()(q, k, v, block_mask=bm)}
            provs["general"] = provs["attnopt"]  # the same call on the general kernels, against the band kernels
            if dense is not None:
                provs["dense"] = lambda: attnopt.attention(q, k, v, attn_mask=dense, kernel="triton_flash")
                provs["cudnn"] = lambda: sdpa("cudnn", q, k, v, attn_mask=dense)
            ref = provs["flex"]()
            out = provs["attnopt"]()
            check(f"{name} {mode}", out, ref)
            if bwd:
                grad = torch.randn_like(ref)
                ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
                ours = torch.autograd.grad(out, (q, k, v), grad)
                for label, a, r in zip("qkv", ours, ref_grads):
                    check(f"{name} d{label}", a / r.abs().max(), r / r.abs().max())
            del out, ref
            ms = {}
            for peer, fn in provs.items():
                try:
                    with general_kernels(peer == "general"):
                        ms[peer] = timed(fn, bwd, (q, k, v))
                except Exception as exc:  # a peer may refuse a mask; say so and go on
                    print(f"  {peer} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    ms[peer] = float("nan")
            cell = lambda key: f"{ms[key]:.3f}" if key in ms else "-"  # noqa: E731
            ratio = lambda a, b: f"{ms[b] / ms[a]:.2f}" if a in ms and b in ms else "-"  # noqa: E731
            row = (f"| {name} | {mode} | {cell('attnopt')} | {cell('flex')} | {ratio('attnopt', 'flex')} | "
                   f"{cell('general')} | {cell('dense')} | {ratio('dense', 'flex')} | {cell('cudnn')} | "
                   f"{ratio('attnopt', 'cudnn')} |")
            print(row, flush=True)
            if trace:
                from generate import host_and_trace

                for peer in ("attnopt", "flex"):
                    fn = provs[peer]
                    seed_grad = torch.randn_like(fn().detach())
                    host_and_trace(f"  {peer} {name} {mode}", (lambda: fn().backward(seed_grad)) if bwd else fn, trace)
            lines.append(row)
            save(lines)
            del provs
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--quick", action="store_true", help="three dense cases and the structured ones")
    parser.add_argument("--masks", action="store_true",
                        help="only the structured masks, forward and forward + backward, against Flex")
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="with --masks: the host time and the N costliest kernels and host ops of each attnopt call "
                             "and of Flex's")
    parser.add_argument("--cases", nargs="*", default=[],
                        help="with --masks: only the cases whose name contains one of these texts")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which no new structured-mask case starts")
    args = parser.parse_args(argv)
    global _out_path
    _out_path = args.out
    torch.manual_seed(0)
    started = time.time()
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{DTYPE}; TFLOP/s (do_bench medians)", ""]
    if args.masks:
        run_masks(lines, args.quick, args.budget, started, args.trace, tuple(args.cases))
    else:
        run_dense(QUICK_CASES if args.quick else DENSE_CASES_128, lines)
        run_structured(lines)
        if not args.quick:
            run_dense(DENSE_CASES_64, lines)
    lines.append(f"\n(total benchmark time {time.time() - started:.0f} s)")
    save(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
