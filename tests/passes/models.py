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


# ------------------------------------------------------------------ more spellings of attention
class EinsumAttention(Heads):
    """einsum in [B, N, H, D] layout, scale by a 0-d tensor computed in the graph."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, self.head_dim) for t in self.qkv(x).split(c, dim=2))  # [B, N, H, D]
        scale = 1.0 / torch.sqrt(torch.tensor(float(self.head_dim)))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        probs = scores.softmax(dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, N, H, D]
        return self.out(y.reshape(b, n, c))


class Bmm3D(Heads):
    """torch.bmm on [B*H, N, D], baddbmm with a causal additive mask, pre-scaled q."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.reshape(b * self.heads, n, self.head_dim) for t in self.split(x))  # [B*H, N, D]
        q = q * self.head_dim**-0.5
        causal = torch.full((n, n), float("-inf")).triu(1)
        scores = torch.baddbmm(causal.expand(b * self.heads, n, n), q, k.transpose(1, 2))
        y = torch.bmm(F.softmax(scores, dim=-1), v).view(b, self.heads, n, self.head_dim)
        return self.merge(y)


class QuarterScaled(Heads):
    """q and k each scaled by d^-1/4, k transposed by permute, no other scale."""

    def forward(self, x):
        q, k, v = self.split(x)
        f = self.head_dim**-0.25
        scores = torch.matmul(q * f, (k * f).permute(0, 1, 3, 2))
        return self.merge(torch.matmul(scores.softmax(-1), v))


class SlidingWindow(Heads):
    """A causal sliding window of 3 keys written with aranges, masked with finfo.min."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        masked = (j > i) | (j < i - 2)
        scores = (q @ k.mT / math.sqrt(self.head_dim)).masked_fill(masked, torch.finfo(x.dtype).min)
        return self.merge(scores.softmax(-1) @ v)


class Softcapped(Heads):
    """Gemma-2 style logit softcap: tanh(s / c) * c before the causal mask."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
        scores = torch.tanh(scores / 5.0) * 5.0
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
        return self.merge(scores.softmax(-1) @ v)


class GroupedQuery(nn.Module):
    """GQA with 4 query heads over 2 kv heads, repeated by repeat_interleave or expand+flatten."""

    def __init__(self, repeat="interleave"):
        super().__init__()
        self.repeat = repeat
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)  # [B, 4, N, 8]
        k, v = (t.view(b, n, 2, 8).transpose(1, 2) for t in self.kv(x).split(16, dim=2))  # [B, 2, N, 8]
        if self.repeat == "interleave":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        else:
            k = k[:, :, None].expand(b, 2, 2, n, 8).flatten(1, 2)
            v = v[:, :, None].expand(b, 2, 2, n, 8).flatten(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, n, 32))


class MultiQuery(nn.Module):
    """MQA: one kv head broadcast by matmul against 4 query heads."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)  # [B, 4, N, 8]
        k, v = (t[:, None] for t in self.kv(x).split(8, dim=2))  # [B, 1, N, 8]
        probs = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
        return (probs @ v).transpose(1, 2).reshape(b, n, 32)


class Documents(Heads):
    """Packed sequences: attention only within a document, given per-token document ids."""

    def forward(self, x, doc_ids):
        q, k, v = self.split(x)
        same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # [B, 1, N, N]
        scores = torch.where(same, q @ k.transpose(-2, -1) * 0.35, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class CrossAttention(Heads):
    """Queries from one sequence, keys and values from another, with the memory's padding mask."""

    def forward(self, x, memory, memory_keep):
        b, n, c = x.shape
        m = memory.shape[1]
        q = self.qkv(x)[..., :c].view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(b, m, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(memory)[..., c:].split(c, 2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~memory_keep[:, None, None, :], float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class Mha(nn.Module):
    """nn.MultiheadAttention, self or cross, with a key padding mask, weights not needed."""

    def __init__(self, batch_first=True, cross=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.cross, self.batch_first = cross, batch_first

    def forward(self, x, memory, padding):
        kv = memory if self.cross else x
        if not self.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        y = self.attn(x, kv, kv, key_padding_mask=padding if self.cross else None, need_weights=False)[0]
        return y if self.batch_first else y.transpose(0, 1)


class Alibi(Heads):
    """ALiBi: a per-head slope times the key distance, added to causal scores (a buffer of slopes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)]))

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        pos = torch.arange(n)
        distance = (pos[None, :] - pos[:, None]).float()  # [Nq, Nk]: j - i
        bias = self.slopes[:, None, None] * distance  # [H, Nq, Nk]
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + bias
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


def assert_same_function(optimized: nn.Module, original: nn.Module, x: torch.Tensor, atol=1e-5, rtol=1e-5):
    """``optimized(x)`` equals ``original(x)``, and so does the gradient of ``x`` through both for one random
    output gradient."""
    x = x.detach().requires_grad_(True)
    got, want = optimized(x), original(x)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               atol=atol, rtol=rtol)
