"""Detection, round four: the last mask families keep their structure.

GPT-2's ``where(causal, s, finfo.min) + padding``: the band replaced by ``m = finfo.min``, the key padding
adding ``m``. A key hidden by one of them scores ``m``, by both ``m + m = -inf``: a row with no visible key
averages the keys hidden by exactly one (NaN when both hide every key), and its gradient reaches q and k
through the band's keys only. That is ``Fill.FINITE_REPLACED_ADDED``, computed by every kernel through
``kernels/fills.py``; where it would not be exact (float16, a fill that is not the dtype's minimum, a mask of
data values, a condition that is not a band) the site is left alone with the reason.

Padding masks that used to read ``dense``: MPT casts its 0 / finfo.min mask back to bool, BLOOM computes its
ALiBi from the padding mask at run time, DeBERTa multiplies key and query padding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import registry
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from attnopt.passes import plan

from .models import Heads
from .test_detect_round2 import optimize_and_compare, the_site


# ------------------------------------------------------------------ models
class FillThenAdd(Heads):
    """GPT-2 eager: ``where(causal, s, finfo.min)`` then ``+ (1 - keep) * finfo.min``.

    ``spelling``: "gpt2" (a ``tril`` buffer, a float mask from bool), "inductor" (torch.full fill and scale, the
    key permuted, ``where(keep, 0, min)``), "window" (a sliding causal window), "data" (the mask a float input),
    "finite" (a fill of -1e9), "dense" (the condition a bool input), "twice" (a second fill after the add)."""

    def __init__(self, spelling="gpt2", n=12):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("bias", torch.ones(n, n, dtype=torch.bool).tril()[None, None])

    def forward(self, x, keep, extra=None):  # keep [B, N] bool
        q, k, v = self.split(x)  # [B, H, N, D]
        n, dtype = x.shape[1], x.dtype
        low = torch.finfo(dtype).min
        if self.spelling == "inductor":
            scores = torch.matmul(q, k.permute(0, 1, 3, 2)).div(torch.full([], math.sqrt(self.head_dim), dtype=dtype))
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        cond = self.bias[:, :, :n, :n]
        if self.spelling == "window":
            cond = cond & ~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-4)
        if self.spelling == "dense":
            cond = extra
        fill = -1e9 if self.spelling == "finite" else low
        scores = torch.where(cond, scores, torch.full([], fill, dtype=dtype, device=x.device))
        if self.spelling == "data":
            mask = extra
        elif self.spelling == "inductor":
            mask = torch.where(keep[:, None, None, :], 0.0, low).to(dtype)
        else:
            mask = (1.0 - keep[:, None, None, :].to(dtype)) * low
        scores = scores + mask
        if self.spelling == "twice":
            scores = scores.masked_fill(~keep[:, None, :, None], low)
        return self.merge(scores.softmax(-1).type(v.dtype) @ v)


class UpcastFillThenAdd(Heads):
    """Half inputs, the scores cast to float32 before ``where(causal, s, finfo(float32).min) + mask``."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        n = x.shape[1]
        low = torch.finfo(torch.float32).min
        scores = (q @ k.transpose(-2, -1)).float() * self.head_dim**-0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, low) + (1.0 - keep[:, None, None, :].float()) * low
        return self.merge(scores.softmax(-1).to(v.dtype) @ v)


