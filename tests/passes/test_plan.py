"""The planner under max_mem and exact: budgets met exactly, approximately, or refused with a useful error."""

import pytest
import torch

import attnopt
from attnopt.passes.plan import MemoryBudgetError, choose
from attnopt.kernels import AttentionSpec

from .budget_models import SharpCausal

N = 2048


def _run(model, x, **options):
    optimized = attnopt.optimize(model, **options)
    with torch.no_grad():
        return optimized(x), optimized.attnopt_report


def _budget_error(model, x, **options) -> MemoryBudgetError:
    with pytest.raises(Exception) as info:
        _run(model, x, **options)
    err = info.value
    while not isinstance(err, MemoryBudgetError) and err is not None:  # dynamo wraps backend errors
        err = getattr(err, "inner_exception", None) or err.__cause__
    assert isinstance(err, MemoryBudgetError), info.value
    assert isinstance(err, ValueError)
    return err


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, N, 128, generator=torch.Generator().manual_seed(0))


def test_budget_met_by_exact_flash_plan_where_eager_does_not_fit(x):
    model = SharpCausal().eval()
    expected = model(x)
    got, report = _run(model, x, max_mem="30MB")
    (site,) = report.sites
    assert site.replaced and site.exact and site.kernel == "sdpa_cpu", str(report)
    (mem,) = report.memory
    assert mem.after <= 30e6 < mem.before
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_budget_only_an_approximation_fits(x):
    model = SharpCausal(softcap=50.0).eval()
    err = _budget_error(model, x, max_mem="30MB")
    text = str(err)
    for needed in ("max_mem=28.6 MiB", "best exact plan", "(top level)", "a budget of at least", "shorter input",
                   "exact=False"):
        assert needed in text, text
    expected = model(x)
    got, report = _run(model, x, max_mem="30MB", exact=False, tol=0.1)
    (site,) = report.sites
    assert site.replaced and not site.exact and site.kernel.startswith("approx_"), str(report)
    assert site.error is not None and site.error < 0.1
    assert report.memory[0].after <= 30e6
    assert "APPROXIMATE" in str(report) and report.approximate == [site]
    measured = (got - expected).norm() / expected.norm()
    assert measured.item() == pytest.approx(site.error, rel=1e-3)


def test_approximations_rejected_over_tol(x):
    model = SharpCausal(softcap=50.0).eval()
    err = _budget_error(model, x, max_mem="30MB", exact=False, tol=1e-4)
    assert "exact or accepted approximate" in str(err)


def test_no_budget_exact_false_still_exact(x):
    model = SharpCausal(softcap=50.0).eval()
    _, report = _run(model, x[:, :256], exact=False)
    assert report.sites[0].exact and report.sites[0].kernel == "reference"


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_approximations_never_chosen_when_exact(softcap):
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, softcap=softcap)
    choice = choose(spec, exact=True)
    assert choice.exact
    approx = {c.kernel: c.reasons for c in choice.candidates if c.kernel.startswith("approx_")}
    assert approx and all(any("exact=True" in r or "not supported" in r for r in rs) for rs in approx.values())


def test_explain_prints_reasons_and_times(x):
    model = SharpCausal(softcap=50.0).eval()
    with torch.no_grad():
        report = attnopt.explain(model, (x[:, :256],))
    text = str(report)
    assert "sdpa_cpu" in text and "softcap=50.0 not supported by SDPA" in text
    assert "approximate kernel and exact=True" in text
    assert "ms estimated" in text and "estimated peak forward" in text
    assert report.sites[0].candidate_times and report.sites[0].rejected_kernels
