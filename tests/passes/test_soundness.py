"""Soundness: ``attnopt.optimize(model)`` computes what ``model`` computes, on every call.

One test (or a small parametrized group) per case of issue 10 (items 1-15) and
issue 19 (items 1-5), each the smallest program that shows the bug. A test
accepts either sound outcome: the site replaced exactly, or left alone with a
reason. Where the case is about state (buffers changed between calls, a buffer
the forward updates, random masks, dynamic lengths) the model is called several
times with the state changed in between, and every call is compared.

The eager model and the optimized one are independent copies (``optimize`` of a
deepcopy), and every state change is applied to both, so the tests do not
depend on whether ``optimize`` shares buffers with its argument.

Each program is optimized under three plans (``PLANS``): the planner's own
choice by its cost model; the reference kernel forced, so that a site the
analysis accepts is always replaced and its proof always exercised (a planner
that keeps the original because it estimates it faster would otherwise hide a
wrong proof); and the sdpa_cpu kernel forced, whose own limits (fills, rows
with no visible key) must then hold, or it must decline with ``NoKernelError``.
``tune=False`` everywhere: timing on the CPU makes the choice, and so whether a
wrong proof shows, depend on the machine's load.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.passes.plan import NoKernelError

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=3e-2, rtol=3e-2)
MIN32 = torch.finfo(torch.float32).min
NEG_INF = float("-inf")


# ----------------------------------------------------------------- helpers
def qkv(b=2, h=2, n=8, d=16, *, nk=None, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(b, h, n, d, generator=g) * scale
    k = torch.randn(b, h, nk, d, generator=g) * scale
    v = torch.randn(b, h, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_accounted(report):
    """Every site is either replaced or left alone with a reason (the two sound outcomes)."""
    assert report.sites, f"no attention site in the report:\n{report}"
    for site in report.sites:
        assert site.replaced or site.reason, f"left alone without a reason: {site}"


def sites(report) -> str:
    """The report's sites in one line each: what was done and why."""
    return "; ".join(
        f"{s.where}/{s.node}: " + (f"replaced by {s.kernel} as {'+'.join(s.mask_terms) or 'full'}" if s.replaced
                                   else f"left alone ({s.reason})")
        for s in report.sites
    )


def assert_same(got, expected, tol=FP32, what=""):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"{what}\n{m}", **tol)


#: how each program is optimized: the planner's choice (cost model), and two kernels forced
PLANS = {"cost model": dict(tune=False), "reference kernel": dict(tune=False, kernel="reference"),
         "sdpa_cpu kernel": dict(tune=False, kernel="sdpa_cpu")}


@contextlib.contextmanager
def forced_kernel_may_decline(plan: str):
    """A forced kernel other than the reference may refuse a site it cannot compute (``NoKernelError``, as
    ``kernel=`` documents): then there is nothing to compare. The reference kernel must take every site."""
    try:
        yield
    except NoKernelError:
        if PLANS[plan].get("kernel") in (None, "reference"):
            raise


def plans(model, **options):
    """For each plan: a fresh eager copy of ``model`` and an optimized copy, with dynamo's caches cleared."""
    initial = copy.deepcopy(model)
    for name, plan in PLANS.items():
        torch._dynamo.reset()
        yield name, copy.deepcopy(initial), attnopt.optimize(copy.deepcopy(initial), **plan, **options)


def check_calls(model, calls, *, tol=FP32, **options):
    """Run ``calls`` (each ``(prepare, args)``) on ``model`` and on an optimized copy of it, under every plan.

    ``prepare(module)`` (or None) changes state before the call; it is applied to
    the eager model and to the optimized one alike. Returns ``{plan: (eager, optimized)}``
    after the calls.
    """
    done = {}
    for plan, eager, optimized in plans(model, **options):
        with forced_kernel_may_decline(plan):
            for i, (prepare, args) in enumerate(calls):
                if prepare is not None:
                    prepare(eager)
                    prepare(optimized)
                expected = eager(*args)
                got = optimized(*args)
                assert_same(got, expected, tol, f"{plan}, call {i}; sites: {sites(optimized.attnopt_report)}")
            assert_accounted(optimized.attnopt_report)
            done[plan] = eager, optimized
    return done


def same_inputs(args, n):
    return [(None, args)] * n


class Fn(nn.Module):
    """A module around a plain attention function (optimize takes modules)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ================================================================= issue 10
# ----------------------------------------------------------------- 1. masks built in place
def inplace_additive_masked_fill_(q, k, v):
    n = q.shape[-2]
    m = torch.zeros(n, n)
    m.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), NEG_INF)  # not re-assigned
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v


def inplace_bool_tril_(q, k, v):
    n = q.shape[-2]
    m = torch.ones(n, n, dtype=torch.bool)
    m.tril_()
    return torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~m, NEG_INF), -1) @ v


def inplace_bool_setitem(q, k, v):
    n = q.shape[-2]
    m = torch.ones(n, n, dtype=torch.bool)
    m[:, 0] = False
    return torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~m, NEG_INF), -1) @ v


def inplace_additive_setitem(q, k, v):
    n = q.shape[-2]
    m = torch.zeros(n, n)
    m[:, 0] = NEG_INF
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m, -1) @ v


@pytest.mark.parametrize("fn", [inplace_additive_masked_fill_, inplace_bool_tril_, inplace_bool_setitem,
                                inplace_additive_setitem], ids=lambda f: f.__name__)
def test_01_masks_built_in_place(fn):
    check_calls(Fn(fn), [(None, qkv(seed=0)), (None, qkv(seed=1))])


# ----------------------------------------------------------------- 2. buffers baked in at capture
class BoolMaskBuffer(nn.Module):
    """A registered bool keep mask, as nanoGPT registers its tril ``bias``."""

    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("keep", torch.ones(n, n, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~self.keep[:n, :n], NEG_INF), -1) @ v


def _load_band(module):
    n = module.keep.shape[0]
    i = torch.arange(n)
    module.load_state_dict({"keep": (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)})


def _fill_true(module):
    module.keep.fill_(True)


def _setitem(module):
    module.keep[:, 0] = False  # the diagonal stays visible, except at row 0
    module.keep[0, 0] = True


@pytest.mark.parametrize("change", [_load_band, _fill_true, _setitem], ids=["load_state_dict", "fill_", "setitem"])
def test_02_mask_buffer_changed_between_calls(change):
    args = qkv()
    check_calls(BoolMaskBuffer(), [(None, args), (change, args), (None, qkv(seed=3))])


class ScaleBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v


class WindowBuffer(nn.Module):
    """A sliding window whose size is a buffer, compared against aranges."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.tensor(2))

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        dist = i[:, None] - i[None, :]
        keep = (dist >= 0) & (dist < self.window)
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


