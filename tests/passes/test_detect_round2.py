"""Detection, round two: reshaped scores, other softmax spellings, masks that keep their structure.

Each rule has a positive case (found, classified with its structure, replaced, equal to the
original in float32 and a half dtype, eval and train with gradients) and a negative case (a
look-alike left alone, or a variant whose meaning differs).
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


# ------------------------------------------------------------------ models
class BmmViews(Heads):
    """MBart / PLBart: bmm on [B*H, N, D], scores viewed as [B, H, N, N] to add a float mask, viewed back."""

    def forward(self, x, mask):  # mask [B, 1, N, N] additive
        q, k, v = self.split(x)
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q * d**-0.5, k, v))  # [B*H, N, D]
        scores = torch.bmm(q, k.transpose(1, 2))  # [B*H, N, N]
        scores = scores.view(b, h, n, n) + mask
        probs = F.softmax(scores.view(b * h, n, n), dim=-1)
        return self.merge(torch.bmm(probs, v).view(b, h, n, d))


class BmmSoftmax4D(Heads):
    """bmm scores viewed to [B, H, N, N], masked and normalized there, probabilities viewed back for bmm."""

    def forward(self, x, keep):  # keep [B, N] bool
        q, k, v = self.split(x)
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        scores = scores.view(-1, h, n, n).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        probs = scores.softmax(-1)
        return self.merge(torch.bmm(probs.view(-1, n, n), v).view(b, h, n, d))


class PerHeadAcrossView(Heads):
    """A [B*H, N, N] additive term next to a [B, H] view: per (batch, head), left alone."""

    def forward(self, x, rel):  # rel [B*H, N, N]
        q, k, v = self.split(x)
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)) + rel
        scores = scores.view(b, h, n, n).softmax(-1)
        return self.merge(torch.bmm(scores.view(b * h, n, n), v).view(b, h, n, d))


class WindowView(Heads):
    """Swin: scores viewed as [B/nW, nW, H, N, N] to add a per-window mask: not read yet."""

    def forward(self, x, mask):  # x [B*nW, N, C], mask [nW, N, N]
        q, k, v = self.split(x)
        bw, h, n, _ = q.shape
        scores = q @ k.transpose(-2, -1) * 0.3
        scores = scores.view(bw // mask.shape[0], mask.shape[0], h, n, n) + mask[None, :, None]
        probs = scores.view(bw, h, n, n).softmax(-1)
        return self.merge(probs @ v)


class SafeSoftmax(Heads):
    """SDPA's math decomposition: scale split over q and k, an additive mask, ``aten._safe_softmax``."""

    def forward(self, x, mask):  # mask [B, 1, 1, N] additive, -inf on padded keys
        q, k, v = self.split(x)
        f = q.shape[-1] ** -0.25
        scores = (q * f) @ (k.transpose(-2, -1) * f) + mask
        return self.merge(torch.ops.aten._safe_softmax(scores, -1) @ v)


class DecomposedSoftmax(Heads):
    """softmax written out: ``exp(s - max(s)) / sum(exp(s - max(s)))``, with a causal -inf mask."""

    def __init__(self, reduce="amax"):
        super().__init__()
        self.reduce = reduce

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = q @ k.transpose(-2, -1) * 0.35
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        top = scores.amax(-1, keepdim=True) if self.reduce == "amax" else scores.max(dim=-1, keepdim=True)[0].detach()
        e = torch.exp(scores - top)
        return self.merge((e / e.sum(-1, keepdim=True)) @ v)


class UnstableSoftmax(Heads):
    """``exp(s) / sum(exp(s))`` without the max: overflows where softmax does not. Not a softmax."""

    def forward(self, x):
        q, k, v = self.split(x)
        e = torch.exp(q @ k.transpose(-2, -1))
        return self.merge((e / e.sum(-1, keepdim=True)) @ v)


