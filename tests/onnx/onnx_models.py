"""Hand-written attention models for the ONNX pipelines, and tiny Hugging Face models."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Projections to ``[B, H, N, D]`` with ``kv_heads`` key/value heads (GQA when fewer than ``heads``)."""

    def __init__(self, dim=32, heads=4, kv_heads=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def qkv(self, x, memory=None):
        b, n, _ = x.shape
        src = x if memory is None else memory
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, Nq, D]
        k, v = self.kv(src).view(b, src.shape[1], 2, self.kv_heads, self.head_dim).unbind(2)
        return q, k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, Nk, D]

    def merge(self, y):
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * d))


class CausalPaddedGQA(Block):
    """Llama-like eager attention: repeat_kv GQA, causal + key padding as one finfo.min additive mask."""

    def __init__(self):
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x)
        group = self.heads // self.kv_heads
        b, h, n, d = k.shape
        k = k[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)
        v = v[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)
        i = torch.arange(n, device=x.device)
        keep = (i[None, :] <= i[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        scores = q @ k.transpose(2, 3) / math.sqrt(d) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(probs @ v)


class CrossWithBias(Block):
    """T5-like cross attention: a learned [1, H, Nq, Nk]-broadcast bias, key padding, no scale."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x, memory, memory_mask):
        q, k, v = self.qkv(x, memory)
        bias = self.rel * torch.arange(memory.shape[1], dtype=x.dtype)  # [1, H, 1, Nk]
        scores = torch.matmul(q, k.transpose(3, 2)) + bias
        scores = scores.masked_fill(~memory_mask[:, None, None, :], float("-inf"))
        return self.merge(torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v)


class SDPABlock(Block):
    """SDPA: causal, with a bool mask, GQA, or a sliding window built from aranges."""

    def __init__(self, mode="causal"):
        super().__init__(heads=4, kv_heads=2 if mode == "gqa" else None)
        self.mode = mode

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        if self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.mode == "gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # window of 3 keys back, causal
            i = torch.arange(x.shape[1], device=x.device)
            rel = i[None, :] - i[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(rel <= 0) & (rel >= -3))
        return self.merge(y)


class Softcapped(Block):
    """Gemma-2-like: scores capped by ``c * tanh(s / c)`` before a causal -inf mask."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        scores = torch.tanh(scores / 20.0) * 20.0
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class FillPadded(Block):
    """Key padding by masked_fill with ``fill``: -inf gives NaN rows, finfo.min the mean of the values."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        scores = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).masked_fill(~keep[:, None, None, :], self.fill)
        return self.merge(scores.softmax(-1) @ v)


class CausalFillThenPadding(Block):
    """GPT-2 eager: ``where(causal, s, finfo.min)``, then ``+ (1 - keep) * finfo.min``."""

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        n, low = x.shape[1], torch.finfo(x.dtype).min
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.full([], low, dtype=x.dtype))
        scores = scores + (1.0 - keep[:, None, None, :].to(x.dtype)) * low
        return self.merge(scores.softmax(-1) @ v)


class BottomRightCausal(Block):
    """Causal with a KV-cache alignment: the last query sees the last key (rows die when Nq > Nk)."""

    def forward(self, x, memory):
        q, k, v = self.qkv(x, memory)
        nq, nk = x.shape[1], memory.shape[1]
        keep = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class Dropout(Block):
    """Dropout on the probabilities (active in training mode)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        probs = F.dropout((q @ k.transpose(-2, -1)).softmax(-1), p=0.1, training=self.training)
        return self.merge(probs @ v)


def tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _eager(LlamaModel(config))


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return _eager(BertModel(config, add_pooling_layer=False))


def tiny_t5():
    from transformers import T5Config, T5Model

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=4, relative_attention_num_buckets=8)
    return _eager(T5Model(config))


def tiny_bart():
    from transformers import BartConfig, BartModel

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64)
    return _eager(BartModel(config))


class Outputs(nn.Module):
    """A Hugging Face model returning only its first output tensor (no cache objects)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids=None):
        extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        return out[0]


def _eager(model):
    torch.manual_seed(0)
    model.config._attn_implementation = "eager"
    model.config.use_cache = False
    return Outputs(model).eval()