def test_02_scale_buffer_changed_between_calls():
    args = qkv()
    check_calls(ScaleBuffer(), [(None, args), (lambda m: m.scale.fill_(1.5), args),
                                (lambda m: m.load_state_dict({"scale": torch.tensor(0.01)}), args)])


def test_02_window_buffer_changed_between_calls():
    args = qkv()
    check_calls(WindowBuffer(), [(None, args), (lambda m: m.window.fill_(5), args),
                                 (lambda m: m.window.fill_(1), args)])


class ForwardUpdatesMask(nn.Module):
    """The forward makes its (all-true) mask buffer causal in place before using it."""

    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("keep", torch.ones(n, n, dtype=torch.bool))

    def forward(self, q, k, v):
        self.keep.tril_()
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~self.keep, NEG_INF), -1) @ v


class ForwardGrowsWindow(WindowBuffer):
    """A counter buffer the forward advances, then uses as a sliding-window size."""

    def __init__(self):
        super().__init__()
        self.window.fill_(1)

    def forward(self, q, k, v):
        self.window.add_(1)
        return super().forward(q, k, v)


@pytest.mark.parametrize("cls", [ForwardUpdatesMask, ForwardGrowsWindow], ids=lambda c: c.__name__)
def test_02_buffer_updated_by_the_forward(cls):
    for plan, (eager, optimized) in check_calls(cls(), same_inputs(qkv(), 4)).items():
        for (name, a), (_, b) in zip(eager.named_buffers(), optimized.named_buffers()):
            assert torch.equal(a, b), f"{plan}: buffer {name} {b} after 4 calls, eager's {a}"


# ----------------------------------------------------------------- 3. an input named like a buffer
class InputNamedLikeBuffer(nn.Module):
    def forward(self, q, k, v, attn_buffers_mask):  # dynamo names the placeholder l_attn_buffers_mask_
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~attn_buffers_mask, NEG_INF), -1) @ v


def test_03_user_input_named_like_a_buffer():
    q, k, v = qkv()
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    other = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    other.fill_diagonal_(True)
    check_calls(InputNamedLikeBuffer(), [(None, (q, k, v, causal)), (None, (q, k, v, other)),
                                         (None, (q, k, v, causal))])


# ----------------------------------------------------------------- 4. random masks
class RandomMask(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        keep = causal | (torch.rand(()) < 0.5)  # either causal or full, drawn on every call
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


def test_04_random_masks_are_drawn_on_every_call():
    args = qkv()
    for plan, model, optimized in plans(RandomMask()):
        outcomes = set()
        with forced_kernel_may_decline(plan):
            for seed in range(8):  # both draws occur among these seeds
                torch.manual_seed(seed)
                expected = model(*args)
                outcomes.add(round(float(expected.sum()), 3))
                torch.manual_seed(seed)
                got = optimized(*args)
                assert_same(got, expected, FP32, f"{plan}, seed {seed}; sites: {sites(optimized.attnopt_report)}")
            assert len(outcomes) == 2, "the test should see both draws"
            assert_accounted(optimized.attnopt_report)


# ----------------------------------------------------------------- 5. in-place state feeding the scale
class StepScale(nn.Module):
    """``self.step += 1`` and the step scales the scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.tensor(0.0))

    def forward(self, q, k, v):
        self.step += 1
        s = q @ k.transpose(-1, -2) * (0.1 * self.step)
        return torch.softmax(s, -1) @ v


def test_05_forward_state_feeding_the_scale():
    for plan, (eager, optimized) in check_calls(StepScale(), same_inputs(qkv(), 4)).items():
        assert float(eager.step) == 4.0
        assert torch.equal(optimized.step, eager.step), f"{plan}: step {optimized.step} after 4 calls, eager's 4"


def test_05_explain_changes_no_state():
    model = StepScale()
    args = qkv()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attnopt.explain(model, args, tune=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"explain changed {key}: {before[key]} -> {value}"


# ----------------------------------------------------------------- 6. two additive finfo.min masks
class TwoFinfoMinMasks(nn.Module):
    """Causal and padding masks, each (1 - keep) * finfo.min, added one after the other (older HF)."""

    def forward(self, q, k, v, keep):
        n = q.shape[-2]
        causal = torch.ones(n, n).tril()
        s = q @ k.transpose(-1, -2) * 0.25
        s = s + (1.0 - causal) * MIN32
        s = s + (1.0 - keep[:, None, None, :].float()) * MIN32
        return torch.softmax(s, -1) @ v


def test_06_two_additive_finfo_min_masks():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False  # left padding: rows 0-2 of batch 1 see no key, some keys masked twice
    check_calls(TwoFinfoMinMasks(), [(None, (*qkv(), keep))])


# ----------------------------------------------------------------- 7. a finite fill that does not absorb
class SmallFillLargeScores(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = q @ k.transpose(-1, -2) * 1000.0  # scores of order 1e3-1e4: -1e4 is not "minus infinity"
        return torch.softmax(s.masked_fill(~causal, -1e4), -1) @ v


def test_07_finite_fill_that_competes_with_the_scores():
    calls = []
    for seed in (0, 1):
        q, k, v = qkv(seed=seed)
        # k = -q: each query's own key scores about -1000 * |q|^2 = -1.6e4, below the -1e4 fill, so in the
        # first rows (few visible keys) eager's masked keys win the softmax
        calls.append((None, (q, -q, v)))
    check_calls(SmallFillLargeScores(), calls)


# ----------------------------------------------------------------- 8. softcap then another multiply
class SoftcapThenScale(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s = torch.tanh(s / 5) * 5 * 2.0  # the 2 scales the capped value, not the input
        return torch.softmax(s, -1) @ v


def test_08_softcap_followed_by_a_multiply():
    check_calls(SoftcapThenScale(), [(None, qkv(scale=2.0))])


# ----------------------------------------------------------------- 9. baddbmm's alpha and beta
class BaddbmmAlpha(nn.Module):
    def forward(self, q, k, v, bias):  # [B*H, N, D], bias [B*H, N, N]
        s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1, alpha=0.25)
        return torch.bmm(torch.softmax(s, -1), v)


class BaddbmmKeywords(nn.Module):
    """BLOOM's spelling: every argument by keyword, beta != 1."""

    def forward(self, q, k, v, bias):
        s = bias.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=0.5, alpha=0.25)
        return torch.bmm(torch.softmax(s, -1), v)


