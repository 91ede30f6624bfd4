"""generate() throughput: HF eager attention after attnopt.optimize against the same weights on SDPA.

    python benchmarks/generate.py [--prompt 4096] [--new-tokens 64] [--batch 4] [--cache dynamic static]
                                  [--out benchmarks/results/generate.md] [--eager] [--profile N] [--trace N]

Llama-style model (8 layers, d_model 2048, 16 / 4 heads, random weights, bf16, CUDA). The batch's last
row is left-padded by a quarter of the prompt, as generate() pads batches. For each cache kind
(``dynamic``: transformers' default ``DynamicCache``; ``static``: ``cache_implementation="static"``),
greedy decoding of ``--new-tokens`` tokens, timed as the median of 5 rounds that interleave the models,
after a warm-up run of each (which also captures attnopt's prefill and decode graphs). Correctness: the share of new tokens equal to the
original eager model's, for SDPA and for attnopt (greedy bf16 decoding of random weights flips a near-tied
argmax on any rounding difference, and the rest of the row follows it), and the largest difference of the
prefill's last logits from eager's, which says how far apart the models really are.

Diagnostics: ``--eager`` also times the original eager model; ``--profile N`` prints the host's N costliest
functions in one attnopt ``generate()`` (cProfile) and inductor's CUDA-graph counters; ``--trace N`` the N
costliest GPU kernels of one ``generate()`` of each model (``torch.profiler``), to tell where GPU time goes.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time
import warnings

import torch

import attnopt


def build(attn: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=65536, attn_implementation=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def timed(runs: dict, rounds: int = 5) -> dict[str, tuple[float, torch.Tensor]]:
    """{name: (median seconds, tokens)} of each ``runs[name]()``, after one warm-up call each, timed in
    ``rounds`` interleaved rounds: the models share the machine's drift (SDPA's own figure moved by 30-40%
    between runs timed back to back), so their ratio is what one run can tell."""
    tokens = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens[name] = fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), tokens[name]) for name in runs}


def profile(fn, top: int) -> None:
    """Host profile of one ``fn()`` (cProfile, cumulative and own time) and inductor's CUDA-graph counters."""
    import cProfile
    import io
    import pstats

    from torch._dynamo.utils import counters

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print(text.getvalue(), flush=True)
    print("inductor counters:", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}, flush=True)


def host_and_trace(label: str, fn, top: int) -> None:
    """The host time of ``fn()`` (until it returns, with the GPU idle before it: a call whose host time reaches
    its GPU time is bound by the host), then its ``top`` costliest GPU kernels and host ops."""
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    print(f"{label}: host time of one call {statistics.median(host) * 1e3:.3f} ms", flush=True)
    trace(fn, top, sort_by=("cuda_time_total", "self_cpu_time_total"))


def trace(fn, top: int, sort_by: tuple[str, ...] = ("cuda_time_total",)) -> None:
    """The ``top`` kernels of one ``fn()`` by total GPU time (``torch.profiler``), with the launches per kernel;
    one table per key of ``sort_by`` (``"self_cpu_time_total"``: the host's costliest ops)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    for key in sort_by:
        print(prof.key_averages().table(sort_by=key, row_limit=top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cache", nargs="+", choices=["dynamic", "static"], default=["dynamic", "static"])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--eager", action="store_true", help="also time the original eager model")
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="print the N costliest GPU kernels (torch.profiler) of one generate() per model and cache")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions (host, cumulative) of one attnopt generate() per "
                             "cache, and inductor's CUDA-graph counters")
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = build("eager")
    sdpa = build("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    original = copy.deepcopy(eager)
    optimized = attnopt.optimize(eager)
    ids = torch.randint(0, 32000, (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, : args.prompt // 4] = 0
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, batch {args.batch} x {args.prompt}-token "
        f"prompts (the last left-padded by {args.prompt // 4}), {args.new_tokens} new tokens, greedy",
        "",
        "| cache | SDPA tok/s | attnopt tok/s | attnopt vs SDPA | new tokens equal to eager's: SDPA | attnopt "
        "| attnopt's equal to SDPA's | first logits max diff vs eager: SDPA | attnopt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    new_tokens = args.batch * args.new_tokens
    for cache in args.cache:
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   do_sample=False, pad_token_id=0)
        if cache == "static":
            gen["cache_implementation"] = "static"
        with torch.no_grad():
            runs = {"sdpa": lambda: sdpa.generate(**gen), "attnopt": lambda: optimized.generate(**gen)}
            if args.eager:
                runs["eager"] = lambda: original.generate(**gen)
            measured = timed(runs)
            (sdpa_s, sdpa_tokens), (ours_s, ours_tokens) = measured["sdpa"], measured["attnopt"]
            if args.eager:
                print(f"{cache}: original eager {new_tokens / measured['eager'][0]:.1f} tok/s", flush=True)
            if args.profile:
                profile(lambda: optimized.generate(**gen), args.profile)
            if args.trace:
                for name, model in (("SDPA", sdpa), ("attnopt", optimized)):
                    print(f"{cache}, {name}: GPU kernels of one generate()", flush=True)
                    trace(lambda: model.generate(**gen), args.trace)
            eager_tokens = original.generate(**gen)
            # greedy bf16 decoding of random weights flips a near-tied argmax on any rounding difference, and
            # every later token follows it: the prefill's logits say how far apart the models really are
            first = {name: model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
                     for name, model in (("eager", original), ("sdpa", sdpa), ("attnopt", optimized))}
        new = args.batch * args.new_tokens
        same = lambda a: f"{float((a[:, args.prompt:] == eager_tokens[:, args.prompt:]).float().mean()):.0%}"  # noqa: E731
        logit_diff = {name: float((first[name] - first["eager"]).abs().max()) for name in ("sdpa", "attnopt")}
        lines.append(
            f"| {cache} | {new / sdpa_s:.1f} | {new / ours_s:.1f} | {sdpa_s / ours_s:.2f}x | {same(sdpa_tokens)} "
            f"| {same(ours_tokens)} | {bool(torch.equal(ours_tokens, sdpa_tokens))} | {logit_diff['sdpa']:.3g} "
            f"| {logit_diff['attnopt']:.3g} |")
        print(lines[-1], flush=True)
        if args.out:  # after every row: a run cut short by its time limit keeps what it measured
            args.out.write_text("\n".join(lines) + "\n")
    print(optimized.attnopt_report, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
