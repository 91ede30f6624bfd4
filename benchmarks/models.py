"""Whole models on the GPU: attnopt.optimize on Hugging Face eager attention, against eager and SDPA.

    python benchmarks/models.py [--lengths 2048 8192 32768] [--attention-mask ones|none] [--out ...]

Llama-style: 8 layers, d_model 2048, 16 query / 4 kv heads, MLP 5632; Mistral-style: the same with
sliding_window=4096. Random weights, bf16, batch 1, forward, no padding (the shapes of
shared/ANCHORS.md's whole-model table); by default ``attention_mask`` is passed (all ones), as users
call HF models. For each length: median forward time over timed repeats
(CUDA events) and peak extra memory (torch.cuda.max_memory_allocated above the start), for
eager attention, SDPA attention, and the eager model after attnopt.optimize. Correctness first:
the optimized output is compared with SDPA's (and eager's where it fits) before timing.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import warnings

import torch

import attnopt


def build(kind: str, attn: str):
    import transformers

    common = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                  attn_implementation=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "llama":
            model = transformers.LlamaModel(transformers.LlamaConfig(**common))
        else:
            model = transformers.MistralModel(transformers.MistralConfig(**common, sliding_window=4096))
    return model.to("cuda", torch.bfloat16).eval()


def timed(fn, repeat: int = 5) -> tuple[float, int]:
    """(median ms, peak extra bytes) of ``fn()`` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def fmt(result) -> str:
    if isinstance(result, str):
        return result
    ms, peak = result
    return f"{ms:.1f} ms, {peak / 2**20:.0f} MiB"


def _kernels(site) -> str:
    """The site's kernel, and the one its unpadded batches run (the all-ones attention_mask of this table)."""
    marker = "padding keeps every key run "
    if marker in site.reason:
        return f"{site.kernel}, unpadded: {site.reason.split(marker, 1)[1].split(';')[0]}"
    return site.kernel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--models", nargs="+", default=["llama", "mistral"])
    parser.add_argument("--attention-mask", choices=["ones", "none"], default="ones")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    passed = "attention_mask passed (all ones)" if args.attention_mask == "ones" else "no attention_mask"
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, batch 1, forward, no padding, {passed}",
        "",
        "| model | N | eager | SDPA | attnopt (from eager) | attnopt vs SDPA | max abs diff vs SDPA | kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for kind in args.models:
        eager, sdpa = build(kind, "eager"), build(kind, "sdpa")
        sdpa.load_state_dict(eager.state_dict())
        optimized = attnopt.optimize(copy.deepcopy(eager), dynamic=False)  # optimize() changes its model
        for n in args.lengths:
            ids = torch.randint(0, 32000, (1, n), device="cuda")
            inputs = {"input_ids": ids}
            if args.attention_mask == "ones":
                inputs["attention_mask"] = torch.ones_like(ids)
            with torch.no_grad():
                reference = sdpa(**inputs).last_hidden_state
                got = optimized(**inputs).last_hidden_state
                diff = (got.float() - reference.float()).abs().max().item()
                results = {}
                for name, model in (("eager", eager), ("sdpa", sdpa), ("attnopt", optimized)):
                    try:
                        results[name] = timed(lambda model=model: model(**inputs))
                    except torch.OutOfMemoryError:
                        results[name] = "out of memory"
                    torch.cuda.empty_cache()
            kernels = sorted({_kernels(s) for s in optimized.attnopt_report.sites if s.q_len == n and s.replaced})
            ratio = "-"
            if not isinstance(results["attnopt"], str) and not isinstance(results["sdpa"], str):
                ratio = f"{results['sdpa'][0] / results['attnopt'][0]:.2f}x faster"
            lines.append(
                f"| {kind} | {n} | {fmt(results['eager'])} | {fmt(results['sdpa'])} | {fmt(results['attnopt'])} "
                f"| {ratio} | {diff:.3g} | {', '.join(kernels)} |"
            )
            print(lines[-1], flush=True)
        print(optimized.attnopt_report, flush=True)
        del eager, sdpa, optimized
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
