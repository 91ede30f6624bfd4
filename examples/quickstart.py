"""Quickstart: a small GPT with hand-written attention and a padding mask, optimized on CPU.

    python examples/quickstart.py

attnopt finds the attention in each block (the causal tril buffer, the padding
mask, the softmax and both matmuls), replaces it with one call of its exact
kernel, and the model gives the same output with a fraction of the memory.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.measure import measure
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


def main():
    torch.manual_seed(0)
    model = GPT().eval()
    batch, length = 2, 2048
    tokens = torch.randint(0, 1000, (batch, length))
    padding = torch.zeros(batch, length)
    padding[1, 1500:] = float("-inf")  # a shorter sequence, right-padded

    optimized = attnopt.optimize(model)
    with torch.no_grad():
        before = measure(lambda: model(tokens, padding), repeat=2)
        after = measure(lambda: optimized(tokens, padding), repeat=2)
        expected, got = model(tokens, padding), optimized(tokens, padding)

    print(optimized.attnopt_report)
    print()
    print(f"max |optimized - original| = {(got - expected).abs().max().item():.2e}  (float32 rounding: ~1e-5)")
    print(f"forward time: {before.seconds * 1e3:.0f} ms -> {after.seconds * 1e3:.0f} ms")
    print(f"peak extra memory: {format_bytes(before.peak_bytes)} -> {format_bytes(after.peak_bytes)}")


if __name__ == "__main__":
    main()