@pytest.mark.parametrize("cls", [BaddbmmAlpha, BaddbmmKeywords], ids=lambda c: c.__name__)
def test_09_baddbmm_alpha_beta(cls):
    q, k, v = (t.reshape(4, 8, 16) for t in qkv())
    bias = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2
    check_calls(cls(), [(None, (q, k, v, bias)), (None, (q, k, v, -bias))])


# ----------------------------------------------------------------- 10. ignored keyword arguments
class DivFloor(nn.Module):
    def forward(self, q, k, v):
        s = torch.div(q @ k.transpose(-1, -2), 0.5, rounding_mode="floor")
        return torch.softmax(s, -1) @ v


class SubAlpha(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2) * 0.25
        mask = torch.sub(1, keep[:, None, None, :].float(), alpha=0.5) * MIN32  # 1 - 0.5 * keep
        return torch.softmax(s + mask, -1) @ v


def test_10_div_rounding_mode():
    check_calls(DivFloor(), [(None, qkv(scale=2.0))])


def test_10_sub_alpha():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False
    check_calls(SubAlpha(), [(None, (*qkv(), keep))])


# ----------------------------------------------------------------- 11. dynamic shapes: proofs from hints
class StepTwoArange(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        qi = torch.arange(0, 2 * n, step=2)  # 0, 2, 4, ...: not the unit-step positions
        kj = torch.arange(n)
        keep = kj[None, :] <= qi[:, None]
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


def test_11_arange_step_under_dynamic_shapes():
    calls = [(None, qkv(n=n, seed=n)) for n in (6, 8, 10, 12)]  # the second call recompiles with symbolic n
    check_calls(StepTwoArange(), calls)


class Bf16Positions(nn.Module):
    """A causal window over positions cast to the queries' dtype: bf16 rounds integers above 256."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n).to(q)  # 257 -> 256, 259 -> 260, ...
        keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 3)
        s = q @ k.transpose(-1, -2)
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


def test_11_bf16_positions_under_dynamic_shapes():
    # N must pass 256 for bf16 to round the positions; q = 0 makes each row the mean of its visible values,
    # so a key more or less in a 3-key window changes the output by O(1), far above bf16 rounding.
    calls = []
    for n in (270, 280, 290):
        g = torch.Generator().manual_seed(n)
        q = torch.zeros(1, 1, n, 8, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 1, n, 8, generator=g).to(torch.bfloat16) for _ in range(2))
        calls.append((None, (q, k, v)))
    check_calls(Bf16Positions(), calls, tol=BF16)


class LookAhead(nn.Module):
    """Each query sees every key up to three past its own index (kj <= qi + 3)."""

    def forward(self, q, k, v):
        qi = torch.arange(q.shape[-2])
        kj = torch.arange(k.shape[-2])
        keep = kj[None, :] <= qi[:, None] + 3
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


@pytest.mark.parametrize("dynamic,lengths", [(True, (8, 10, 12)), (None, (10, 8, 12))],
                         ids=["dynamic=True", "recompiled"])
def test_11_look_ahead_band_is_not_bottom_right_causal(dynamic, lengths):
    # at Nq=5, Nk=8 the band kj <= qi + 3 coincides with bottom-right causal; at other Nk it does not
    calls = [(None, qkv(n=5, nk=nk, seed=nk)) for nk in lengths]
    check_calls(LookAhead(), calls, dynamic=dynamic)


# ----------------------------------------------------------------- 12. SDPA's default scale, dynamic D
class SDPADefaultScale(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("dynamic,dims", [(True, (16, 32, 8)), (None, (16, 32, 8, 24))],
                         ids=["dynamic=True", "recompiled"])
def test_12_sdpa_default_scale_with_dynamic_head_dim(dynamic, dims):
    calls = [(None, qkv(d=d, seed=d, scale=2.0)) for d in dims]
    check_calls(SDPADefaultScale(), calls, dynamic=dynamic)


# ----------------------------------------------------------------- 13. K mutated between the products
class KMutatedBetweenProducts(nn.Module):
    def forward(self, q, k, v, k_new):
        kc = k.clone()
        s = q @ kc.transpose(-1, -2) * 0.25
        kc[:, :, 3] = k_new  # after the scores: eager's probabilities used the old row
        return torch.softmax(s, -1) @ kc  # the values are the mutated cache


class KVMutatedBetweenProducts(nn.Module):
    """The same with separate K and V caches: only K changes after the score product."""

    def forward(self, q, k, v, k_new):
        kc, vc = k.clone(), v.clone()
        s = q @ kc.transpose(-1, -2) * 0.25
        kc[:, :, 3] = k_new
        return torch.softmax(s, -1) @ vc + kc.sum() * 0


@pytest.mark.parametrize("cls", [KMutatedBetweenProducts, KVMutatedBetweenProducts], ids=lambda c: c.__name__)
def test_13_k_mutated_between_score_and_value_product(cls):
    q, k, v = qkv()
    k_new = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(9)) * 3
    check_calls(cls(), [(None, (q, k, v, k_new))])


# ----------------------------------------------------------------- 14. dropout on fully-masked rows
class DropoutFinfoMin(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2) * 0.25
        s = s.masked_fill(~keep[:, None, None, :], MIN32)
        return self.drop(torch.softmax(s, -1)) @ v


def test_14_dropout_on_fully_masked_rows():
    q, k, v = qkv(b=2, h=1, n=4, d=8)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False  # batch 1: every row sees no key; finfo.min makes it the (dropped-out) uniform average
    draws = 200
    for plan, model, optimized in plans(DropoutFinfoMin().train()):
        torch.manual_seed(0)
        eager_rows = torch.stack([model(q, k, v, keep)[1] for _ in range(draws)])  # [draws, 1, 4, 8]
        torch.manual_seed(0)
        opt_rows = None
        with forced_kernel_may_decline(plan):
            opt_rows = torch.stack([optimized(q, k, v, keep)[1] for _ in range(draws)])
        if opt_rows is None:
            continue
        assert_accounted(optimized.attnopt_report)
        eager_std, opt_std = eager_rows.std(0).mean(), opt_rows.std(0).mean()
        assert eager_std > 0.1, eager_std  # eager's empty rows vary with the dropout draw
        # same distribution: the spread across draws and the mean (the uniform average of v) agree
        assert 0.7 * eager_std < opt_std < 1.4 * eager_std, \
            f"{plan}: std over draws: eager {eager_std:.3f}, optimized {opt_std:.3f}; {sites(optimized.attnopt_report)}"
        torch.testing.assert_close(opt_rows.mean(0), eager_rows.mean(0), atol=0.15, rtol=0)


# ----------------------------------------------------------------- 15. 1-D masks
class KeyMask1D(nn.Module):
    def forward(self, q, k, v, keep):  # keep: [Nk]
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v


class Documents1D(nn.Module):
    def forward(self, q, k, v, doc):  # doc: [N] document ids shared by the batch
        same = doc[:, None] == doc[None, :]
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(~same, NEG_INF), -1) @ v


def test_15_one_dimensional_key_mask():
    keep = torch.tensor([True, True, False, True, True, True, False, False])
    check_calls(KeyMask1D(), [(None, (*qkv(), keep)), (None, (*qkv(seed=1), ~keep | (torch.arange(8) == 0)))])


@pytest.mark.parametrize("batch", [2, 1])
def test_15_one_dimensional_document_ids(batch):
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    check_calls(Documents1D(), [(None, (*qkv(b=batch), doc)), (None, (*qkv(b=batch, seed=1), doc.flip(0)))])


# ================================================================= issue 19
# ----------------------------------------------------------------- 1. masked_fill with keyword arguments
class MaskedFillKeywords(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        m = torch.ones(n, n, dtype=torch.bool).tril()
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s.masked_fill(mask=~m, value=NEG_INF), -1) @ v


def test_19_01_masked_fill_keyword_arguments():
    done = check_calls(MaskedFillKeywords(), [(None, qkv())])
    # the same op as masked_fill(~m, -inf): a causal site that the forced reference kernel must take
    report = done["reference kernel"][1].attnopt_report
    assert report.sites[0].replaced, sites(report)


# ----------------------------------------------------------------- 2. two finite fills
class TwoFiniteFills(nn.Module):
    def forward(self, q, k, v, keep):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = q @ k.transpose(-1, -2) * 0.25
        s = s.masked_fill(~keep[:, None, None, :], MIN32)  # padding
        s = s.masked_fill(~causal, -1e9)  # causal
        return torch.softmax(s, -1) @ v


def test_19_02_two_masked_fills_with_different_finite_values():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False  # left padding: rows 0-2 of batch 1 see no key
    check_calls(TwoFiniteFills(), [(None, (*qkv(), keep))])


# ----------------------------------------------------------------- 3. bf16 autocast, fp32 finfo.min mask
class DenseAdditiveMask(nn.Module):
    """HF's pre-built additive mask, [B, 1, 1, Nk] of 0 / finfo.min, passed in."""

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s + mask, -1) @ v


