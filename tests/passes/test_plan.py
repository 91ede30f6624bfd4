"""The planner: the original code as a candidate (never slower), and plans under max_mem and exact."""

import copy

import pytest
import torch

import attnopt
from attnopt.kernels import AttentionSpec
from attnopt.passes import tuning
from attnopt.passes.plan import NOISE, Candidate, MemoryBudgetError, choose, versus_original

from .budget_models import SharpCausal

N = 2048


def _run(model, x, **options):
    """The optimized copy's output and report; ``model`` itself stays the original."""
    optimized = attnopt.optimize(copy.deepcopy(model), **options)
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


# ------------------------------------------------------------------ the original is a candidate
def _candidate(name, seconds, memory, measured=True, estimate=None):
    return Candidate(name, (), seconds, memory, measured=measured, estimate=seconds if estimate is None else estimate)


@pytest.mark.parametrize("kernel_s,kernel_mem,replaces,starts", [
    (1e-3, 10, True, "measured 2.0x faster than the original"),
    (2e-3 * (1 + NOISE) * 0.99, 10, True, "measured as fast as the original within 5%"),
    (2e-3 * (1 + NOISE) * 0.99, 1000, False, "original measured fastest"),
    (1.97e-3, 1000, False, "original kept: measured only 2% faster, within the noise, and not smaller"),
    (3e-3, 10, False, "original measured fastest (k 3.0 ms vs the original's 2.0 ms)"),
])
def test_a_kernel_replaces_the_original_only_when_faster_beyond_noise(kernel_s, kernel_mem, replaces, starts):
    replaced, reason = versus_original(_candidate("k", kernel_s, kernel_mem), _candidate("original", 2e-3, 100))
    assert replaced == replaces and reason.startswith(starts), reason


def test_measured_and_estimated_times_are_not_compared():
    """A measured kernel against an original only estimated: both sides are taken from the estimates."""
    kernel = _candidate("k", 1e-3, 10, measured=True, estimate=5e-3)
    original = _candidate("original", 2e-3, 100, measured=False)
    replaced, reason = versus_original(kernel, original)
    assert not replaced and reason.startswith("original estimated fastest"), reason


def _timed(monkeypatch, seconds: dict[str, float]):
    """Make every timing return ``seconds`` per candidate (per timed row slice: the ratios are what count)."""
    def time_candidates(runs, device, **kwargs):
        return {name: seconds[name] for name in runs if name in seconds}

    monkeypatch.setattr(tuning, "time_candidates", time_candidates)


SMALL = 256


@pytest.mark.keeps_original
def test_site_left_alone_when_the_original_is_measured_fastest(x, monkeypatch, tmp_path):
    _timed(monkeypatch, {"original": 1e-3, "sdpa_cpu": 3e-3, "reference": 5e-3})
    model = SharpCausal().eval()
    got, report = _run(model, x[:, :SMALL], cache_dir=str(tmp_path), tune=True)
    (site,) = report.sites
    assert not site.replaced and site.reason.startswith("original measured fastest"), str(report)
    assert "sdpa_cpu" in site.reason
    assert torch.equal(got, model(x[:, :SMALL]))  # the graph runs as written
    (mem,) = report.memory
    assert mem.after == mem.before


@pytest.mark.keeps_original
def test_site_replaced_when_a_kernel_is_measured_faster(x, monkeypatch, tmp_path):
    _timed(monkeypatch, {"original": 10e-3, "sdpa_cpu": 1e-3, "reference": 2e-3})
    model = SharpCausal().eval()
    got, report = _run(model, x[:, :SMALL], cache_dir=str(tmp_path), tune=True)
    (site,) = report.sites
    assert site.replaced and site.kernel == "sdpa_cpu", str(report)
    assert site.reason.startswith("measured 10.0x faster than the original"), site.reason
    assert any(name == "sdpa_cpu" and measured for name, _, measured in site.candidate_times)
    torch.testing.assert_close(got, model(x[:, :SMALL]), atol=1e-5, rtol=1e-5)


def test_a_forced_kernel_is_used_even_when_slower(x, monkeypatch, tmp_path):
    _timed(monkeypatch, {"original": 1e-3, "sdpa_cpu": 3e-3, "reference": 5e-3})
    _, report = _run(SharpCausal().eval(), x[:, :SMALL], cache_dir=str(tmp_path), tune=True, kernel="reference")
    (site,) = report.sites
    assert site.replaced and site.kernel == "reference" and site.reason == "forced by kernel='reference'"


def test_keep_original_false_replaces_every_supported_site(x, monkeypatch, tmp_path):
    _timed(monkeypatch, {"original": 1e-3, "sdpa_cpu": 3e-3, "reference": 5e-3})
    _, report = _run(SharpCausal().eval(), x[:, :SMALL], cache_dir=str(tmp_path), tune=True, keep_original=False)
    (site,) = report.sites
    assert site.replaced and site.kernel == "sdpa_cpu" and "original" not in site.reason, str(report)


