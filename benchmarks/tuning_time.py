"""Where a site's first call spends its time: each candidate's warm-up (compile, autotune) and timed runs.

    python benchmarks/tuning_time.py [--length 16384] [--heads 16 4] [--head-dim 128] [--terms causal documents]
                                     [--training] [--kernels triton_flash flex ...] [--device cuda|cpu]
                                     [--stacks-every S] [--out FILE]

On its first call, an optimized model's planner times every candidate of a site family at the site's
shapes (``passes/tuning.py``): each runs once to warm up (on CUDA that compiles and autotunes Triton code,
and compiles FlexAttention), then a few timed rounds. This script does the same for one spec, candidate by
candidate, and prints a row as soon as each is done, so a warm-up that takes minutes is named before it
ends (``--stacks-every S`` prints the Python stacks meanwhile). It runs nothing of a model: a minute of
device time tells which candidate holds up a first call.

The spec is a Llama-style site (batch 1, bf16 on CUDA, float32 on the CPU) with the terms asked for:
``causal``, ``documents`` (document ids, as HF's packed rows give them) and ``padding`` (a key-padding
row), with the fill HF's eager mask implies (an added ``finfo.min``). ``--training`` times forward and
backward, as a training step's first call does. Nothing is cached: every candidate is warmed up afresh in
this process (Triton's and inductor's on-disk caches still apply; clear them for a cold start).
"""

from __future__ import annotations

import argparse
import faulthandler
import pathlib
import statistics
import sys
import time

import torch

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec, Fill
from attnopt.passes import plan, tuning

TERMS = ("causal", "documents", "padding")


def site_spec(args) -> AttentionSpec:
    n, (hq, hkv) = args.length, args.heads
    device = torch.device(args.device)
    meta = lambda *shape: torch.empty(*shape, dtype=torch.int64, device="meta")  # noqa: E731
    return AttentionSpec(
        batch=1, q_heads=hq, kv_heads=hkv, q_len=n, kv_len=n, head_dim=args.head_dim, v_head_dim=args.head_dim,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
        scale=args.head_dim ** -0.5, causal="causal" in args.terms,
        q_doc=meta(1, n) if "documents" in args.terms else None, kv_doc=meta(1, n) if "documents" in args.terms else None,
        key_padding=torch.empty(1, n, dtype=torch.bool, device="meta") if "padding" in args.terms else None,
        fill=Fill.FINITE_ADDED, requires_grad=args.training,
    )


def seconds(once, device: torch.device) -> float:
    tuning._sync(device)  # the planner's own synchronization
    start = time.perf_counter()
    once()
    tuning._sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, nargs=2, default=[16, 4], metavar=("Q", "KV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--terms", nargs="*", choices=TERMS, default=["causal", "documents"])
    parser.add_argument("--training", action="store_true", help="forward and backward, as a training step")
    parser.add_argument("--kernels", nargs="+", default=None, help="default: every candidate the planner has")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stacks-every", type=float, default=None, metavar="S")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    if args.length < 1 or args.head_dim < 1 or args.heads[0] % args.heads[1]:
        parser.error(f"--length {args.length}, --head-dim {args.head_dim}, --heads {args.heads}: positive, and the "
                     "query heads a multiple of the kv heads")
    if args.stacks_every:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True)
    spec = site_spec(args)
    original = tuning.Original("softmax")
    found = plan.candidates(spec, original=original)
    names = args.kernels or [c.kernel for c in found if c.supported]
    estimates = {c.kernel: c.estimate for c in found}
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{where}, torch {torch.__version__}; {'+'.join(args.terms) or 'no mask'}, B=1, heads "
             f"{args.heads[0]}/{args.heads[1]}, N={args.length}, D={args.head_dim}, {spec.dtype}, "
             f"{'forward + backward' if args.training else 'forward'}", "",
             "| candidate | estimate ms | warm-up s | median ms | note |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        note, warm, median = "", float("nan"), float("nan")
        reasons = registry.get(name).not_supported_reasons(spec) if name != tuning.ORIGINAL else []
        if reasons:
            note = "not supported: " + "; ".join(reasons)
        else:
            print(f"{name}: warming up ...", file=sys.stderr, flush=True)
            try:
                with torch.enable_grad() if args.training else torch.no_grad():
                    once = tuning._runner(name, spec, original)
                    warm = seconds(once, device)
                    median = statistics.median(seconds(once, device) for _ in range(args.repeat)) * 1e3
            except Exception as error:  # noqa: BLE001  (a candidate's failure is its row)
                note = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        estimate = estimates.get(name)
        row = (f"| {name} | {'' if estimate is None else f'{estimate * 1e3:.3f}'} | {warm:.1f} | {median:.3f} "
               f"| {note} |")
        lines.append(row)
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