class Dense3DAdditiveMask(nn.Module):
    """The same mask reshaped to [B, 1, Nk] and unsqueezed inside the graph."""

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s + mask.reshape(mask.shape[0], 1, -1)[:, None], -1) @ v


class Autocast(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args)


@pytest.mark.parametrize("cls", [DenseAdditiveMask, Dense3DAdditiveMask], ids=lambda c: c.__name__)
def test_19_03_bf16_autocast_keeps_the_fp32_finfo_min_mask_finite(cls):
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False  # every row of batch 1 sees no key: eager averages uniformly (finite), never NaN
    mask = ((~keep).float() * MIN32)[:, None, None, :]  # [B, 1, 1, Nk]
    for plan, (_, optimized) in check_calls(Autocast(cls()), [(None, (*qkv(), mask))], tol=BF16).items():
        assert not optimized(*qkv(), mask).isnan().any(), plan


# ----------------------------------------------------------------- 4. dynamic shapes hide a -inf mask
class NegInfTriuPlusPadding(nn.Module):
    def forward(self, q, k, v, keep):
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) * 0.25
        s = s + torch.full((n, n), NEG_INF).triu(1)
        s = s + (1.0 - keep[:, None, None, :].float()) * MIN32
        return torch.softmax(s, -1) @ v


def test_19_04_dynamic_shapes_keep_the_neg_inf_mask():
    calls = []
    for n in (8, 10, 12, 14):  # the second call recompiles with a symbolic n
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, :3] = False  # left padding: rows 0-2 of batch 1 see no key
        calls.append((None, (*qkv(n=n, seed=n), keep)))
    check_calls(NegInfTriuPlusPadding(), calls)


# ----------------------------------------------------------------- 5. SDPA bf16 with a bf16 additive mask
class SDPAMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_19_05_sdpa_bf16_additive_mask_precision():
    q, k, v = qkv(b=2, h=2, n=16, d=32, scale=4.0, dtype=torch.bfloat16)
    mask = (torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(7)) * 4).to(torch.bfloat16)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    for plan, model, optimized in plans(SDPAMask()):
        expected, got = model(q, k, v, mask), None
        with forced_kernel_may_decline(plan):
            got = optimized(q, k, v, mask)
        if got is None:
            continue
        assert_accounted(optimized.attnopt_report)
        eager_err = (expected.double() - exact).abs().max().item()
        opt_err = (got.double() - exact).abs().max().item()
        # both round to bf16 at the end; the replacement may not add more error than eager's own, up to 2x
        # (different summation orders) plus a few bf16 ulps of the output
        assert opt_err <= 2 * eager_err + 4e-3, \
            f"{plan}: error vs float64: optimized {opt_err:.4g}, eager {eager_err:.4g}; {sites(optimized.attnopt_report)}"


# ----------------------------------------------------------------- found since: gradients of an added finfo.min
class AddedFinfoMinPadding(nn.Module):
    """BERT-style ``(1 - keep) * finfo.min`` from a float 0/1 mask: a dense additive term."""

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s + (1.0 - keep[:, None, None, :]) * MIN32, -1) @ v


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
def test_gradients_through_an_added_finfo_min_on_fully_masked_rows(kernel):
    """ATen's CPU SDPA backward gives other gradients than autograd of the original on rows an added
    finfo.min fills entirely; a kernel must compute the original's gradients or decline."""
    keep = torch.ones(2, 8)
    keep[1] = 0.0  # every row of batch 1 is masked entirely: uniform, with autograd through the addition
    q, k, v = (t.requires_grad_() for t in qkv())
    expected = AddedFinfoMinPadding()(q, k, v, keep)
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    try:
        optimized = attnopt.optimize(AddedFinfoMinPadding(), kernel=kernel, tune=False)
        got = optimized(q, k, v, keep)
    except NoKernelError:
        return
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------- found since: a bias summed in place
class BiasSummedInPlace(nn.Module):
    """DeBERTa's relative terms: ``score = 0 + c2p; score += p2c`` (the first summand written in place),
    then ``q @ k^T * s + score``. Its parts must not be read again after the in-place add, or ``p2c`` counts
    twice."""

    def forward(self, q, k, v, c2p, p2c):
        score = 0 + c2p
        score += p2c
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + score, -1) @ v