def padded_rows(b=3, n=12):
    """Right padding in row 0, left padding in row 1 (its first rows see only padded causal keys), none in 2."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, -3:] = False
    keep[1, :5] = False
    return keep


# ------------------------------------------------------------------ 1. GPT-2's replaced fill, then an added one
@pytest.mark.parametrize("spelling, terms", [("gpt2", ("causal", "key_padding")),
                                             ("inductor", ("causal", "key_padding")),
                                             ("window", ("causal", "window", "key_padding"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_a_replaced_fill_then_an_added_padding_is_replaced_exactly(spelling, terms, dtype, train):
    report = optimize_and_compare(FillThenAdd(spelling), (torch.randn(3, 12, 32), padded_rows()), dtype, train)
    site = the_site(report)
    assert site.mask_terms == terms
    assert any("hidden by only one" in note for note in site.notes), site.notes


def test_a_fully_padded_batch_row_averages_the_band_and_matches_float64():
    """Every key of batch row 1 padded: each row averages its causal keys (masked once), never NaN; the
    reference kernel equals the model run in float64 (where finfo.min is float64's), gradients too."""
    torch.manual_seed(0)
    model = FillThenAdd().train()
    x, keep = torch.randn(2, 12, 32, dtype=torch.float64), torch.ones(2, 12, dtype=torch.bool)
    keep[1] = False
    keep[0, :2] = False
    reference = copy.deepcopy(model).double()
    optimized = attnopt.optimize(model.double(), kernel="reference")
    got, expected = optimized(x, keep), reference(x, keep)
    assert not got.isnan().any() and the_site(optimized.attnopt_report).replaced
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    weights = dict(reference.named_parameters())
    for (name, g), e in zip(
        zip(dict(optimized.named_parameters()), torch.autograd.grad(got.square().sum(), list(optimized.parameters()))),
        torch.autograd.grad(expected.square().sum(), list(weights.values())),
    ):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_half_inputs_with_float32_scores_are_replaced(train):
    report = optimize_and_compare(UpcastFillThenAdd(), (torch.randn(3, 12, 32), padded_rows()), torch.float16, train)
    assert the_site(report).mask_terms == ("causal", "key_padding")


@pytest.mark.parametrize("spelling, extra, reason", [
    ("gpt2", None, "float16"),
    ("data", "float", "values are data"),
    ("finite", None, "exact only for a fill of finfo.min"),
    ("dense", "bool", "causal or sliding-window cond only"),
    ("twice", None, "before and after an additive mask"),
])
def test_a_replaced_fill_then_an_added_mask_that_is_not_exact_is_left_alone(spelling, extra, reason):
    dtype = torch.float16 if reason == "float16" else torch.float32
    args = [torch.randn(3, 12, 32), padded_rows()]
    if extra == "float":
        args.append(torch.where(padded_rows()[:, None, None, :], 0.0, torch.finfo(torch.float32).min))
    elif extra == "bool":
        args.append(torch.rand(1, 1, 12, 12) > 0.3)
    report = optimize_and_compare(FillThenAdd(spelling), tuple(args), dtype)
    assert reason in the_site(report, replaced=False).reason


def test_dropout_after_a_replaced_then_added_fill_keeps_the_originals_distribution():
    """The rows of batch row 1 before its first kept key see no key: the original drops out their uniform
    softmax over the band's keys and the kept keys. The replaced site does the same (kernels/fills.py): over
    many draws those rows spread and average as the original's do."""
    class Dropped(FillThenAdd):
        def forward(self, x, keep):
            q, k, v = self.split(x)
            low = torch.finfo(x.dtype).min
            scores = torch.where(self.bias, q @ k.transpose(-2, -1), low) + (1.0 - keep[:, None, None, :].float()) * low
            return self.merge(torch.nn.functional.dropout(scores.softmax(-1), 0.3, self.training) @ v)

    torch.manual_seed(0)
    model = Dropped().train()
    original = copy.deepcopy(model)
    x, keep = torch.randn(3, 12, 32), padded_rows()
    optimized = attnopt.optimize(model, kernel="reference")
    draws = 300
    with torch.no_grad():
        got = torch.stack([optimized(x, keep)[1, :5] for _ in range(draws)])  # the rows without a key
        want = torch.stack([original(x, keep)[1, :5] for _ in range(draws)])
    site = the_site(optimized.attnopt_report)
    assert site.replaced and site.mask_terms == ("causal", "key_padding"), site
    got_std, want_std = got.std(0).mean(), want.std(0).mean()
    assert want_std > 0.05, want_std  # the original's rows vary with the draw
    assert 0.8 * want_std < got_std < 1.25 * want_std, (got_std, want_std)
    spread = ((got.var(0) + want.var(0)) / draws).sqrt()  # of the difference of the two means, per element
    assert ((got.mean(0) - want.mean(0)).abs() <= 5 * spread + 1e-4).all()  # 5 sigma over 160 elements


# ------------------------------------------------------------------ the fill in the kernels, against autograd
def written(q, k, v, band, keep, scale, softcap):
    """The original's arithmetic: ``where(band, s, m) + (1 - keep) * m``, softmax, values."""
    low = torch.finfo(q.dtype).min
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(band, s, low) + (1.0 - keep[:, None, None, :].to(q.dtype)) * low
    return s.softmax(-1) @ v


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_kernels_compute_the_fill_and_its_gradients(kernel, data):
    """Random lengths, alignments, windows, GQA and padding (rows masked once, twice, or not at all) in float64:
    outputs and dq, dk, dv equal autograd through the written arithmetic, NaN rows included."""
    n_q, n_k = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    align = data.draw(st.sampled_from([Align.TOP_LEFT, Align.BOTTOM_RIGHT]))
    window = data.draw(st.sampled_from([None, Window(2, 0), Window(None, 1)]))
    causal = window is None or data.draw(st.booleans())
    kv_heads, group = data.draw(st.sampled_from([(2, 1), (1, 2)]))
    softcap = data.draw(st.sampled_from([None, 3.0]))
    keep = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n_k, max_size=n_k), min_size=2,
                                           max_size=2)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    q = torch.randn(2, kv_heads * group, n_q, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, n_k, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in "kv")
    spec = AttentionSpec.from_tensors(q, k, v, scale=0.7, causal=causal, align=align, window=window, key_padding=keep,
                                      softcap=softcap, fill=Fill.FINITE_REPLACED_ADDED)
    spec.validate()
    chosen = registry.get(kernel)
    assume(not chosen.not_supported_reasons(spec))  # SDPA takes no softcap
    band = spec.with_(key_padding=None, fill=Fill.NEG_INF).keep_tile(0, n_q, 0, n_k)  # [1, 1, Nq, Nk]
    rep = (lambda t: t.repeat_interleave(group, dim=1))
    expected = written(q, rep(k), rep(v), band, keep, 0.7, softcap)
    grad_out = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out, lse = chosen.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, expected.detach(), atol=1e-9, rtol=1e-9, equal_nan=True)
    got = chosen.backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    for g, e in zip(got[:3], grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_the_fill_without_padding_is_the_uniform_row_and_with_documents_not_supported():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    kernel = registry.get("reference")
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT, fill=Fill.FINITE_REPLACED_ADDED)
    out, _ = kernel.forward(q, k, v, spec, 0)  # row 0 sees no key: every key replaced, so all count
    uniform, _ = kernel.forward(q, k, v, spec.with_(fill=Fill.FINITE), 0)
    torch.testing.assert_close(out, uniform)
    torch.testing.assert_close(out[:, :, 0], v.mean(2))
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="not supported yet"):
        kernel.forward(q, k, v, spec.with_(q_doc=ids, kv_doc=ids[:, :4]), 0)


