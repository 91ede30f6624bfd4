"""Small models with attention written the ways people write it, and softmaxes that are not attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Heads(nn.Module):
    """Projections to [B, H, N, D] shared by the hand-written models."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        return [t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]  # [B, H, N, D]

    def merge(self, y):
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).contiguous().view(b, n, h * d))


class NanoGPTBlock(Heads):
    """nanoGPT: tril buffer, masked_fill(-inf), scale by multiply, dropout on the probabilities."""

    def __init__(self, dim=32, heads=4, max_len=64, dropout=0.0):
        super().__init__(dim, heads)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        q, k, v = self.split(x)
        t = x.shape[1]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.drop(att)
        return self.merge(att @ v)


class PaddedEncoder(Heads):
    """BERT-style: divide by sqrt(d), additive padding mask built from a 0/1 attention_mask."""

    def forward(self, x, attention_mask):
        q, k, v = self.split(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        extended = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        probs = torch.softmax(scores + extended, dim=-1)
        return self.merge(torch.matmul(probs, v))


class FinfoMaskedFill(Heads):
    """masked_fill with finfo.min (fully padded rows average uniformly, not NaN) and an fp32 softmax."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(probs @ v)


class WhereCausal(Heads):
    """torch.where(cond, scores, -inf) with a causal mask built from aranges in the graph."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        i = torch.arange(n, device=x.device)
        causal = i[:, None] >= i[None, :]
        scores = torch.where(causal, q @ k.transpose(-2, -1) * 0.125, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class SDPAModel(Heads):
    """F.scaled_dot_product_attention: causal, or with a bool mask, or GQA."""

    def __init__(self, dim=32, heads=4, mode="causal"):
        super().__init__(dim, heads)
        self.mode = mode

    def forward(self, x, mask=None):
        q, k, v = self.split(x)
        if self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # gqa: half the kv heads
            y = F.scaled_dot_product_attention(q, k[:, ::2], v[:, ::2], enable_gqa=True, scale=0.3)
        return self.merge(y)


class TwoLayers(nn.Module):
    """Two attention layers with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = NanoGPTBlock(), NanoGPTBlock()

    def forward(self, x):
        x = x + self.a(x)
        torch._dynamo.graph_break()
        return x + self.b(x)


# ------------------------------------------------------------------ not attention
class Classifier(nn.Module):
    """A softmax classifier head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=-1)


class Router(nn.Module):
    """An MoE router: softmax over experts, then a weighted sum of expert outputs."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 4)
        self.experts = nn.Linear(32, 4 * 32)

    def forward(self, x):
        weights = torch.softmax(self.gate(x), dim=-1)  # [B, N, E]
        outs = self.experts(x).view(*x.shape[:-1], 4, 32)  # [B, N, E, C]
        return (weights[..., None, :] @ outs).squeeze(-2)


class ReturnsWeights(Heads):
    """Attention whose probabilities are also returned (output_attentions=True)."""

    def forward(self, x):
        q, k, v = self.split(x)
        probs = (q @ k.transpose(-2, -1) * 0.3).softmax(-1)
        return self.merge(probs @ v), probs


class SoftmaxOverQueries(Heads):
    """Softmax over the query dim: not the attention softmax."""

    def forward(self, x):
        q, k, v = self.split(x)
        probs = F.softmax(q @ k.transpose(-2, -1), dim=-2)
        return self.merge(probs @ v)


class ChangedProbabilities(Heads):
    """Probabilities edited after the softmax (a temperature re-normalization the kernel cannot express)."""

    def forward(self, x):
        q, k, v = self.split(x)
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        probs = probs / (probs.sum(-1, keepdim=True) + 1.0)
        return self.merge(probs @ v)
