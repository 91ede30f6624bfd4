"""Quickstart: a small GPT with hand-written attention and a padding mask, optimized on CPU.

    python examples/quickstart.py [--length 1024]

attnopt finds the attention in each block (the causal tril buffer, the padding
mask, the softmax and both matmuls), and on the first call times, on this
machine, what could replace it against the code as written (about a second,
once per shape: the result is cached). It replaces a site only with a kernel
that is faster, so the model gives the same output in less time and memory.
"""

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.measure import compare
from attnopt.report import format_bytes


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x, padding):  # x [B, T, C], padding [B, T] additive (0 or -inf)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # [B, H, T, T]
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = att + padding[:, None, None, :]
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, H, T, D]
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, max_len)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, padding):
        x = x + self.attn(self.ln1(x), padding)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=1000, dim=256, heads=8, layers=4, max_len=2048):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, max_len) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, padding):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x, padding)
        return self.head(x)


def inputs(batch: int = 2, length: int = 1024):
    tokens = torch.randint(0, 1000, (batch, length))
    padding = torch.zeros(batch, length)
    padding[1, length * 3 // 4:] = float("-inf")  # a shorter sequence, right-padded
    return tokens, padding


def main(length: int = 1024, repeat: int = 3):
    torch.manual_seed(0)
    model = GPT().eval()
    original = copy.deepcopy(model)  # optimize() changes the model itself: keep the code as written to compare
    tokens, padding = inputs(length=length)

    optimized = attnopt.optimize(model)
    with torch.no_grad():
        expected, got = original(tokens, padding), optimized(tokens, padding)  # first call: capture, time, rewrite
        runs = compare({"original": lambda: original(tokens, padding),
                        "optimized": lambda: optimized(tokens, padding)}, repeat=repeat)
    before, after = runs["original"], runs["optimized"]

    print(optimized.attnopt_report)
    print()
    print(f"max |optimized - original| = {(got - expected).abs().max().item():.2e}  (float32 rounding: ~1e-5)")
    print(f"forward time (median of {repeat} interleaved runs): {before.seconds * 1e3:.0f} ms -> "
          f"{after.seconds * 1e3:.0f} ms, {before.seconds / after.seconds:.1f}x faster")
    print(f"peak extra memory: {format_bytes(before.peak_bytes)} -> {format_bytes(after.peak_bytes)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (at most 2048)")
    main(parser.parse_args().length)
