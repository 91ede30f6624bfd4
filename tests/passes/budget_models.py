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