@pytest.mark.keeps_original
def test_max_mem_forces_a_slower_exact_plan_and_says_so(x, monkeypatch, tmp_path):
    _timed(monkeypatch, {"original": 1e-3, "sdpa_cpu": 3e-3, "reference": 5e-3})
    model = SharpCausal().eval()
    got, report = _run(model, x, cache_dir=str(tmp_path), tune=True, max_mem="30MB")
    (site,) = report.sites
    assert site.replaced and site.exact and site.kernel == "sdpa_cpu", str(report)
    assert site.reason.startswith("max_mem (28.6 MiB) forces a slower plan: sdpa_cpu measured"), site.reason
    assert "which does not fit" in site.reason
    assert report.memory[0].after <= 30e6 < report.memory[0].before
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_the_original_is_estimated_when_tuning_is_off():
    q = torch.empty(1, 4, 4096, 32, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))
    choice = choose(spec, original=tuning.Original("softmax", 4 * 4096 * 4096 * 4 * 2))
    assert choice.kernel == "sdpa_cpu" and choice.reason.startswith("estimated"), choice.reason
    assert any(c.original and not c.measured for c in choice.candidates)
    sdpa_site = choose(spec, original=tuning.Original("sdpa", 4 * 4 * 4096))  # SDPA for SDPA gains nothing
    assert sdpa_site.kernel == tuning.ORIGINAL and sdpa_site.reason.startswith("original"), sdpa_site.reason


@pytest.mark.parametrize("shape,terms,measured", [
    # (shape, mask terms, measured reference / sdpa_cpu time on the 2-core CPU, unloaded, medians of 5; reference's
    # tiles through ATen's fused attention, which skips the causal half that sdpa_cpu computes with a mask)
    ((1, 4, 4096, 32), dict(causal=True), 49 / 33),
    ((1, 4, 4096, 32), dict(), 82 / 67),
    ((2, 8, 1024, 32), dict(causal=True, mask=(2, 1, 1, 1024)), 18 / 20),
    ((1, 4, 2048, 64), dict(causal=True, mask=(1, 1, 1, 2048)), 26 / 34),
    ((1, 4, 8192, 32), dict(causal=True, window=128), 26 / 906),
])
def test_cost_models_rank_the_cpu_kernels_as_measured(shape, terms, measured):
    """Issue 11: the estimates had reference 85.9 ms against sdpa_cpu 176 ms where 3821 / 1256 ms was measured.
    Each pair is now ranked as measured, and eager attention is estimated slower than both."""
    from attnopt.kernels import registry
    from attnopt.kernels.spec import Window

    terms = dict(terms)
    if "mask" in terms:
        terms["mask"] = torch.empty(terms["mask"], device="meta")
    if "window" in terms:
        terms["window"] = Window(terms["window"], 0)
    q = torch.empty(*shape, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, **terms).with_(device=torch.device("cpu"))
    estimated = registry.get("reference").cost(spec) / registry.get("sdpa_cpu").cost(spec)
    assert (estimated > 1) == (measured > 1), (estimated, measured)
    assert 0.5 < estimated / measured < 3, (estimated, measured)
    eager = tuning.original_estimate(spec, tuning.Original("softmax"))
    assert eager > registry.get("sdpa_cpu").cost(spec) and eager > registry.get("reference").cost(spec)


# ------------------------------------------------------------------ max_mem and exact
def test_budget_met_by_exact_flash_plan_where_eager_does_not_fit(x):
    model = SharpCausal().eval()
    expected = model(x)
    got, report = _run(model, x, max_mem="30MB", tune=False)
    (site,) = report.sites
    assert site.replaced and site.exact and site.kernel == "sdpa_cpu", str(report)
    (mem,) = report.memory
    assert mem.after <= 30e6 < mem.before
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_budget_only_an_approximation_fits(x):
    model = SharpCausal(softcap=50.0).eval()
    err = _budget_error(copy.deepcopy(model), x, max_mem="20MB", tune=False)  # reference needs ~26 MB here
    text = str(err)
    for needed in ("max_mem=19.1 MiB", "best exact plan", "(top level)", "a budget of at least", "shorter input",
                   "exact=False"):
        assert needed in text, text
    expected = model(x)
    got, report = _run(model, x, max_mem="20MB", exact=False, tol=0.1, tune=False)
    (site,) = report.sites
    assert site.replaced and not site.exact and site.kernel.startswith("approx_"), str(report)
    assert site.error is not None and site.error < 0.1
    assert report.memory[0].after <= 20e6
    assert "APPROXIMATE" in str(report) and report.approximate == [site]
    measured = (got - expected).norm() / expected.norm()
    assert measured.item() == pytest.approx(site.error, rel=1e-3)


def test_approximations_rejected_over_tol(x):
    model = SharpCausal(softcap=50.0).eval()
    err = _budget_error(model, x, max_mem="20MB", exact=False, tol=1e-4, tune=False)
    assert "exact or accepted approximate" in str(err)


def test_no_budget_exact_false_still_exact(x):
    """Without memory pressure an exact plan wins: the reference kernel, or the original code itself."""
    model = SharpCausal(softcap=50.0).eval()
    _, report = _run(model, x[:, :256], exact=False, tune=False)
    (site,) = report.sites
    assert site.exact and (site.kernel == "reference" or not site.replaced), str(report)
    _, forced_exact = _run(model, x[:, :256], exact=False, tune=False, keep_original=False)
    assert forced_exact.sites[0].exact and forced_exact.sites[0].kernel == "reference"


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
        report = attnopt.explain(model, (x[:, :256],), tune=False, keep_original=False)
    text = str(report)
    assert "sdpa_cpu" in text and "softcap=50.0 not supported by SDPA" in text
    assert "approximate kernel and exact=True" in text
    assert "ms estimated" in text and "estimated peak forward" in text
    assert report.sites[0].candidate_times and report.sites[0].rejected_kernels