class PackedDocuments(Heads):
    """Packed sequences: a [B, N, N] same-document mask, with causal or not, unsqueezed to [B, 1, N, N]."""

    def __init__(self, causal=True, spelling="index"):
        super().__init__()
        self.causal, self.spelling = causal, spelling

    def forward(self, x, doc):  # doc [B, N] document id of each token
        q, k, v = self.split(x)
        n = x.shape[1]
        keep = doc[:, :, None] == doc[:, None, :]  # [B, N, N]
        if self.causal:
            pos = torch.arange(n, device=x.device)
            keep = keep & (pos[None, :] <= pos[:, None])
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class LiftedDense(Heads):
    """A [B, N, N] mask of arbitrary values unsqueezed to [B, 1, N, N]: a dense mask, kept as one tensor."""

    def forward(self, x, keep):  # keep [B, N, N] bool
        q, k, v = self.split(x)
        scores = (q @ k.transpose(-2, -1)).masked_fill(~keep[:, None], float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class FiniteAdditive(Heads):
    """diffusers / x-transformers: a padding or causal mask that adds -10000 (not absorbing: kept as added)."""

    def __init__(self, what="padding"):
        super().__init__()
        self.what = what

    def forward(self, x, keep):  # keep [B, N] bool
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.what == "padding":
            scores = scores + (1.0 - keep[:, None, None, :].to(x.dtype)) * -10000.0
        else:
            scores = scores + torch.full((n, n), -10000.0, dtype=x.dtype).triu(1)
        return self.merge(scores.softmax(-1) @ v)


class AdditivePerKey(Heads):
    """The quickstart's padding: a float [B, N] mask (0 or -inf) added per key."""

    def forward(self, x, padding):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + padding[:, None, None, :]
        return self.merge(scores.softmax(-1) @ v)


class AlibiThenFill(Heads):
    """MPT: an ALiBi bias added, then causal and padding filled with finfo.min (or ``bias`` given as a float
    input of unknown range, after which a fill could not be told from a visible score)."""

    def __init__(self, bias_input=False):
        super().__init__()
        self.bias_input = bias_input
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)]))

    def forward(self, x, keep, bias=None):  # keep [B, N] bool
        q, k, v = self.split(x)
        n = x.shape[1]
        if not self.bias_input:
            bias = (self.slopes[:, None, None] * torch.arange(1 - n, 1)[None, None, :]).to(x.dtype)  # [H, 1, N]
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + bias
        masked = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1) | ~keep[:, None, None, :]
        scores = scores.masked_fill(masked, torch.finfo(x.dtype).min)
        return self.merge(scores.softmax(-1) @ v)


# ------------------------------------------------------------------ helpers
def keep_rows(b=2, n=12, padded=5):
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, :padded] = False
    return keep


def documents(b=2, n=12):
    return torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [0] * 7 + [1] * 5])[:b, :n]


def optimize_and_compare(model, args, dtype=torch.float32, train=False, tol=None):
    """The report of ``model`` optimized; its outputs (and gradients in training) equal the original's."""
    torch.manual_seed(0)
    model = model.to(dtype).train(train)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    tol = tol or (2e-5 if dtype == torch.float32 else 2e-2)
    original = copy.deepcopy(model)  # optimize rewrites the model in place: the original runs from its copy
    optimized = attnopt.optimize(model)
    if train:
        expected = original(*args)
        grads = torch.autograd.grad(expected.float().square().sum(), list(original.parameters()))
        got = optimized(*args)
        got_grads = torch.autograd.grad(got.float().square().sum(), list(optimized.parameters()))
        for g, e in zip(got_grads, grads):
            torch.testing.assert_close(g.float(), e.float(), atol=tol * 10, rtol=tol * 10)
    else:
        with torch.no_grad():
            expected, got = original(*args), optimized(*args)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol, equal_nan=True)
    return optimized.attnopt_report


def the_site(report, replaced=True):
    (site,) = report.sites
    assert site.replaced == replaced, str(report)
    return site


def additive_mask(b=2, n=12):
    mask = torch.zeros(b, 1, n, n)
    mask[1, :, :, :5] = torch.finfo(torch.float32).min
    mask[0, :, 3:, 8:] = -2.5
    return mask


# ------------------------------------------------------------------ 3. reshaped scores
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_bmm_scores_viewed_to_add_a_mask(dtype, train):
    report = optimize_and_compare(BmmViews(), (torch.randn(2, 12, 32), additive_mask()), dtype, train)
    site = the_site(report)
    assert site.q_heads == 4 and site.q_len == site.kv_len == 12
    assert site.mask_terms == ("dense",)


@pytest.mark.parametrize("train", [False, True])
def test_softmax_on_viewed_scores_keeps_key_padding(train):
    report = optimize_and_compare(BmmSoftmax4D(), (torch.randn(2, 12, 32), keep_rows(padded=12)), train=train)
    assert the_site(report).mask_terms == ("key_padding",)


def test_a_per_head_term_across_a_view_is_split_by_heads():
    report = optimize_and_compare(PerHeadAcrossView(), (torch.randn(2, 12, 32), torch.randn(8, 12, 12)))
    assert the_site(report).mask_terms == ("dense",)


def test_a_per_window_view_is_folded_into_the_batch():
    mask = torch.zeros(2, 12, 12)
    mask[1, :, 6:] = -100.0
    report = optimize_and_compare(WindowView(), (torch.randn(4, 12, 32), mask))
    assert the_site(report).mask_terms == ("dense",)


# ------------------------------------------------------------------ 4. softmax spellings
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("train", [False, True])
def test_safe_softmax_rows_of_minus_inf_are_zero(dtype, train):
    mask = torch.zeros(2, 1, 1, 12)
    mask[1] = float("-inf")  # every key of batch row 1: _safe_softmax gives 0 there, softmax NaN
    report = optimize_and_compare(SafeSoftmax(), (torch.randn(2, 12, 32), mask), dtype, train)
    assert the_site(report).mask_terms == ("key_padding",)  # a per-key float mask, added as written


