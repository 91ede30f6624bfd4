"""Detection, round three: mask terms added to a view of the scores, read through layout steps.

A term added to ``[B*H, Nq, Nk]`` scores that the site views as ``[B, H, Nq, Nk]`` (BLOOM's ALiBi,
DeBERTa's relative terms) is split by ``H``; a per-window mask added to scores viewed as
``[B/nW, nW, H, N, N]`` (Swin's shifted windows) is folded into the batch. Each model is found,
classified, replaced, and equal to the original in float32 and bfloat16, eval and train with
gradients; look-alikes are left alone or computed as they are written.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt

from .models import Heads
from .test_detect_round2 import keep_rows, optimize_and_compare, the_site


# ------------------------------------------------------------------ models
def alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class BloomStyle(Heads):
    """ALiBi ``[B*H, 1, N]`` as the ``baddbmm`` input of ``[B*H, N, D]`` products, scores viewed to
    ``[B, H, N, N]`` for a causal + padding ``finfo.min`` mask, float32 softmax, probabilities viewed back.

    ``positions``: "constant" (slope x key index, the same for every row) or "padding" (slope x the
    cumulative count of kept keys, computed from the padding mask at run time)."""

    def __init__(self, positions="constant"):
        super().__init__()
        self.positions = positions
        self.register_buffer("slopes", alibi_slopes(self.heads))

    def forward(self, x, keep):  # keep [B, N] bool
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        q, k, v = (t.reshape(b * h, n, d) for t in self.split(x))  # [B*H, N, D]
        if self.positions == "constant":
            alibi = (self.slopes[:, None, None] * torch.arange(n, device=x.device)).repeat(b, 1, 1)  # [B*H, 1, N]
        else:
            where = (keep.cumsum(-1) - 1) * keep  # [B, N]
            alibi = (self.slopes[None, :, None] * where[:, None, :]).reshape(b * h, 1, n)
        scores = alibi.to(x.dtype).baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=1.0 / math.sqrt(d))
        min_value = torch.finfo(x.dtype).min
        visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & keep[:, None, None, :]  # [B, 1, N, N]
        mask = torch.zeros(visible.shape, dtype=x.dtype).masked_fill(~visible, min_value)
        weights = scores.view(b, h, n, n) + mask
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.bmm(probs.view(b * h, n, n), v)  # [B*H, N, D]
        return self.merge(out.view(b, h, n, d))


class DebertaStyle(Heads):
    """Disentangled attention: content-to-position and position-to-content scores gathered by relative
    distance into a ``[B*H, N, N]`` term added to ``bmm`` scores, viewed to ``[B, H, N, N]`` for a
    ``finfo.min`` fill of padded queries and keys, probabilities viewed back for the value product."""

    def __init__(self, span=4):
        super().__init__()
        self.span = span
        self.rel = nn.Parameter(torch.randn(2 * span, 32) * 0.5)
        self.pos_q, self.pos_k = nn.Linear(32, 32), nn.Linear(32, 32)

    def positional(self, proj, b):  # [B*H, 2 * span, D]
        p = proj(self.rel).view(2 * self.span, self.heads, self.head_dim).transpose(0, 1)
        return p.repeat(b, 1, 1)

    def forward(self, x, keep):  # keep [B, N] bool
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        q, k, v = (t.reshape(b * h, n, d) for t in self.split(x))
        scale = math.sqrt(d * 3)
        scores = torch.bmm(q, k.transpose(-1, -2) / scale)  # [B*H, N, N]
        pos = torch.arange(n, device=x.device)
        distance = (pos[:, None] - pos[None, :]).clamp(-self.span, self.span - 1) + self.span  # [N, N]
        index = distance[None].expand(b * h, n, n)
        c2p = torch.bmm(q, self.positional(self.pos_k, b).transpose(-1, -2))  # [B*H, N, 2 span]
        c2p = torch.gather(c2p, -1, index)
        p2c = torch.bmm(k, self.positional(self.pos_q, b).transpose(-1, -2))
        p2c = torch.gather(p2c, -1, index).transpose(-1, -2)
        scores = scores + (c2p + p2c) / scale
        scores = scores.view(-1, h, n, n)
        pair = keep[:, None, :, None] & keep[:, None, None, :]  # [B, 1, N, N]: padded queries see nothing
        scores = scores.masked_fill(~pair, torch.finfo(x.dtype).min)
        probs = scores.softmax(-1)
        out = torch.bmm(probs.view(-1, n, n), v)
        return self.merge(out.view(b, h, n, d))


def window_regions(windows=4, n=9) -> torch.Tensor:
    """Region ids of each token of each window after a cyclic shift: ``[nW, N]``."""
    ids = torch.zeros(windows, n, dtype=torch.long)
    ids[1, 6:] = 1
    ids[2, 2::3] = 2
    ids[3, :4], ids[3, 4:] = 3, 4
    return ids


def shift_mask(windows=4, n=9) -> torch.Tensor:
    """Swin's mask: -100 between tokens of different regions of a window, ``[nW, N, N]``."""
    ids = window_regions(windows, n)
    return torch.zeros(windows, n, n).masked_fill(ids[:, :, None] != ids[:, None, :], -100.0)