@pytest.mark.parametrize("train", [False, True])
def test_a_bias_summed_in_place_counts_each_term_once(train):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(3)
    c2p, p2c = (torch.randn(2, 2, 8, 8, generator=g) * 3 for _ in range(2))
    if train:
        q.requires_grad_()
    done = check_calls(BiasSummedInPlace(), same_inputs((q, k, v, c2p, p2c), 2))
    for plan, (_, optimized) in done.items():
        assert any(s.replaced for s in optimized.attnopt_report.sites), f"{plan}: {sites(optimized.attnopt_report)}"


class SoftmaxNarrowerThanScores(nn.Module):
    """BLOOM in float64: ``softmax(s, dtype=torch.float32)`` of float64 scores rounds them, and its float64
    ``finfo.min`` fill becomes -inf (NaN rows), unlike a float64 kernel."""

    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep[:, None, None, :], torch.finfo(q.dtype).min)
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def test_a_softmax_narrower_than_its_scores_is_left_alone():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False  # every key of batch 1 padded: NaN in the original, through the float32 softmax
    q, k, v = qkv(dtype=torch.float64)
    done = check_calls(SoftmaxNarrowerThanScores(), same_inputs((q, k, v, keep), 1))
    for plan, (_, optimized) in done.items():
        site = optimized.attnopt_report.sites[0]
        assert not site.replaced and "rounds them first" in site.reason, f"{plan}: {sites(optimized.attnopt_report)}"


class MaskScaledInPlace(nn.Module):
    """A padding mask built in place (``m -= 1; m.mul_(-min)``) and added in place to the scores: read as
    written (the value after the writes), never by re-applying its parts."""

    def forward(self, q, k, v, keep):
        m = keep[:, None, None, :].float()
        m -= 1.0
        m.mul_(-MIN32)
        s = q @ k.transpose(-1, -2) * 0.25
        s += m
        return torch.softmax(s, -1) @ v


def test_a_mask_scaled_in_place_is_read_once():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :3], keep[1] = False, False  # left padding, and a batch row with no key (uniform rows)
    check_calls(MaskScaledInPlace(), same_inputs((*qkv(), keep), 2))


# ----------------------------------------------------------------- kv heads repeated in other orders
def _grouped(t):  # Hugging Face's repeat_kv: each kv head twice in a row, [0, 0, 1, 1]
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, 2, n, d).reshape(b, 2 * h, n, d)


def _tiled(t):  # the kv heads one after the other twice, [0, 1, 0, 1]: not a grouping
    b, h, n, d = t.shape
    return t[:, None].expand(b, 2, h, n, d).reshape(b, 2 * h, n, d)


HEAD_ORDERS = {
    # spelling: (keys, values, kv heads the kernel must see: 2 where the grouping is proven, else the 4 repeated)
    "repeat_kv": (_grouped, _grouped, 2),
    "repeat_interleave": (lambda t: t.repeat_interleave(2, dim=1), lambda t: t.repeat_interleave(2, dim=1), 2),
    "repeat_tiles": (lambda t: t.repeat(1, 2, 1, 1), lambda t: t.repeat(1, 2, 1, 1), 4),
    "expand_before_heads": (_tiled, _tiled, 4),
    "values_heads_flipped_first": (_grouped, lambda t: _grouped(t.flip(1)), 2),
    "keys_grouped_values_tiled": (_grouped, _tiled, 4),
}


@pytest.mark.parametrize("order", HEAD_ORDERS)
def test_kv_heads_repeated_in_any_order_pair_each_query_head_with_its_own(order):
    """Only a repeat that groups each kv head's copies together (HF's ``repeat_kv``, ``repeat_interleave``) is
    grouped-query attention; tiled copies pair query head i with kv head i % 2, and keys and values repeated
    differently pair them differently. Each is computed as written: grouped where proven, else on the repeated
    heads."""
    keys, values, kv_heads = HEAD_ORDERS[order]

    def attend(q, k, v):
        return torch.softmax(q @ keys(k).transpose(-1, -2) * 0.25, -1) @ values(v)

    g = torch.Generator().manual_seed(0)
    calls = [(None, (torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g),
                     torch.randn(2, 2, 8, 16, generator=g))) for _ in range(2)]
    done = check_calls(Fn(attend), calls)
    (site,) = done["reference kernel"][1].attnopt_report.sites
    assert site.replaced and site.kv_heads == kv_heads, sites(done["reference kernel"][1].attnopt_report)


# ----------------------------------------------------------------- terms added before and after an upcast
class _HalfBaseThenUpcast(nn.Module):
    """BLOOM-like: baddbmm adds a float16 base to the half-precision scores; then the scores are upcast, a float32
    term is added and (``boolean``) a boolean mask applied."""

    def __init__(self, boolean: bool):
        super().__init__()
        self.boolean = boolean

    def forward(self, q, k, v, base, bias, keep):
        b, h, n, d = q.shape
        s = torch.baddbmm(base.reshape(b * h, n, n), q.reshape(b * h, n, d),
                          k.reshape(b * h, n, d).transpose(1, 2)).view(b, h, n, n).float()
        s = s + bias
        if self.boolean:
            s = s.masked_fill(~keep, NEG_INF)
        return torch.softmax(s, -1).to(q.dtype) @ v