# ------------------------------------------------------------------ 2. padding masks that read dense
def _mpt(transformers):
    config = transformers.MptConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, max_seq_len=32,
                                    attn_implementation="eager")
    return transformers.MptModel(config)


def _bloom(transformers):
    config = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=4, attn_implementation="eager")
    return transformers.BloomModel(config)


def _deberta(transformers):
    config = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=16, position_buckets=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.DebertaV2Model(config)


def _padded_call(build, dtype, padding, train):
    """An HF model, its deep copy, the attnopt-optimized model and the inputs: right padding in row 0, then left
    padding in row 1 and a row with no token ("left and fully") or none ("right")."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = globals()[build](transformers).to(dtype).train(train)
    ids, mask = torch.randint(0, 100, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    if padding == "left and fully":
        mask[1, :3], mask[2] = 0, 0
    reference = copy.deepcopy(model)
    return reference, attnopt.optimize(model), dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("build, terms, note", [("_mpt", ("causal", "key_padding", "bias"), "ALiBi"),
                                                ("_bloom", ("causal", "key_padding", "bias"), "run time"),
                                                ("_deberta", ("key_padding", "bias"), "padded queries")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["right", "left and fully"])
def test_real_padding_masks_are_named_and_exact(build, terms, note, dtype, padding):
    reference, optimized, inputs = _padded_call(build, dtype, padding, train=False)
    with torch.no_grad():
        got, expected = optimized(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    site = the_site(optimized.attnopt_report)
    assert site.mask_terms == terms
    assert any(note in n for n in site.notes), site.notes


@pytest.mark.parametrize("build", ["_mpt", "_bloom", "_deberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_padding_mask_gradients(build, dtype):
    """Every weight's gradient against the original's, on the scale of the largest gradient of the model:
    some weights' gradients vanish by softmax's shift invariance (DeBERTa's position-projection biases,
    ~1e-27 in float64), so each on its own scale would compare rounding noise. Float64 shows exactness
    (DeBERTa's in-place sum of its relative terms once counted one of them twice, invisible in float32)."""
    reference, optimized, inputs = _padded_call(build, dtype, "right" if dtype == torch.float64 else "left and fully",
                                                train=True)
    got, expected = optimized(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
    got_grads = torch.autograd.grad(got.square().sum(), list(optimized.parameters()), allow_unused=True)
    grads = torch.autograd.grad(expected.square().sum(), list(reference.parameters()), allow_unused=True)
    scale = max(float(e.abs().max()) for e in grads if e is not None)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for (name, _), g, e in zip(optimized.named_parameters(), got_grads, grads):
        assert (g is None) == (e is None), name
        if g is not None:
            assert float((g - e).abs().max()) <= tol * scale, name


class CausalRouter(torch.nn.Module):
    """Not attention: a causal ``where`` then an added padding mask on a router's logits (no q @ k^T), whose
    softmax weights a sum over experts."""

    def __init__(self, n=12, experts=12, subtracted=False):
        super().__init__()
        self.subtracted = subtracted  # the padding subtracted as a penalty, and the logits' max taken off first
        self.gate = torch.nn.Linear(32, experts)
        self.register_buffer("allowed", torch.ones(n, experts, dtype=torch.bool).tril())

    def forward(self, x, keep, values):
        low = torch.finfo(x.dtype).min
        logits = self.gate(x)
        if self.subtracted:
            logits = logits - logits.amax(-1, keepdim=True)
        logits = torch.where(self.allowed, logits, torch.full([], low, dtype=x.dtype))
        if self.subtracted:
            return (logits - (~keep[:, None, :]).to(x.dtype) * 1e4).softmax(-1) @ values
        logits = logits + (1.0 - keep[:, None, :].to(x.dtype)) * low
        return logits.softmax(-1) @ values


@pytest.mark.parametrize("subtracted", [False, True])
def test_a_router_with_the_same_masks_is_not_attention(subtracted):
    torch.manual_seed(0)
    model = CausalRouter(subtracted=subtracted).eval()
    x, keep, values = torch.randn(2, 12, 32), padded_rows(2, 12), torch.randn(2, 12, 16)
    optimized = attnopt.optimize(copy.deepcopy(model))
    torch.testing.assert_close(optimized(x, keep, values), model(x, keep, values), equal_nan=True)
    assert not any(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)


# ------------------------------------------------------------------ terms subtracted from the scores
class Subtracted(Heads):
    """A term subtracted from the scores (``scores - term``, ``torch.sub(..., alpha=)``, ``Tensor.sub``).

    ``spelling``: "alibi" (``- slopes * |i - j|`` from a slopes buffer, then a causal fill), "mask" (``- keep_not *
    1e4``: a key padding as a penalty), "alpha" (``torch.sub(scores, bias, alpha=0.5)`` of a bias input),
    "method" (``scores.sub(bias)``), "reversed" (``bias - scores``: the scores' sign flips, not attention)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, self.heads + 1, dtype=torch.float32))

    def forward(self, x, keep, bias):  # keep [B, N] bool, bias [B, H, N, N]
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.spelling == "alibi":
            i = torch.arange(n, device=x.device)
            distance = (i[None, :] - i[:, None]).abs().to(x.dtype)
            scores = scores - self.slopes.to(x.dtype)[:, None, None] * distance
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        elif self.spelling == "mask":
            scores = scores - (~keep)[:, None, None, :].to(x.dtype) * 1e4
        elif self.spelling == "alpha":
            scores = torch.sub(scores, bias, alpha=0.5)
        elif self.spelling == "method":
            scores = scores.sub(bias)
        elif self.spelling == "integer":
            scores = scores - (~keep)[:, None, None, :].long() * 100000
        elif self.spelling in ("-inf subtracted", "+inf added"):  # +inf where keep is False: NaN in the original
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            if self.spelling == "-inf subtracted":
                scores = scores - torch.where(keep[:, None, None, :], 0.0, float("-inf"))
            else:
                scores = scores + torch.where(keep[:, None, None, :], 0.0, float("inf"))
        else:
            scores = bias - scores
        return self.merge(scores.softmax(-1) @ v)


@pytest.mark.parametrize("spelling", ["alibi", "mask", "alpha", "method"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_a_term_subtracted_from_the_scores_is_replaced_exactly(spelling, dtype, train):
    torch.manual_seed(1)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, :4] = False
    bias = torch.randn(2, 4, 12, 12)
    report = optimize_and_compare(Subtracted(spelling), (torch.randn(2, 12, 32), keep, bias), dtype, train)
    site = the_site(report)
    if spelling == "alibi":
        assert site.causal and "bias" in site.mask_terms and any("ALiBi" in note for note in site.notes), site


@pytest.mark.parametrize("spelling, reason", [("reversed", "sign flips"), ("-inf subtracted", "adds +inf"),
                                              ("+inf added", "adds +inf")])
def test_scores_subtracted_from_a_term_or_given_plus_inf_are_left_alone(spelling, reason):
    """``term - scores`` is not attention; a term adding +inf makes the original's scores NaN where it does, also
    under the causal fill's -inf (-inf + inf), which the kernels, applying masks as masks, would not."""
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, -3:] = False
    report = optimize_and_compare(Subtracted(spelling), (torch.randn(2, 12, 32), keep, torch.randn(2, 4, 12, 12)))
    site = the_site(report, replaced=False)
    assert reason in site.reason


@pytest.mark.parametrize("train", [False, True])
def test_mpt_under_dynamic_shapes_keeps_its_alibi_bound(train):
    """MPT slices its constant ALiBi tensor by the sequence's length. Under dynamic shapes that slice is symbolic,
    so it is no constant; its values are still the constant's, bounded far above the padding's finfo.min fill, so
    the fill stays exact and the site is replaced in the graph with symbolic shapes too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = _mpt(transformers).train(train)
    optimized = attnopt.optimize(copy.deepcopy(reference))
    for n in (10, 14, 20):
        ids, mask = torch.randint(0, 100, (3, n)), torch.ones(3, n, dtype=torch.long)
        mask[0, n - 3:], mask[1, :3], mask[2, : n - 1] = 0, 0, 0
        with torch.set_grad_enabled(train):
            got = optimized(input_ids=ids, attention_mask=mask).last_hidden_state
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        if train:
            got_grads = torch.autograd.grad(got.square().sum(), list(optimized.parameters()), allow_unused=True)
            grads = torch.autograd.grad(expected.square().sum(), list(reference.parameters()), allow_unused=True)
            for g, e in zip(got_grads, grads):
                if e is not None:
                    torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    report = optimized.attnopt_report
    assert report.graphs >= 2 and all(site.replaced for site in report.sites), str(report)
    assert all(site.mask_terms[:2] == ("causal", "key_padding") for site in report.sites), str(report)


class BoundedBias(Heads):
    """A constant bias reached through steps before a causal ``finfo.min`` fill, called at several lengths.

    ``spelling``: "slice" (the constant sliced by the length: bounded, the site replaced), "copy written" (a copy of
    the constant with -inf written into key 0), "transposed copy written" (``clone().mT`` written likewise), "bits"
    (a float64 constant of finite values viewed as float32, which holds -inf in every even key)."""

    def __init__(self, spelling, longest=40):
        super().__init__()
        self.spelling = spelling
        i = torch.arange(longest)
        self.register_buffer("alibi", -(2.0 ** -torch.arange(1.0, self.heads + 1))[:, None, None]
                             * (i[None, :] - i[:, None]).abs())
        bits = torch.full((self.heads, longest, longest // 2), 0x3FF00000FF800000, dtype=torch.int64)
        self.register_buffer("packed", bits.view(torch.float64))  # every value 1.0000000037

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.spelling == "bits":
            bias = self.packed[:, :n, : n // 2].view(torch.float32)
        elif self.spelling == "slice":
            bias = self.alibi[:, :n, :n]
        else:
            bias = self.alibi[:, :n, :n].repeat_interleave(1, dim=0)
            if self.spelling == "transposed copy written":
                bias = bias.clone().mT
            bias[:, :, 0] = float("-inf")
        scores = (scores + bias).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(),
                                             torch.finfo(scores.dtype).min)
        return self.merge(scores.softmax(-1) @ v)


@pytest.mark.parametrize("spelling, replaced", [("slice", True), ("copy written", False),
                                                ("transposed copy written", False), ("bits", False)])
def test_a_bias_is_bounded_by_a_constant_only_through_steps_that_keep_its_values(spelling, replaced):
    """Beside a finite fill, an additive term must be bounded far above it (``masks._unbounded``): a slice of a
    constant is, a copy of it written in place or its bits viewed as another dtype are not, and leave the site
    alone (the fill could then average keys the original does not)."""
    torch.manual_seed(0)
    model = BoundedBias(spelling).eval()
    optimized = attnopt.optimize(copy.deepcopy(model))
    for n in (8, 12, 16):  # the third length runs the graph with symbolic shapes
        x = torch.randn(2, n, 32)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), model(x), atol=2e-5, rtol=2e-5, equal_nan=True)
    sites = optimized.attnopt_report.sites
    assert all(site.replaced == replaced for site in sites), str(optimized.attnopt_report)
    if not replaced:
        assert all("finite masked_fill next to an additive mask" in site.reason for site in sites)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_integer_term_is_planned_in_the_dtype_eager_added_it_at(dtype):
    """``scores - keep_not.long() * 100000`` in bfloat16: eager adds the term in bfloat16 (rounding the sums), so the
    plan's spec holds the term as a bfloat16 mask: a kernel that would add it in float32 says so."""
    model = Subtracted("integer").to(dtype).eval()
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[0, -3:], keep[1, :5], keep[2] = False, False, False
    x = torch.randn(3, 12, 32, dtype=dtype)
    with pytest.raises(plan.NoKernelError, match="mask at another precision"):
        attnopt.optimize(copy.deepcopy(model), kernel="sdpa_cpu")(x, keep, None)
    optimized = attnopt.optimize(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(optimized(x, keep, None), model(x, keep, None), atol=4e-3, rtol=2e-2,
                                   equal_nan=True)  # float16: 100000 is inf, the fully padded row NaN
    assert the_site(optimized.attnopt_report).replaced
