"""Models for the memory-budget tests: causal attention that is sharply local, so approximations can be accurate."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharpCausal(nn.Module):
    """Causal attention with q = k = 3 h: each token attends mostly to itself (D = 32, 4 heads).

    ``softcap`` adds Gemma-2's tanh cap on the scores, which PyTorch SDPA cannot compute.
    """

    def __init__(self, dim: int = 128, heads: int = 4, softcap: float | None = None, max_len: int = 2048):
        super().__init__()
        self.heads, self.softcap = heads, softcap
        self.value = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        h = x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, H, N, D]
        q, k = h * 3.0, h * 3.0
        v = self.value(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        s = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~self.bias[:n, :n], float("-inf"))
        y = F.softmax(s, dim=-1) @ v  # [B, H, N, D]
        return y.transpose(1, 2).reshape(b, n, c)



class _Layer(nn.Module):
    """One attention layer as Hugging Face writes it: the scores live in ``forward``'s locals only."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, N, D]
        s = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5  # [B, H, N, N]
        if self.causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        if mask is not None:
            s = s + mask
        return x + (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, n, c)


class PaddedEncoder(nn.Module):
    """BERT-style attention: the ``[B, N]`` padding mask made once into an additive ``[B, 1, N, N]`` float
    mask (``where(keep, 0, finfo.min)``, as Hugging Face builds it), read by every layer."""

    def __init__(self, dim: int = 64, heads: int = 2, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, heads, causal=False) for _ in range(layers))

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        keep = attention_mask.bool()[:, None, None, :].expand(b, 1, n, n)
        mask = torch.where(keep, 0.0, torch.finfo(x.dtype).min)  # [B, 1, N, N]
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TrilCausal(nn.Module):
    """Causal attention whose mask is built in every layer's forward: ``~ones(n, n).tril()``."""

    def __init__(self, dim: int = 64, heads: int = 2, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, heads, causal=True) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
