"""A 4D additive mask handed to the model: read as a boolean mask on the calls where it holds only 0 and finfo.min.

``generate()`` with a static cache builds its ``[B, 1, N, max_cache_len]`` mask outside the model and passes it
in: the rewrite cannot see how it was made, so it adds it as written, and in bfloat16 the SDPA kernels are
refused for adding it at another precision. A mask of only 0 and ``finfo(dtype).min`` is exactly a boolean mask
there (the fill absorbs every score), so the rewrite checks the values once per forward and runs a faster
kernel on such calls; any other values take the additive call. Both must give the original's output.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import registry
from attnopt.passes import masks

HEADS, DIM, N = 2, 16, 24


class GivenMask(torch.nn.Module):
    """Hugging Face's eager attention over a mask the caller made: scores + mask, softmax in float32."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HEADS * DIM, 3 * HEADS * DIM)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(2, 3)) * DIM ** -0.5 + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, n, HEADS * DIM)


@pytest.fixture
def masks_seen(monkeypatch):
    """Per kernel call (``forward`` or a prepared inference call): the dtype of the mask it got."""
    seen = collections.Counter()
    for kernel in registry.all_kernels():
        def prepare(spec, _kernel=kernel, _prepare=kernel.prepare):
            run = _prepare(spec)

            def counted(q, k, v, spec):
                seen[_kernel.name, None if spec.mask is None else spec.mask.dtype] += 1
                return run(q, k, v, spec)
            return counted

        monkeypatch.setattr(kernel, "prepare", prepare)
    return seen


def _model(dtype):
    torch.manual_seed(0)
    return GivenMask().to(dtype).eval()


def _fill_mask(keep: torch.Tensor, dtype) -> torch.Tensor:
    """HF's additive form of a boolean mask: 0 where kept, finfo.min elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def _causal_padded(batch=2, pad=5) -> torch.Tensor:
    keep = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(batch, 1, 1, 1)
    keep[1, ..., :pad] = False  # left padding: rows 0..pad-1 of batch 1 see no key
    return keep


def _close(got, want):
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_a_mask_of_zeros_and_the_minimum_runs_as_a_boolean_mask(masks_seen):
    model = _model(torch.bfloat16)
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    mask = _fill_mask(_causal_padded(), torch.bfloat16)
    with torch.no_grad():
        got, want = optimized(x, mask), model(x, mask)
    _close(got, want)
    (site,) = optimized.attnopt_report.sites
    assert site.replaced and "holds only 0 and" in site.reason, site.reason
    boolean = site.reason.rsplit(" run ", 1)[-1].split(" on it")[0]
    assert masks_seen == {(boolean, torch.bool): 1}, masks_seen
    # the rows of batch 1 that see no key: the uniform average of v, as the original's finfo.min gives
    assert torch.isfinite(got).all()


def test_other_values_take_the_additive_call(masks_seen):
    model = _model(torch.bfloat16)
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    boolean = _fill_mask(_causal_padded(), torch.bfloat16)
    one_other = boolean.clone()
    one_other[0, 0, 5, 0] = -1e4  # a kept key of batch 0 pushed down by a finite value: not a boolean mask
    with torch.no_grad():
        optimized(x, boolean)  # captured with a mask of 0 and finfo.min
        masks_seen.clear()
        for mask in (boolean - 1.0, torch.randn(2, 1, N, N).to(torch.bfloat16), one_other):
            _close(optimized(x, mask), model(x, mask))
    site = optimized.attnopt_report.sites[0]
    assert set(masks_seen) == {(site.kernel, torch.bfloat16)}, masks_seen
    assert sum(masks_seen.values()) == 3


def test_float16_keeps_the_additive_call():
    """float16's finfo.min does not absorb a score (its spacing there is 32): not a boolean mask."""
    model = _model(torch.float16)
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.float16)
    with torch.no_grad():
        optimized(x, _fill_mask(_causal_padded(), torch.float16))
    (site,) = optimized.attnopt_report.sites
    assert site.replaced and "holds only 0" not in site.reason, site.reason


def test_inductor_graphs_take_no_branch():
    model = _model(torch.bfloat16)
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False, compiler="inductor")
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    mask = _fill_mask(_causal_padded(), torch.bfloat16)
    with torch.no_grad():
        _close(optimized(x, mask), model(x, mask))
    (site,) = optimized.attnopt_report.sites
    assert site.replaced and "holds only 0" not in site.reason, site.reason