@pytest.mark.parametrize("reduce", ["amax", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_decomposed_softmax(reduce, dtype, train):
    report = optimize_and_compare(DecomposedSoftmax(reduce), (torch.randn(2, 12, 32),), dtype, train)
    assert the_site(report).mask_terms == ("causal",)


def test_exp_over_sum_without_the_max_is_not_a_softmax():
    report = optimize_and_compare(UnstableSoftmax(), (torch.randn(2, 12, 32),))
    assert report.sites == []


# ------------------------------------------------------------------ packed documents
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_packed_documents_from_a_3d_mask(causal, dtype, train):
    report = optimize_and_compare(PackedDocuments(causal), (torch.randn(2, 12, 32), documents()), dtype, train)
    assert the_site(report).mask_terms == (("causal", "document") if causal else ("document",))


def test_a_lifted_mask_of_any_values_stays_dense():
    keep = torch.rand(2, 12, 12) > 0.3
    keep[:, torch.arange(12), torch.arange(12)] = True
    report = optimize_and_compare(LiftedDense(), (torch.randn(2, 12, 32), keep))
    assert the_site(report).mask_terms == ("dense",)


# ------------------------------------------------------------------ 5. finite masks keep their structure
@pytest.mark.parametrize("what, terms", [("padding", ("key_padding",)), ("causal", ("causal",))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("train", [False, True])
def test_a_finite_additive_mask_is_named_by_its_structure(what, terms, dtype, train):
    report = optimize_and_compare(FiniteAdditive(what), (torch.randn(2, 12, 32), keep_rows(padded=12)), dtype, train)
    site = the_site(report)
    assert site.mask_terms == terms
    assert any("-10000" in note and "added as written" in note for note in site.notes), site.notes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_alibi_before_a_finite_fill_keeps_causal(dtype, train):
    report = optimize_and_compare(AlibiThenFill(), (torch.randn(2, 12, 32), keep_rows()), dtype, train)
    site = the_site(report)
    assert site.mask_terms == ("causal", "key_padding", "bias")
    assert any("ALiBi" in note for note in site.notes)


def test_a_bias_of_unknown_range_before_a_finite_fill_is_left_alone():
    args = (torch.randn(2, 12, 32), keep_rows(), torch.randn(1, 4, 12, 12))
    report = optimize_and_compare(AlibiThenFill(bias_input=True), args)
    assert "finite masked_fill next to an additive mask" in the_site(report, replaced=False).reason


def test_a_per_key_float_mask_is_named_key_padding():
    padding = torch.zeros(2, 12)
    padding[1, :4] = float("-inf")
    report = optimize_and_compare(AdditivePerKey(), (torch.randn(2, 12, 32), padding))
    assert the_site(report).mask_terms == ("key_padding",)


def test_a_float_mask_per_query_and_key_stays_dense():
    mask = torch.randn(2, 1, 12, 12)
    report = optimize_and_compare(BmmViews(), (torch.randn(2, 12, 32), mask))
    assert the_site(report).mask_terms == ("dense",)


def test_a_small_finite_mask_is_not_named_a_mask():
    """-100 (Swin's fill) does not mask a key: the term is a bias of two values, reported dense."""

    class Small(FiniteAdditive):
        def forward(self, x, keep):
            q, k, v = self.split(x)
            scores = q @ k.transpose(-2, -1) + (1.0 - keep[:, None, None, :].to(x.dtype)) * -100.0
            return self.merge(scores.softmax(-1) @ v)

    report = optimize_and_compare(Small(), (torch.randn(2, 12, 32), keep_rows()))
    assert the_site(report).mask_terms == ("dense",)


def test_learned_bias_with_views_is_not_a_mask():
    class Learned(BmmViews):
        def __init__(self):
            super().__init__()
            self.rel = nn.Parameter(torch.randn(1, 4, 12, 12))

        def forward(self, x, mask):
            return super().forward(x, mask + self.rel)

    report = optimize_and_compare(Learned(), (torch.randn(2, 12, 32), torch.zeros(1, 4, 12, 12)), train=True)
    assert the_site(report).mask_terms == ("bias", "dense")


def test_viewed_scores_under_dynamic_shapes():
    """After a second length dynamo captures symbolic sizes: the [B*H] split is read for every length."""
    torch.manual_seed(0)
    model = BmmSoftmax4D().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    for n in (10, 13, 17):
        x, keep = torch.randn(3, n, 32), keep_rows(3, n, padded=3)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x, keep), original(x, keep), atol=2e-5, rtol=2e-5)
    report = optimized.attnopt_report
    assert report.graphs == 2 and all(s.replaced for s in report.sites), str(report)
    assert [s.mask_terms for s in report.sites] == [("key_padding",)] * 2
