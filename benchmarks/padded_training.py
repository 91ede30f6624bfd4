"""Training steps of attention whose rows without a key take the fills' row-wise gradients: what the planner chose,
and the step against the original's.

    python benchmarks/padded_training.py [--device cuda] [--out benchmarks/results/padded_training.md]

Two training sites: Gemma-2's (a softcap, then HF's additive causal + padding mask of ``finfo.min``) and GPT-2's
(the causal band replaced by ``finfo.min``, the padding added, attention dropout 0.1); B 8, 12 heads, N 512,
D 64 (``fill_rows.py``'s shape), float32 on the CPU, bfloat16 on a GPU. Three batches each:

* ``left``: batch row b left-padded by ``b * N / 2 / (B - 1)`` keys, so its first rows see no key;
* ``right``: the same lengths padded on the right (every causal row sees its first key);
* ``left, captured right``: captured and planned on the right-padded batch, then run on the left-padded one.

Each row optimizes a fresh copy (``attnopt.optimize``, timing on, a fresh tuning cache) on its capture batch,
reports the site's kernel and the planner's reason, then times forward + backward of the optimized and the
original module on the run batch, interleaved (medians of ``--repeat``), and checks the optimized output against
the original's (without dropout: GPT-2's rows draw their own dropout). ``control`` is a copy of the original timed
beside them: the original's time over its own, the spread this measurement reads for two equal steps.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import platform
import statistics
import tempfile
import time

import torch
import torch.nn as nn

import attnopt

B, H, N, D = 8, 12, 512, 64


class Gemma2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, H, D).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        s = torch.tanh(q @ k.transpose(-1, -2) * D**-0.5 / 50.0) * 50.0
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(b, 1, n, n, dtype=s.dtype, device=x.device).masked_fill(~keep, torch.finfo(s.dtype).min)
        return ((s + mask).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)


class GPT2Attention(nn.Module):
    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.dropout = dropout
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.register_buffer("bias", torch.ones(N, N, dtype=torch.bool).tril()[None, None], persistent=False)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, H, D).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-1, -2) * D**-0.5
        low = torch.finfo(s.dtype).min
        s = torch.where(self.bias[:, :, :n, :n], s, torch.full([], low, dtype=s.dtype, device=s.device))
        s = s + (1.0 - attention_mask[:, None, None, :].bool().to(s.dtype)) * low
        p = nn.functional.dropout(s.softmax(-1), self.dropout, training=self.training)
        return (p @ v).transpose(1, 2).reshape(b, n, -1)


def padding(left: bool, device: str) -> torch.Tensor:
    mask = torch.ones(B, N, dtype=torch.long, device=device)
    for b in range(B):
        pad = b * N // 2 // (B - 1)
        if pad:
            if left:
                mask[b, :pad] = 0
            else:
                mask[b, N - pad:] = 0
    return mask


def step(module, x, mask, grad):
    out = module(x, mask)
    out.backward(grad)
    return out


def timed(runs: dict, sync, repeat: int) -> dict[str, float]:
    """Median ms of each callable, in interleaved rounds after one warm-up each; odd rounds run them in reverse
    order, so that no callable always runs right after another."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    sync()
    for round_ in range(repeat):
        for name, fn in (reversed(runs.items()) if round_ % 2 else runs.items()):
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(fn, sync, rows: int) -> None:
    """The profiler's table of three calls of ``fn``, by self CPU time then by device time."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        sync()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    if torch.cuda.is_available():
        print(events.table(sort_by="self_device_time_total", row_limit=rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after each row, print the profiler's top ROWS ops of 3 optimized steps")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="only the rows whose site and batch (\"GPT-2 band + dropout, right\") contain TEXT")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"{where}, torch {torch.__version__}, {dtype}; B {B}, {H} heads, N {N}, D {D}; forward + backward, "
             f"medians of {args.repeat} interleaved rounds", "",
             "| site | batch | kernel | original ms | optimized ms | speedup | control | max abs diff "
             "| the planner's reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, make in (("Gemma-2 softcap", Gemma2Attention), ("GPT-2 band + dropout", GPT2Attention)):
        for name, capture_left, run_left in (("left", True, True), ("right", False, False),
                                             ("left, captured right", False, True)):
            if args.only not in f"{label}, {name}":
                continue
            torch.manual_seed(0)
            original = make().to(device, dtype).train()
            x = torch.randn(B, N, H * D, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(B, N, H * D, device=device, dtype=dtype)
            capture, run = padding(capture_left, device), padding(run_left, device)
            with tempfile.TemporaryDirectory() as cache:
                optimized = attnopt.optimize(copy.deepcopy(original), tune=True, cache_dir=cache)
                step(optimized, x, capture, grad)  # capture, plan and rewrite on the capture batch
                site = attnopt.report_of(optimized).sites[0]
                diff = "-"
                if make is Gemma2Attention:
                    diff = f"{float((optimized(x, run) - original(x, run)).abs().max()):.1e}"
                control = copy.deepcopy(original)  # the original again: what the harness reads for two equal steps
                ms = timed({"original": lambda: step(original, x, run, grad),
                            "optimized": lambda: step(optimized, x, run, grad),
                            "control": lambda: step(control, x, run, grad)}, sync, args.repeat)
            lines.append(f"| {label} | {name} | {site.kernel or 'original'} | {ms['original']:.2f} | "
                         f"{ms['optimized']:.2f} | {ms['original'] / ms['optimized']:.2f}x | "
                         f"{ms['original'] / ms['control']:.2f}x | {diff} | {site.reason} |")
            print(lines[-1], flush=True)
            if args.profile:
                profile(lambda: step(optimized, x, run, grad), sync, args.profile)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