def test_fill_only_keep():
    keep = _causal_padded()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        fill = torch.finfo(dtype).min
        mask = _fill_mask(keep, dtype)
        assert torch.equal(masks.fill_only_keep(mask, fill), keep)
        assert masks.fill_only_keep(mask.masked_fill(~keep, float("-inf")), fill) is None  # -inf: NaN rows
        assert masks.fill_only_keep(mask.masked_fill(~keep, -1e4), fill) is None
        assert masks.fill_only_keep(mask + 0.5, fill) is None
        assert torch.equal(masks.fill_only_keep(torch.zeros(2, 1, 3, 4, dtype=dtype), fill), torch.ones(2, 1, 3, 4,
                                                                                                          dtype=bool))


_MODEL = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_boolean_pattern_gives_the_original(data):
    """Random keep patterns, fully masked rows and batch rows included, through the boolean branch: the
    original's output (the uniform average of v on rows with no kept key)."""
    if not _MODEL:
        model = _model(torch.bfloat16)
        _MODEL["pair"] = model, attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    model, optimized = _MODEL["pair"]
    seed = data.draw(st.integers(0, 2 ** 16))
    density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, N, N, generator=gen) < density
    if data.draw(st.booleans()):
        keep[data.draw(st.integers(0, 1)), :, data.draw(st.integers(0, N - 1))] = False  # a row with no key
    x = torch.randn(2, N, HEADS * DIM, generator=gen).to(torch.bfloat16)
    mask = _fill_mask(keep, torch.bfloat16)
    with torch.no_grad():
        _close(optimized(x, mask), model(x, mask))
    assert "holds only 0 and" in optimized.attnopt_report.sites[0].reason


def test_training_gradients_through_the_boolean_branch(masks_seen):
    """Fully masked rows included: the gradients of the original's uniform rows (an added finfo.min)."""
    model = _model(torch.bfloat16).train()
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    mask = _fill_mask(_causal_padded(), torch.bfloat16)
    grad = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    results = []
    for m in (model, optimized):
        xi = x.clone().requires_grad_(True)
        out = m(xi, mask)
        out.backward(grad)
        results.append((out, xi.grad, m.qkv.weight.grad))
    for got, want in zip(results[1], results[0]):
        _close(got, want)
    assert "holds only 0 and" in optimized.attnopt_report.sites[0].reason


class MaskedRouter(torch.nn.Module):
    """A look-alike: a router's softmax over expert logits plus a given 0 / finfo.min mask, with no value product."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(HEADS * DIM, N)

    def forward(self, x, mask):
        return torch.softmax(self.gate(x) + mask, dim=-1, dtype=torch.float32) @ self.gate.weight.float()


def test_a_masked_router_is_left_alone():
    torch.manual_seed(0)
    model = MaskedRouter().to(torch.bfloat16).eval()
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    mask = _fill_mask(torch.rand(2, N, N) > 0.3, torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x, mask), model(x, mask))
    sites = optimized.attnopt_report.sites
    assert sites and not any(s.replaced for s in sites), str(optimized.attnopt_report)
    assert all("not attention" in s.reason for s in sites), [s.reason for s in sites]


def _graph_peak(model, mask, **options):
    optimized = attnopt.optimize(copy.deepcopy(model), keep_original=False, tune=False, **options)
    x = torch.randn(2, N, HEADS * DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        _close(optimized(x, mask), model(x, mask))
    report = optimized.attnopt_report
    return report.memory[0].after, report.sites[0]


def test_the_boolean_mask_is_counted_and_a_branch_that_breaks_max_mem_is_not_taken(monkeypatch):
    """The branch's boolean mask (one byte per element) lives through the forward: the graph's estimated peak
    counts it, and under a ``max_mem`` that the additive plan fits but the branch would not, the branch is left
    out and the site keeps its planned kernel."""
    from attnopt.passes import pipeline

    model = _model(torch.bfloat16)
    mask = _fill_mask(_causal_padded(), torch.bfloat16)
    with_branch, site = _graph_peak(model, mask)
    assert "holds only 0 and" in site.reason, site.reason
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_fill_only_kernel", lambda *args, **kwargs: None)
        without_branch, plain = _graph_peak(model, mask)
    assert "holds only 0" not in plain.reason
    assert with_branch >= without_branch + mask.numel(), (with_branch, without_branch)
    tight, site = _graph_peak(model, mask, max_mem=without_branch + mask.numel() - 1)
    assert site.replaced and site.kernel == plain.kernel and "holds only 0" not in site.reason, site.reason
    assert tight == without_branch
