"""Training on packed documents with ``torch.compile(model, backend="attnopt")``: the same loss curve.

    python examples/train_packed.py                       # CPU, 2 x 256 tokens, 8 steps (inductor's first compile: ~30 s)
    python examples/train_packed.py --compiler eager      # the rewritten graphs run as Python: starts in seconds
    python examples/train_packed.py --device cuda --dtype bfloat16 --length 8192 --dim 1024 --heads 16 --steps 20

Packing puts several documents in one row; each token may attend only to earlier
tokens of its own document. The model writes that mask as people write it,

    same_doc = doc[:, :, None] == doc[:, None, :]        # [B, N, N], doc [B, N] document ids
    keep = same_doc & causal                             # [B, N, N]
    scores = scores.masked_fill(~keep[:, None], -inf)    # [B, H, N, N]

and the same weights are trained twice on the same batches: as written, and through
attnopt's torch.compile backend (inductor by default). The loss curves agree to float
rounding. Random weights and token ids, nothing downloaded. The report says what
attnopt found at each site (its ``attention`` column) and which kernel runs the
forward and the backward.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.measure import add_planner_flags, compare, planner_options
from attnopt.report import format_bytes


class PackedAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, doc):  # x [B, N, C], doc [B, N] document id of each token
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).split(c, dim=-1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)  # [B, H, N, N]
        pos = torch.arange(n, device=x.device)
        causal = pos[None, :] <= pos[:, None]  # [N, N]
        keep = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, N, N]
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # [B, H, N, D]
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PackedAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, doc):
        x = x + self.attn(self.ln1(x), doc)
        return x + self.mlp(self.ln2(x))


class PackedLM(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, doc):  # ids, doc [B, N]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, doc)
        return self.head(self.norm(x))  # [B, N, vocab]


def packed_batch(step: int, batch: int, length: int, vocab: int, device):
    """Token ids, next-token targets and document ids of rows packed with documents of random lengths."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=g)
    ends = torch.randint(length // 16 + 1, length // 3 + 1, (batch, length), generator=g).cumsum(-1)  # [B, many]
    doc = (torch.arange(length)[None, :, None] >= ends[:, None, :]).sum(-1)  # [B, N]: documents ended before i
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), doc.to(device)


def train(model, args, device) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        ids, targets, doc = packed_batch(step, args.batch, args.length, args.vocab, device)
        logits = model(ids, doc)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@dataclass
class Result:
    losses_original: list[float]
    losses_attnopt: list[float]
    max_loss_diff: float
    found: list[str]  # each site's attention as found ("causal+document", or "dense" for a mask kept as a tensor)
    replaced: int
    reasons: list[str]
    trained: bool  # whether the captured graphs were for training (forward + backward)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor",
                        help="what runs the rewritten graphs (the backend's default: inductor)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--repeat", type=int, default=3, help="timed training steps (medians)")
    add_planner_flags(parser)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = PackedLM(args.vocab, args.dim, args.heads, args.layers).to(device, dtype).train()
    original = copy.deepcopy(model)  # the same initial weights, trained as written
    report = attnopt.Report()
    options = {"report": report, "compiler": args.compiler, **planner_options(args)}
    compiled = torch.compile(model, backend="attnopt", options=options)

    before = train(original, args, device)
    after = train(compiled, args, device)  # the first step captures, rewrites and compiles forward and backward

    print(report)
    if not report.replaced:
        print("At this size every site kept its original code, which was the fastest (see 'why'); "
              "longer rows (--length 1024) let attnopt's kernels win.")
    print()
    print(f"{'step':>4}  {'original':>10}  {'attnopt':>10}  {'|difference|':>12}")
    for step, (a, b) in enumerate(zip(before, after)):
        print(f"{step:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>12.2e}")
    max_loss_diff = max(abs(a - b) for a, b in zip(before, after))
    print(f"max |loss difference| over {args.steps} steps: {max_loss_diff:.2e}")

    ids, targets, doc = packed_batch(args.steps, args.batch, args.length, args.vocab, device)

    def step(m):  # forward and backward of one batch (gradients accumulate: the weights are not updated)
        return lambda: F.cross_entropy(m(ids, doc).float().flatten(0, 1), targets.flatten()).backward()

    runs = compare({"original": step(original), "attnopt": step(compiled)}, device=device, repeat=args.repeat)
    print(f"training step (forward + backward), {args.batch} x {args.length} tokens, median of {args.repeat}:")
    for name, m in runs.items():
        print(f"  {name:<9} {m.seconds * 1e3:8.1f} ms   peak extra memory {format_bytes(m.peak_bytes):>10}")
    return Result(
        losses_original=before, losses_attnopt=after, max_loss_diff=max_loss_diff,
        found=[s.found for s in report.sites], replaced=len(report.replaced), reasons=[s.reason for s in report.sites],
        trained=any(g.training for g in report.memory),
    )


if __name__ == "__main__":
    main()