class SwinStyle(Heads):
    """Window attention: a learned relative bias per head, scores ``[B*nW, H, N, N]`` viewed as
    ``[B, nW, H, N, N]`` for the per-window shift mask, viewed back. ``order``: "batch" (windows of an image
    are consecutive, as Swin partitions them) or "window" (the view puts windows first: the same mask
    then reaches other rows, which the replacement must reproduce as written)."""

    def __init__(self, windows=4, n=9, buffer=True, order="batch"):
        super().__init__()
        self.windows, self.order = windows, order
        self.bias = nn.Parameter(torch.randn(self.heads, n, n) * 0.3)
        if buffer:
            self.register_buffer("attn_mask", shift_mask(windows, n))
        else:
            self.attn_mask = None

    def forward(self, x, mask=None):  # x [B*nW, N, C]
        mask = self.attn_mask if mask is None else mask  # [nW, N, N]
        q, k, v = self.split(x)  # [B*nW, H, N, D]
        bw, h, n, _ = q.shape
        nw = self.windows
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + self.bias.unsqueeze(0)
        if self.order == "batch":
            scores = scores.view(bw // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0).to(x.dtype)
        else:
            scores = scores.view(nw, bw // nw, h, n, n) + mask[:, None, None].to(x.dtype)
        probs = scores.view(-1, h, n, n).softmax(-1)
        return self.merge(probs @ v)


class HeadSplitView(Heads):
    """A look-alike of the per-window view that splits the heads, not the batch: left alone."""

    def forward(self, x, mask):  # mask [2, N, N]
        q, k, v = self.split(x)
        b, h, n, _ = q.shape
        scores = q @ k.transpose(-2, -1) * 0.3
        scores = scores.view(b, 2, h // 2, n, n) + mask[None, :, None]
        return self.merge(scores.view(b, h, n, n).softmax(-1) @ v)


class FlatWindowView(Heads):
    """Scores viewed as ``[B, nW, H, N*N]`` with a flattened window mask: not a view of the site's scores."""

    def forward(self, x, mask):  # x [B*nW, N, C], mask [nW, N, N]
        q, k, v = self.split(x)
        bw, h, n, _ = q.shape
        nw = mask.shape[0]
        scores = (q @ k.transpose(-2, -1)).view(bw // nw, nw, h, n * n) + mask.reshape(1, nw, 1, n * n)
        return self.merge(scores.view(bw, h, n, n).softmax(-1) @ v)


# ------------------------------------------------------------------ helpers
DTYPES = [torch.float32, torch.bfloat16]


def padded(b=2, n=12, pad=4):
    keep = keep_rows(b, n, pad)
    keep[0, -2:] = False  # right padding in row 0, left padding in row 1
    return keep


def windows_input(images=2, windows=4, n=9):
    return torch.randn(images * windows, n, 32)


# ------------------------------------------------------------------ BLOOM: ALiBi on [B*H, 1, N]
@pytest.mark.parametrize("positions", ["constant", "padding"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_bloom_alibi_is_split_by_heads_and_keeps_causal(positions, dtype, train):
    report = optimize_and_compare(BloomStyle(positions), (torch.randn(2, 12, 32), padded()), dtype, train)
    site = the_site(report)
    assert site.q_heads == 4 and site.q_len == site.kv_len == 12
    assert site.mask_terms[:2] == ("causal", "key_padding")
    if positions == "constant":
        assert site.mask_terms == ("causal", "key_padding", "bias")
        assert any("ALiBi" in note for note in site.notes), site.notes
    else:  # slopes x a run-time position: ALiBi, added as written
        assert site.mask_terms == ("causal", "key_padding", "bias")


def test_bloom_alibi_matches_a_float64_oracle():
    """The replacement against the model run in float64: ALiBi reaches each head with its own slope.
    (Right padding only: a row with no visible key is NaN in float64, whose finfo.min is -inf in float32.)"""
    torch.manual_seed(1)
    model = BloomStyle("constant").eval()
    x, keep = torch.randn(3, 10, 32), torch.ones(3, 10, dtype=torch.bool)
    keep[0, -3:] = keep[2, -1:] = False
    reference = copy.deepcopy(model).double()
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        got = optimized(x, keep)
        expected = reference(x.double(), keep)
    assert the_site(optimized.attnopt_report).replaced
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ DeBERTa: relative terms on [B*H, N, N]
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_deberta_relative_terms_are_split_by_heads(dtype, train):
    keep = padded()
    keep[1] = False  # a batch row with no token: every row averages all keys, as finfo.min gives
    report = optimize_and_compare(DebertaStyle(), (torch.randn(2, 12, 32), keep), dtype, train)
    site = the_site(report)
    assert "bias" in site.mask_terms
    assert site.q_heads == 4


# ------------------------------------------------------------------ Swin: per-window masks
@pytest.mark.parametrize("buffer", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_swin_window_mask_is_folded_into_the_batch(buffer, dtype, train):
    model = SwinStyle(buffer=buffer)
    args = (windows_input(),) if buffer else (windows_input(), shift_mask())
    report = optimize_and_compare(model, args, dtype, train)
    site = the_site(report)
    assert site.mask_terms == ("bias", "dense")
    assert site.q_heads == 4 and site.q_len == 9


def test_swin_windows_first_is_computed_as_written():
    """A view that puts windows first sends the mask to other rows: the replacement reproduces that, and the
    output differs from the batch-first model's (the test would notice a fold in the wrong order)."""
    torch.manual_seed(0)
    first, written = SwinStyle(order="batch").eval(), SwinStyle(order="window").eval()
    written.load_state_dict(first.state_dict())
    x = windows_input(images=3)
    with torch.no_grad():
        assert not torch.allclose(first(x), written(x), atol=1e-3)
    report = optimize_and_compare(written, (x,))
    assert the_site(report).replaced


def test_swin_window_mask_under_a_changing_batch():
    """After a second batch size dynamo captures a symbolic batch: the fold reads it at run time."""
    torch.manual_seed(0)
    model = SwinStyle().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    for images in (1, 2, 3):
        x = windows_input(images)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), original(x), atol=2e-5, rtol=2e-5)
    report = optimized.attnopt_report
    assert report.sites and all(s.replaced for s in report.sites), str(report)


# ------------------------------------------------------------------ look-alikes
def test_a_view_that_splits_heads_is_left_alone():
    mask = torch.zeros(2, 12, 12)
    mask[1, :, 6:] = -100.0
    report = optimize_and_compare(HeadSplitView(), (torch.randn(2, 12, 32), mask))
    assert "views are read" in the_site(report, replaced=False).reason


def test_a_term_on_a_view_that_is_not_of_the_scores_is_left_alone():
    report = optimize_and_compare(FlatWindowView(), (windows_input(), shift_mask()))
    assert "views are read" in the_site(report, replaced=False).reason


# ------------------------------------------------------------------ real models (random weights, no download)
def _bloom(transformers):
    config = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, attn_implementation="eager")
    ids, mask = torch.randint(0, 100, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    return transformers.BloomModel(config), dict(input_ids=ids, attention_mask=mask)


def _deberta(transformers):
    config = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=16, position_buckets=8)
    ids, mask = torch.randint(0, 100, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return transformers.DebertaV2Model(config), dict(input_ids=ids, attention_mask=mask)


def _swin(transformers):
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                     window_size=4, attn_implementation="eager")
    return transformers.SwinModel(config), dict(pixel_values=torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("build", ["_bloom", "_deberta", "_swin"])
def test_real_models_are_replaced_and_exact(build):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = globals()[build](transformers)
    model.eval()
    reference = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        got, expected = optimized(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    report = optimized.attnopt_report
    assert len(report.sites) == 2 and all(s.replaced for s in report.sites), str(report)
    if build == "_bloom":
        assert all(s.mask_terms[:2] == ("causal", "key_padding") for s in report.sites), str(report)


