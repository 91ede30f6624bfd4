"""Whole models on the GPU: attnopt against eager, SDPA, torch.compile and FlexAttention.

    python benchmarks/models.py [--lengths 2048 8192 32768] [--attention-mask ones|padded|none]
                                [--peers eager sdpa sdpa_compile flex flex_compile attnopt attnopt_compile] [--out ...]

Llama-style: 8 layers, d_model 2048, 16 query / 4 kv heads, MLP 5632; Mistral-style: the same with
sliding_window=4096. Random weights, bf16, forward. ``--attention-mask ones`` (default): batch 1 with
an all-ones ``attention_mask``, as users call HF models (the shapes of shared/ANCHORS.md's whole-model
table); ``padded``: batch 2, the second row left-padded by a quarter of its length (a generate()
prefill); ``none``: no mask. Peers, each the same weights:

* ``eager``, ``sdpa``, ``flex``: transformers' ``attn_implementation`` (flex: FlexAttention, which
  transformers compiles itself);
* ``sdpa_compile``: the SDPA model under ``torch.compile``;
* ``flex_compile``: the FlexAttention model under ``torch.compile`` (the whole model compiled, as
  ``attnopt_compile`` is; only when named in ``--peers``);
* ``attnopt``: the eager model after ``attnopt.optimize`` (default ``compiler="eager"``);
* ``attnopt_compile``: the eager model under ``torch.compile(backend="attnopt")``.

attnopt is settled after its first call (``attnopt.settle``: the kernels it compiles in the background are
timed and switched to; then its in-model trial, ``passes/trial.py``, runs to its choice) and checked and timed
on the kernels it then runs.

For each length: median forward time over timed repeats (CUDA events) and peak extra memory
(torch.cuda.max_memory_allocated above the start). Correctness first: every output is compared with
SDPA's on the real (unpadded) tokens before timing; the table prints the largest difference.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import warnings

import torch

import attnopt
from attnopt.passes import trial


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


def settled(model, call) -> None:
    """``attnopt.settle(model)``, then ``call()`` (a call of the model) until the model's in-model trial
    (``passes/trial.py``: its first inference calls alternate the finalists) has chosen, so that what is timed
    after is the model's steady state."""
    attnopt.settle(model)
    for _ in range(trial.MAX_CALLS):
        if trial.running(model.attnopt_report) is None:
            break
        call()


def timed(fn, repeat: int = 5, warmup: int = 3) -> tuple[float, int]:
    """(median ms, peak extra bytes) of ``fn()`` after ``warmup`` calls (compiled peers finish compiling and
    autotuning over their first calls)."""
    for _ in range(warmup):
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


PEERS = ("eager", "sdpa", "sdpa_compile", "flex", "flex_compile", "attnopt", "attnopt_compile")
#: the peers run when none are named: ``flex_compile`` (FlexAttention's model under torch.compile, whose cold
#: compile takes minutes) only when asked for
DEFAULT_PEERS = [p for p in PEERS if p != "flex_compile"]


def make_peer(name: str, kind: str, weights: dict):
    """The model ``name`` runs, with ``weights``; None when this transformers has no such attention."""
    if name in ("eager", "sdpa", "flex"):
        try:
            model = build(kind, {"flex": "flex_attention"}.get(name, name))
        except (ValueError, ImportError) as error:  # an attention implementation this install lacks
            print(f"{name}: not available ({error})", flush=True)
            return None
        model.load_state_dict(weights)
        return model
    if name in ("sdpa_compile", "flex_compile"):
        model = build(kind, "sdpa" if name == "sdpa_compile" else "flex_attention")
        model.load_state_dict(weights)
        return torch.compile(model, dynamic=False)
    model = build(kind, "eager")
    model.load_state_dict(weights)
    if name == "attnopt":
        return attnopt.optimize(model, dynamic=False)
    return torch.compile(model, backend="attnopt", dynamic=False)