@pytest.mark.parametrize("boolean", [False, True], ids=["additive_only", "with_a_boolean_mask"])
def test_a_half_precision_term_is_added_before_the_upcast_ones(boolean):
    """float16's finfo.min added to half-precision scores saturates a row to one value, so the row is then the
    softmax of what the float32 term adds alone; added at float32 with it, the scores would show through. The
    kernels add the half-precision terms first, at that precision; beside a boolean mask, where they cannot, the
    site is left alone."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=g).half() for _ in range(3))
    base = torch.zeros(2, 2, 8, 8, dtype=torch.float16)
    base[1, :, 0] = torch.finfo(torch.float16).min  # row 0 of batch row 1: every key saturated
    bias = torch.randn(2, 1, 8, 8, generator=g)
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    done = check_calls(_HalfBaseThenUpcast(boolean), same_inputs((q, k, v, base, bias, keep), 2), tol=BF16)
    report = done["reference kernel"][1].attnopt_report
    (site,) = report.sites
    assert site.replaced != boolean, sites(report)
    if boolean:
        assert "half-precision" in site.reason


# ----------------------------------------------------------------- SDPA's CPU backward on rows a finite mask hides
class _SDPAPaddingMask(nn.Module):
    def forward(self, q, k, v, keep):
        mask = torch.where(keep[:, None, None, :], 0.0, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_on_the_cpu_keeps_its_training_calls_where_a_finite_mask_hides_a_row():
    """ATen's CPU attention, given an additive ``finfo.min`` mask that hides every key of a row, returns the row's
    right (uniform) output but Nk times the softmax's gradients for it. Inference calls are replaced; a training
    call is kept as written, with the reason, and its gradients are the original's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=g) for _ in range(3))
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False  # batch row 1 all padding
    grad = torch.randn(2, 2, 8, 16, generator=g)
    eager = _SDPAPaddingMask()
    optimized = attnopt.optimize(_SDPAPaddingMask(), tune=False, kernel="reference")
    with torch.no_grad():
        assert_same(optimized(q, k, v, keep), eager(q, k, v, keep))
    assert optimized.attnopt_report.sites[0].replaced
    with pytest.raises(NoKernelError, match="no kernel reproduces"):  # forced: declines the training call
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        optimized(*leaves, keep)
    chosen = attnopt.optimize(_SDPAPaddingMask(), tune=False)
    for module in (eager, chosen):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = module(*leaves, keep)
        module.grads = torch.autograd.grad(out, leaves, grad)
    for got, expected in zip(chosen.grads, eager.grads):
        assert_same(got, expected)
    training = [s for s in chosen.attnopt_report.sites if not s.replaced]
    assert training and "ATen's CPU backward" in training[0].reason, sites(chosen.attnopt_report)


# ----------------------------------------------------------------- found since: scores scaled after their masks
class _ScaledAfterMasks(nn.Module):
    """Masks applied to the unscaled scores, then a scale (``(s + mask) / t``); ``how`` picks the masks."""

    def __init__(self, how: str, scale: float):
        super().__init__()
        self.how, self.scale = how, scale

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2)
        n = q.shape[-2]
        if self.how == "two finfo.min terms":
            low = torch.finfo(s.dtype).min
            causal = torch.where(torch.ones(n, n, dtype=torch.bool).tril(), 0.0, low)
            s = s + causal + torch.where(keep[:, None, None, :], 0.0, low)
        else:
            s = s.masked_fill(~keep[:, None, None, :], {"finfo.min fill": torch.finfo(s.dtype).min,
                                                        "-1e30 fill": -1e30}[self.how])
        return torch.softmax(s * self.scale, -1) @ v


@pytest.mark.parametrize("how, scale, replaced", [("two finfo.min terms", 0.25, False), ("finfo.min fill", 2.0, False),
                                                  ("-1e30 fill", 2.0, True), ("finfo.min fill", 0.25, True)])
def test_a_scale_after_the_masks_is_folded_only_where_eager_cannot_overflow(how, scale, replaced):
    """Eager adds two ``finfo.min`` terms before it scales them: -inf where both mask, NaN for a row both hide
    entirely; each term scaled first stays finite. A scale above 1 makes a ``finfo.min`` fill -inf. Such sites are
    left alone; a fill whose product stays finite, or one term scaled down, is folded and replaced."""
    q, k, v = qkv()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False  # batch row 1 all padding: its rows see no key
    calls = [(None, (q, k, v, keep))]
    for _, optimized in check_calls(_ScaledAfterMasks(how, scale), calls).values():
        report = optimized.attnopt_report
        if not replaced:
            assert not any(s.replaced for s in report.sites) and "scaled by" in report.sites[0].reason, sites(report)
    if replaced:
        assert all(s.replaced for s in report.sites), sites(report)


# ----------------------------------------------------------------- writes that bypass the version counter
def _data_write(module):
    module.keep.data[:, 0] = False  # through .data: the buffer's version counter does not move
    module.keep.data[0, 0] = True


def _numpy_write(module):
    module.keep.numpy()[:, 0] = False
    module.keep.numpy()[0, 0] = True


@pytest.mark.parametrize("change", [_data_write, _numpy_write], ids=[".data", ".numpy()"])
def test_a_small_mask_buffer_written_around_its_version_counter_is_seen(change):
    """``.data`` and NumPy writes leave the version counter as it was; a small CPU buffer is also compared by value
    on each call (``guards.VALUE_CHECKED``), so the proof that read it is made again."""
    args = qkv()
    check_calls(BoolMaskBuffer(), [(None, args), (change, args), (None, qkv(seed=3))])


def test_a_small_scale_buffer_written_through_data_is_seen():
    args = qkv()
    check_calls(ScaleBuffer(), [(None, args), (lambda m: m.scale.data.fill_(1.5), args), (None, qkv(seed=4))])


def test_a_large_buffer_written_through_data_is_seen_after_optimize_again():
    """Above ``VALUE_CHECKED`` elements a buffer is guarded by its version counter only (a comparison per call would
    cost more than the call; on CUDA it would wait for the device). The README's remedy: optimize again."""
    from attnopt.passes.guards import VALUE_CHECKED

    n = 72
    assert n * n > VALUE_CHECKED
    model = BoolMaskBuffer(n)
    eager, optimized = copy.deepcopy(model), attnopt.optimize(copy.deepcopy(model), tune=False, kernel="reference")
    args = qkv(n=n)
    assert_same(optimized(*args), eager(*args), what="first call")
    for module in (eager, optimized):
        _data_write(module)
    optimized = attnopt.optimize(optimized, tune=False, kernel="reference")
    assert_same(optimized(*args), eager(*args), what="after .data and optimize again")


# ----------------------------------------------------------------- MultiheadAttention's is_causal hint
class MHACausalHint(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, mask, padding):
        return self.mha(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=self.need_weights,
                        is_causal=True)[0]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_multihead_attention_is_causal_hint_as_pytorch_reads_it(need_weights, padded):
    """PyTorch reads ``is_causal=True`` as causal attention and drops ``attn_mask`` (whatever it holds) when no key
    padding is given and no weights are needed; otherwise it drops the hint and uses the mask. A window mask
    that is not causal tells the two apart."""
    torch.manual_seed(0)
    n = 10
    i = torch.arange(n)
    window = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 3)  # True = masked: a causal window of 3
    padding = (i[None, :] >= torch.tensor([[10], [7]])) if padded else None
    calls = [(None, (torch.randn(2, n, 16, generator=torch.Generator().manual_seed(s)), window, padding))
             for s in (1, 2)]
    check_calls(MHACausalHint(need_weights).eval(), calls)


