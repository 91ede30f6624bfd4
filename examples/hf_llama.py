"""A Hugging Face Llama in eager attention: what attnopt finds, the same logits, the same tokens as SDPA.

    python examples/hf_llama.py                          # tiny random Llama on CPU, a few seconds
    python examples/hf_llama.py --device cuda --size 1b --dtype bfloat16 --length 4096 --new-tokens 64

Nothing is downloaded: the weights are random, from a ``LlamaConfig`` (``--size 1b`` is
TinyLlama-1.1B's shape). The batch holds two prompts, the second left-padded as
``generate()`` batches are, so every layer's attention is causal + key padding +
grouped-query, written the way HF's eager attention writes it (``repeat_kv``, a
``finfo.min`` additive mask, softmax in float32).

It prints ``attnopt.explain()``'s table (what would be replaced, and why), then optimizes
the model in place and compares it with a copy of the original: the largest logit
difference, forward time and peak memory (eager, SDPA, attnopt), and greedy
``generate()`` against the same weights with ``attn_implementation="sdpa"``: the
same tokens, and tokens/s. attnopt replaces a site only with a kernel it measured
faster than the code as written: at the tiny default size on a CPU it keeps the
original code, and says so (``--replace-all`` replaces every site a kernel supports,
to see the kernels at work at any size).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from dataclasses import dataclass

import torch

import attnopt
from attnopt.measure import add_planner_flags, compare, planner_options
from attnopt.report import format_bytes

SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # TinyLlama-1.1B's shape
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


@dataclass
class Result:
    sites: int  # attention sites explain() found in the prompt's forward
    found: list[str]  # what each was found to be ("causal+key_padding+gqa")
    replaced: int  # sites optimize() replaced (all graphs: prefill and decode)
    reasons: list[str]  # why each site of the optimized model was replaced or left alone
    max_diff: float  # max |optimized logits - original logits|
    tokens_equal_sdpa: bool  # generate(): attnopt's tokens == the SDPA model's
    tokens_equal_original: bool  # generate(): attnopt's tokens == the original eager model's
    tokens_per_s: dict[str, float]  # generate() throughput: "sdpa", "attnopt"


def build(size: str, attn: str, max_len: int):
    import transformers

    config = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=max_len, attn_implementation=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def prompts(vocab: int, batch: int, length: int, device):
    ids = torch.randint(0, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[1:, : length // 4] = 0  # shorter prompts, left-padded as generate() batches are
    return ids, mask


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--length", type=int, default=32, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (medians)")
    add_planner_flags(parser)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    max_len = args.length + args.new_tokens
    model = build(args.size, "eager", max_len).to(device, dtype).eval()
    sdpa = build(args.size, "sdpa", max_len).to(device, dtype).eval()
    sdpa.load_state_dict(model.state_dict())
    ids, mask = prompts(model.config.vocab_size, args.batch, args.length, device)
    inputs = dict(input_ids=ids, attention_mask=mask)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    planner = planner_options(args)

    with torch.no_grad():
        # 1. a dry run: every attention site, what it is, and what optimize() would do with it
        explained = attnopt.explain(model, kwargs=inputs, **planner)
        print(explained)
        print()

        # 2. optimize in place (a copy keeps the code as written, to compare)
        original = copy.deepcopy(model)
        attnopt.optimize(model, **planner)
        expected, got = original(**inputs).logits, model(**inputs).logits  # first call: capture and rewrite
        max_diff = (got.float() - expected.float()).abs().max().item()
        real = mask.bool()  # SDPA's padded positions differ from eager's (rows that see no key): no real token reads them
        sdpa_diff = (sdpa(**inputs).logits[real].float() - expected[real].float()).abs().max().item()
        forward = compare({"eager": lambda: original(**inputs), "sdpa": lambda: sdpa(**inputs),
                           "attnopt": lambda: model(**inputs)}, device=device, repeat=args.repeat)

        # 3. greedy generation with a KV cache: the decode steps are graphs of their own
        tokens = {name: m.generate(**inputs, **gen)  # also the warm-up: attnopt captures the decode graphs here
                  for name, m in (("eager", original), ("sdpa", sdpa), ("attnopt", model))}
        generation = compare({"sdpa": lambda: sdpa.generate(**inputs, **gen),
                              "attnopt": lambda: model.generate(**inputs, **gen)},
                             device=device, repeat=args.repeat, warmup=0)

    report = model.attnopt_report
    print(report)
    print()
    replaced = len(report.replaced)
    if replaced:
        print(f"attnopt runs its kernels at {replaced} of {len(report.sites)} sites (all graphs: prefill and decode).")
    else:
        print(f"attnopt kept the original code at all {len(report.sites)} sites: at this size on this machine no "
              "kernel was faster than the code as written (see 'why'). Scale up to see it replace them (e.g. "
              "--device cuda --size 1b --dtype bfloat16 --length 4096), or force them with --replace-all.")
    print(f"logits: max |attnopt - original| = {max_diff:.2e} at every position, padding included "
          f"(SDPA model vs original: {sdpa_diff:.2e} on the real tokens)")
    print(f"{'forward, ' + str(args.length) + ' tokens':<24}" + "".join(f"{name:>22}" for name in forward))
    print(f"{'  median time':<24}" + "".join(f"{m.seconds * 1e3:>19.2f} ms" for m in forward.values()))
    print(f"{'  peak extra memory':<24}" + "".join(f"{format_bytes(m.peak_bytes):>22}" for m in forward.values()))
    new = args.batch * args.new_tokens
    per_s = {name: new / m.seconds for name, m in generation.items()}
    equal_sdpa = torch.equal(tokens["attnopt"], tokens["sdpa"])
    equal_original = torch.equal(tokens["attnopt"], tokens["eager"])
    print(f"generate(), {args.new_tokens} new tokens x {args.batch} prompts, greedy:")
    print(f"  same tokens as SDPA: {equal_sdpa}; as the original eager model: {equal_original}")
    print("  " + ", ".join(f"{name} {rate:.0f} tokens/s (peak {format_bytes(generation[name].peak_bytes)})"
                           for name, rate in per_s.items()))
    return Result(
        sites=len(explained.sites), found=[s.found for s in explained.sites], replaced=replaced,
        reasons=[s.reason for s in report.sites], max_diff=max_diff, tokens_equal_sdpa=equal_sdpa,
        tokens_equal_original=equal_original, tokens_per_s=per_s,
    )


if __name__ == "__main__":
    main()