def inputs_for(mode: str, n: int) -> tuple[dict, torch.Tensor]:
    """(model inputs, bool [B, N] of the real tokens)."""
    batch = 2 if mode == "padded" else 1
    ids = torch.randint(0, 32000, (batch, n), device="cuda")
    real = torch.ones(batch, n, dtype=torch.bool, device="cuda")
    if mode == "padded":
        real[1, : n // 4] = False
    inputs = {"input_ids": ids}
    if mode != "none":
        inputs["attention_mask"] = real.long()
    return inputs, real


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--models", nargs="+", default=["llama", "mistral"])
    parser.add_argument("--attention-mask", choices=["ones", "padded", "none"], default="ones")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=DEFAULT_PEERS)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--trace", type=int, default=0, metavar="N",
                        help="after timing each length: the host time of one forward (its return, before the GPU "
                             "finishes) and the N costliest GPU kernels and host ops of one forward, per peer")
    args = parser.parse_args()
    torch.manual_seed(0)
    peers = [p for p in PEERS if p in args.peers]
    described = {"ones": "batch 1, attention_mask passed (all ones)", "none": "batch 1, no attention_mask",
                 "padded": "batch 2, attention_mask with the second row left-padded by N/4"}[args.attention_mask]
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, forward, {described}. "
        "Each cell: median time, peak extra memory; ratios are SDPA's time over the peer's (above 1: faster).",
        "",
        "| model | N | " + " | ".join(peers) + " | attnopt vs SDPA | attnopt vs best peer | max abs diff vs SDPA | kernels |",
        "|---|---|" + "---|" * len(peers) + "---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for kind in args.models:
        weights = build(kind, "eager").state_dict()
        models = {name: make_peer(name, kind, weights) for name in peers}
        for n in args.lengths:
            inputs, real = inputs_for(args.attention_mask, n)
            results, diffs = {}, {}
            with torch.no_grad():
                reference = models["sdpa"](**inputs).last_hidden_state if models.get("sdpa") else None
                for name, model in models.items():
                    if model is None:
                        results[name] = "n/a"
                        continue
                    try:
                        out = model(**inputs).last_hidden_state
                        if name.startswith("attnopt"):  # kernels compiled in the background: timed, switched
                            settled(model, lambda model=model: model(**inputs))
                            out = model(**inputs).last_hidden_state  # checked on the kernels it is timed on
                        if reference is not None:
                            diffs[name] = (out.float() - reference.float())[real].abs().max().item()
                        del out
                        results[name] = timed(lambda model=model: model(**inputs))
                        if args.trace:
                            from generate import host_and_trace

                            host_and_trace(f"{name}, one forward", lambda model=model: model(**inputs), args.trace)
                    except torch.OutOfMemoryError:
                        results[name] = "out of memory"
                    torch.cuda.empty_cache()
            timing = {k: r[0] for k, r in results.items() if not isinstance(r, str)}
            ours = timing.get("attnopt")
            vs_sdpa = f"{timing['sdpa'] / ours:.2f}x" if ours and "sdpa" in timing else "-"
            others = {k: t for k, t in timing.items() if not k.startswith("attnopt") and k != "eager"}
            best = min(others, key=others.get) if others else None
            vs_best = f"{others[best] / ours:.2f}x ({best})" if ours and best else "-"
            site_list = getattr(models.get("attnopt"), "attnopt_report", None)
            kernels = sorted({_kernels(s) for s in site_list.sites if s.q_len == n and s.replaced}) if site_list else []
            diff = max(diffs.get("attnopt", 0.0), diffs.get("attnopt_compile", 0.0))
            lines.append(
                f"| {kind} | {n} | " + " | ".join(fmt(results[p]) for p in peers)
                + f" | {vs_sdpa} | {vs_best} | {diff:.3g} | {', '.join(kernels)} |"
            )
            print(lines[-1], flush=True)
            if args.out:  # after every row: a run cut short by its time limit keeps what it measured
                args.out.write_text("\n".join(lines) + "\n")
        if models.get("attnopt") is not None:
            print(models["attnopt"].attnopt_report, flush=True)
        del models
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