# ----------------------------------------------------------------- one attention's output as the next one's query
def _causal_attention(q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), NEG_INF)
    return s.softmax(-1) @ v


def test_an_attention_output_fed_straight_into_the_next_attention():
    """The second site's query is the first site's output node, which the first rewrite erases: the second
    rewrite reads the node that replaced it."""
    calls = [(None, qkv(seed=s)) for s in (1, 2)]
    for _, optimized in check_calls(Fn(lambda q, k, v: _causal_attention(_causal_attention(q, k, v), k, v)),
                                    calls).values():
        assert len(optimized.attnopt_report.sites) == 2, sites(optimized.attnopt_report)


# ----------------------------------------------------------------- an infinite multiplier of a 0/1 mask
def test_one_minus_a_mask_times_minus_infinity_stays_nan_where_eager_is():
    """``(1 - keep) * -inf`` is NaN where ``keep`` holds (0 * -inf), so eager's output is NaN everywhere: the term
    is not read as a boolean mask with a ``-inf`` fill (which would give numbers), it is added as written."""
    def fn(q, k, v, keep):
        s = q @ k.transpose(-1, -2) * 0.25 + (1.0 - keep[:, None, None, :].float()) * NEG_INF
        return s.softmax(-1) @ v

    keep = torch.arange(8)[None] < torch.tensor([[8], [5]])
    check_calls(Fn(fn), [(None, (*qkv(), keep))])


# ----------------------------------------------------------------- attention dropout that drops everything
@pytest.mark.parametrize("how", ["F.dropout", "sdpa"])
def test_dropout_of_one_drops_every_probability_as_eager(how):
    """``F.dropout(p, 1.0)`` and SDPA's ``dropout_p=1.0`` are legal: every probability dropped, the output 0 and so
    every gradient. The kernels' ``1 / (1 - p)`` is ``kept_scale``'s 0 there, not a 0 / 0."""
    def fn(q, k, v):
        if how == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=1.0, is_causal=True)
        return F.dropout(torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1), 1.0, True) @ v

    args = [t.requires_grad_() for t in qkv()]
    for _, optimized in check_calls(Fn(fn), [(None, args)]).values():
        out = optimized(*args)
        assert not bool(out.any())
        grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
        assert all(g is None or not bool(g.any()) for g in grads)


# ----------------------------------------------------------------- a mask input written around its version counter
class SDPAInputMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("how", [".data", "numpy"])
def test_a_mask_input_written_around_its_version_counter_between_calls(how):
    """The same mask tensor on every call, its values written between calls without moving its version counter:
    what a call built from it (``term_cache``) serves that call only, each graph call starting a generation."""
    buffer = torch.zeros(2, 1, 8, 8).numpy()
    mask = torch.from_numpy(buffer) if how == "numpy" else torch.zeros(2, 1, 8, 8)

    def write(_module):  # the one mask both models read: its last write is what both calls see
        values = torch.randn(2, 1, 8, 8) * 4
        if how == "numpy":
            buffer[...] = values.numpy()
        else:
            mask.data.copy_(values)

    check_calls(SDPAInputMask(), [(None, (*qkv(), mask)), (write, (*qkv(seed=1), mask)), (write, (*qkv(seed=2), mask))])


# ----------------------------------------------------------------- hooks registered after the first call
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Fn(_causal_attention)

    def forward(self, q, k, v):
        return self.attn(q, k, v) + v


def test_a_hook_registered_on_a_layer_after_the_first_call_runs():
    """dynamo guards the inlined submodules' hooks under ``optimize`` (torch.compile skips those guards by default):
    a forward hook added to a layer after the first call runs, as on the original."""
    args = qkv()

    def hook(module):
        module.attn.register_forward_hook(lambda _m, _inputs, out: out * 0)

    check_calls(_Block(), [(None, args), (hook, args)])


# ----------------------------------------------------------------- PyTorch's fused inference fast paths
class _SelfMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, mask, padding, causal):
        return self.mha(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=causal)[0]


def _inference_calls_as_eager(model, calls, note):
    """Under every plan: each call equals eager's (NaN where eager's is), no site is captured, the report says why."""
    for plan, eager, optimized in plans(model):
        for i, args in enumerate(calls):
            assert_same(optimized(*args), eager(*args), what=f"{plan}, call {i}")
        report = optimized.attnopt_report
        assert not report.sites and any(note in f.why for f in report.fallbacks), str(report)


@pytest.mark.parametrize("case", ["fully padded batch row", "is_causal hint with a window"])
def test_multihead_attention_in_inference_runs_its_fast_path(case):
    """In eval without gradients PyTorch runs ``torch._native_multi_head_attention``, which torch.compile skips:
    it gives a fully padded batch row NaN (the traced path, 0) and applies ``attn_mask`` under an ``is_causal``
    hint (the traced path: causal). Those calls run eagerly, and the report says so; a training call is rewritten."""
    torch.manual_seed(0)
    n = 10
    i = torch.arange(n)
    if case == "fully padded batch row":
        padding, mask, causal = torch.zeros(2, n, dtype=torch.bool), None, False
        padding[1] = True
    else:
        padding, mask, causal = None, (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 3), True
    model = _SelfMHA().eval()
    with torch.no_grad():
        _inference_calls_as_eager(model, [(torch.randn(2, n, 16, generator=torch.Generator().manual_seed(s)), mask,
                                           padding, causal) for s in (1, 2)], "nn.MultiheadAttention in inference")
    trained = attnopt.optimize(copy.deepcopy(model).train(), tune=False, kernel="reference")
    x = torch.randn(2, n, 16, requires_grad=True)
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, 6:] = True
    assert_same(trained(x, None, padding, False), model.train()(x, None, padding, False), what="training call")
    assert [s.replaced for s in trained.attnopt_report.sites] == [True], sites(trained.attnopt_report)


class _NestedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


def test_transformer_encoder_nested_tensors_in_inference():
    """In eval without gradients the encoder packs the padded batch as nested tensors and returns 0 on padded
    rows; torch.compile skips that path (the rows come out computed). Those calls run eagerly."""
    torch.manual_seed(0)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        _inference_calls_as_eager(_NestedEncoder().eval(), [
            (torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(s)), padding) for s in (1, 2)],
            "nn.TransformerEncoder in inference")


class _CrossMHA(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x, memory, padding):
        return self.mha(x, memory, memory, key_padding_mask=padding, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_that_cannot_take_its_fast_path_is_rewritten_in_inference(batch_first):
    """Cross-attention (or a layout other than ``batch_first``) rules PyTorch's fast path out: eager runs the code
    dynamo traces, so its inference calls are rewritten as any other."""
    torch.manual_seed(0)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 7:] = True
    shape = (2, 10, 16) if batch_first else (10, 2, 16)
    memory_shape = (2, 12, 16) if batch_first else (12, 2, 16)
    with torch.no_grad():
        calls = [(None, (torch.randn(*shape, generator=torch.Generator().manual_seed(s)),
                         torch.randn(*memory_shape, generator=torch.Generator().manual_seed(s + 9)), padding))
                 for s in (1, 2)]
        for plan, (_, optimized) in check_calls(_CrossMHA(batch_first).eval(), calls).items():
            report = optimized.attnopt_report
            assert not report.fallbacks, str(report)
            if plan == "reference kernel":
                assert [s.replaced for s in report.sites] == [True], sites(report)


def _same_gradients(plan: str, eager, optimized, *extra):
    """Over two calls on fresh q, k, v (and ``extra`` arguments): the same output and the same dq, dk, dv, NaN
    included, from the eager model and the optimized one."""
    for seed in (1, 2):
        inputs = [t.requires_grad_(True) for t in qkv(seed=seed)]
        copies = [t.detach().clone().requires_grad_(True) for t in inputs]
        expected, got = eager(*inputs, *extra), optimized(*copies, *extra)
        assert_same(got, expected, what=f"{plan}: output")
        grad = torch.randn_like(expected)
        expected.backward(grad)
        got.backward(grad)
        for name, a, b in zip("qkv", copies, inputs):
            assert_same(a.grad, b.grad, what=f"{plan}: d{name}; sites: {sites(optimized.attnopt_report)}")


class _ResidualInPlace(nn.Module):
    """A hand-written site whose output the model then writes in place: the original's ``p @ v`` saved p and v,
    not its output, so its backward works."""

    def forward(self, q, k, v):
        o = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
        o += q
        o[:, :, :1] *= 2.0
        return o


def test_the_attention_output_written_in_place_before_the_backward():
    for plan, eager, optimized in plans(_ResidualInPlace()):
        with forced_kernel_may_decline(plan):
            _same_gradients(plan, eager, optimized)
            if PLANS[plan].get("kernel"):
                assert [s.replaced for s in optimized.attnopt_report.sites] == [True], sites(optimized.attnopt_report)


def _fill_where_in_half(q, k, v, masked):
    return (torch.where(~masked, q @ k.transpose(-1, -2), -1e9) * 0.25).softmax(-1) @ v


def _fill_in_float_then_half(q, k, v, masked):
    scores = (q @ k.transpose(-1, -2)) * 0.25
    return scores.float().masked_fill(masked, torch.finfo(torch.float32).min).half().softmax(-1) @ v


def _added_in_float_then_half(q, k, v, masked):
    scores = (q @ k.transpose(-1, -2)) * 0.25
    return (scores.float() + masked.float() * torch.finfo(torch.float32).min).half().softmax(-1) @ v


@pytest.mark.parametrize("fn", [_fill_where_in_half, _fill_in_float_then_half, _added_in_float_then_half])
def test_a_fill_beyond_the_range_the_scores_are_stored_at_is_neg_inf(fn):
    """float16 scores hold -1e9, or float32's finfo.min cast down, as -inf: a row such a mask hides entirely is
    NaN in eager, not the average of v. An added mask cast down after it is left to eager."""
    masked = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    masked[0] = True  # batch row 0: no visible key
    masked[1, ..., 5:] = True
    calls = [(None, (*qkv(dtype=torch.float16, seed=s), masked)) for s in (1, 2)]
    for plan, (eager, optimized) in check_calls(Fn(fn), calls, tol=BF16).items():
        got = optimized(*calls[0][1])
        assert got[0].isnan().all() and not got[1].isnan().any(), f"{plan}: {sites(optimized.attnopt_report)}"
        if fn is _added_in_float_then_half:
            assert [s.replaced for s in optimized.attnopt_report.sites] == [False], sites(optimized.attnopt_report)


def _padded_neg_inf(q, k, v, padded):
    return (q @ k.transpose(-1, -2) * 0.25).masked_fill(padded, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
def test_float64_gradients_with_a_row_hidden_entirely_stay_float64(kernel):
    """The fill's gradient (NaN dV on a head with a NaN row) is added to the kernel's at float64, not float32."""
    padded = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    padded[0] = True
    padded[1, ..., 6:] = True
    eager = Fn(_padded_neg_inf)
    optimized = attnopt.optimize(Fn(_padded_neg_inf), tune=False, kernel=kernel)
    for seed in (1, 2):
        inputs = [t.requires_grad_(True) for t in qkv(dtype=torch.float64, seed=seed)]
        copies = [t.detach().clone().requires_grad_(True) for t in inputs]
        grad = torch.randn(2, 2, 8, 16, dtype=torch.float64)
        eager(*inputs, padded).backward(grad)
        optimized(*copies, padded).backward(grad)
        for name, got, want in zip("qkv", copies, inputs):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-12, equal_nan=True,
                                       msg=lambda m, name=name: f"d{name}: {m}")
    assert [s.replaced for s in optimized.attnopt_report.sites] == [True], sites(optimized.attnopt_report)


def _padding_added_neg_inf(q, k, v, padded):
    return (q @ k.transpose(-1, -2) * 0.25 + torch.where(padded, NEG_INF, 0.0)).softmax(-1) @ v


def _padding_filled_neg_inf_then_causal_added(q, k, v, padded):
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(padded, NEG_INF)
    return (scores + torch.where(causal, NEG_INF, 0.0)).softmax(-1) @ v


@pytest.mark.parametrize("fn", [_padding_added_neg_inf, _padding_filled_neg_inf_then_causal_added])
def test_gradients_of_a_row_an_added_neg_inf_hides_entirely(fn):
    """``s + where(padded, -inf, 0)``: a batch row with every key padded is NaN, and autograd sends its NaN
    scores' gradient through the addition to its queries and every key of the head (dq and dk NaN there, not only
    dv). Where a ``masked_fill`` hides the keys, no gradient passes to the scores: dv alone is NaN."""
    padded = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    padded[0] = True
    padded[1, ..., 6:] = True
    for plan, eager, optimized in plans(Fn(fn)):
        with forced_kernel_may_decline(plan):
            _same_gradients(plan, eager, optimized, padded)
            assert_accounted(optimized.attnopt_report)
