"""Tuning: the cache (miss, hit, corrupt file, location), CPU timing within a budget, the original's stand-in."""

import json
import math
import time

import pytest
import torch

from attnopt.kernels import AttentionSpec, registry
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Fill, Window
from attnopt.passes import tuning
from attnopt.passes.plan import FAILED_WHEN_TIMED, candidates


def _spec(n=128, batch=1):
    q = torch.empty(batch, 2, n, 16, device="meta")
    return AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))


def _fake_timer(calls, seconds=1e-3):
    def time_candidates(runs, device, **kwargs):
        calls.extend(runs)
        return {name: seconds for name in runs}

    return time_candidates


def test_miss_then_hit_and_buckets(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "time_candidates", _fake_timer(calls))
    cache = tuning.TuningCache(tmp_path)
    first = tuning.measured_seconds(_spec(), ["reference", "sdpa_cpu"], cache)
    assert first == {"reference": 1e-3, "sdpa_cpu": 1e-3} and calls == ["reference", "sdpa_cpu"]
    assert cache.misses == 1
    again = tuning.measured_seconds(_spec(100), ["reference", "sdpa_cpu"], cache)  # 100 buckets with 128
    assert again == first and calls == ["reference", "sdpa_cpu"] and cache.hits == 1
    tuning.measured_seconds(_spec(100), ["reference", tuning.ORIGINAL], cache, original=tuning.Original("softmax"))
    assert calls == ["reference", "sdpa_cpu", tuning.ORIGINAL]  # only what is new is measured
    assert tuning.cache_key(_spec(300)) != tuning.cache_key(_spec(128))


def test_corrupt_file_is_a_miss_and_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "time_candidates", _fake_timer([], 2e-3))
    cache = tuning.TuningCache(tmp_path)
    path = cache.path(tuning.cache_key(_spec()))
    path.write_text("{not json")
    assert tuning.measured_seconds(_spec(), ["reference"], cache) == {"reference": 2e-3}
    assert cache.misses == 1
    assert json.loads(path.read_text())["seconds"] == {"reference": 2e-3}
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_location_override(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "env"))
    assert tuning.cache_dir() == tmp_path / "env"
    assert tuning.cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.delenv(tuning.CACHE_ENV)
    assert tuning.cache_dir().parts[-3:] == (".cache", "attnopt", "tuning")


def test_on_when_asked_on_cpu_too():
    q = torch.randn(1, 2, 8, 16)
    spec = AttentionSpec.from_tensors(q, q, q)
    assert tuning.enabled(spec, True) and not tuning.enabled(spec, False)


def test_cpu_candidates_are_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    # timings taken on a busy machine are measured again by design (test_noisy_cpu_timing_is_measured_again): the
    # cache is what this test is about, whatever the load of the machine it runs on
    monkeypatch.setattr(tuning, "NOISY_SPREAD", float("inf"))
    spec = _spec(64)
    cache = tuning.TuningCache(tmp_path)
    original = tuning.Original("softmax", 1 << 20)
    found = candidates(spec, tune=True, cache=cache, original=original)
    timed = [c for c in found if c.supported]
    assert {c.kernel for c in timed} == {"reference", "sdpa_cpu", tuning.ORIGINAL}
    assert all(c.measured and c.cost > 0 and c.estimate is not None for c in timed), found

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(tuning, "time_candidates", no_timing)
    again = candidates(spec, tune=True, cache=cache, original=original)
    assert cache.hits >= 1
    assert {c.kernel: c.cost for c in again if c.supported} == {c.kernel: c.cost for c in timed}


def test_the_budget_leaves_what_does_not_fit_to_the_estimates():
    q = torch.empty(4, 4, 2048, 32, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))
    plan = tuning.plan_timing(spec, {tuning.ORIGINAL: 100.0, "sdpa_cpu": 1e-3, "reference": 2e-3}, 1.5)
    assert plan.n_rows == 1  # the smallest slice: one batch x kv-head row
    assert plan.skipped == [tuning.ORIGINAL] and plan.timed == ["sdpa_cpu", "reference"]
    roomy = tuning.plan_timing(spec, {tuning.ORIGINAL: 0.1, "sdpa_cpu": 0.01}, 1.5)
    assert roomy.timed == [tuning.ORIGINAL, "sdpa_cpu"] and 1 < roomy.n_rows <= tuning.rows(spec)
    long = torch.empty(1, 4, 32768, 32, device="meta")  # one row of eager scores: 3 x 4 GiB
    spec = AttentionSpec.from_tensors(long, long, long, causal=True).with_(device=torch.device("cpu"))
    too_big = tuning.plan_timing(spec, {tuning.ORIGINAL: 1e-3, "sdpa_cpu": 1e-3}, 1.5)
    assert too_big.skipped == [tuning.ORIGINAL] and too_big.timed == ["sdpa_cpu"] and too_big.n_rows == 4


def test_timing_stops_at_the_deadline():
    runs = {"slow": lambda: time.sleep(0.05), "fast": lambda: None}
    start = time.perf_counter()
    got = tuning.time_candidates(runs, torch.device("cpu"), deadline=start + 0.12)
    assert time.perf_counter() - start < 0.3
    assert "fast" in got and got.get("slow", 0.05) >= 0.04


def test_a_slice_of_rows_keeps_every_term_consistent():
    q = torch.empty(3, 8, 64, 16, device="meta")
    kv = torch.empty(3, 2, 64, 16, device="meta")
    spec = AttentionSpec.from_tensors(
        q, kv, kv, key_padding=torch.empty(3, 64, dtype=torch.bool, device="meta"),
        bias=torch.empty(3, 8, 64, 64, device="meta"), mask=torch.empty(1, 1, 64, 64, device="meta"),
    )
    assert tuning.rows(spec) == 6
    one = tuning.sliced(spec, 1)
    assert (one.batch, one.q_heads, one.kv_heads) == (1, 4, 1) and tuning.rows(one) == 1
    assert tuple(one.key_padding.shape) == (1, 64) and tuple(one.bias.shape) == (1, 4, 64, 64)
    assert tuple(one.mask.shape) == (1, 1, 64, 64)
    one.validate()
    four = tuning.sliced(spec, 4)
    assert (four.batch, four.kv_heads) == (2, 2) and tuning.rows(four) == 4
    four.validate()
    small = tuning.shrunk(spec, 16)
    assert (small.q_len, small.kv_len) == (16, 16) and tuple(small.bias.shape) == (1, 4, 16, 16)
    small.validate()


@pytest.mark.parametrize("kind", ["softmax", "sdpa"])
@pytest.mark.parametrize("terms", [dict(causal=True), dict(causal=True, window=Window(3, 0)), dict(bias=True), {}])
def test_the_original_stand_in_computes_the_attention(kind, terms):
    torch.manual_seed(0)
    terms = dict(terms)
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    if terms.pop("bias", False):
        terms["bias"] = torch.randn(1, 4, 12, 12)
    spec = AttentionSpec.from_tensors(q, k, v, fill=Fill.NEG_INF, **terms)
    out = tuning.original_forward(q, k, v, spec, kind, tuning.original_inputs(spec, kind))
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, spec), atol=1e-5, rtol=1e-5)


def test_the_original_is_estimated_slower_where_it_materializes_big_scores():
    q = torch.empty(2, 8, 2048, 32, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))
    eager = tuning.original_estimate(spec, tuning.Original("softmax"))
    sdpa = tuning.original_estimate(spec, tuning.Original("sdpa"))
    assert math.isfinite(eager) and eager > 3 * sdpa


def test_progress_line_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "PROGRESS_AFTER_S", 0.0)
    tuning.measured_seconds(_spec(32), ["reference", "sdpa_cpu"], tuning.TuningCache(tmp_path), label="causal 1x2x32x32")
    err = capsys.readouterr().err
    assert "attnopt timing causal 1x2x32x32" in err and err.endswith("\n")


def test_a_slow_warm_up_is_named_in_a_log(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(tuning, "SLOW_WARMUP_S", 0.0)
    with caplog.at_level("INFO", logger="attnopt"):
        tuning.measured_seconds(_spec(32), ["reference", "sdpa_cpu"], tuning.TuningCache(tmp_path), label="lbl")
    err = capsys.readouterr().err  # pytest's capture is not a terminal: the log form
    assert "attnopt timing lbl: reference warmed up in" in err and "attnopt timing lbl: sdpa_cpu warmed up in" in err
    started = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert sorted(started) == ["attnopt: timing lbl: reference warm-up", "attnopt: timing lbl: sdpa_cpu warm-up"]


@pytest.mark.gpu
def test_tuning_measures_on_gpu(tmp_path, capsys):
    q = torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True)
    cache = tuning.TuningCache(tmp_path)
    original = tuning.Original("softmax", 0)
    found = candidates(spec, tune=True, cache=cache, original=original)
    timed = [c for c in found if c.supported]
    fastest = min(c.estimate for c in timed if c.kernel != tuning.ORIGINAL and c.estimate > 0)
    within = max(tuning.FAR_SLOWER * fastest, tuning.FAR_SLOWER_MIN_S)
    tiers = tuning.fastest_by_tier({c.kernel: c.estimate for c in timed})

    def behind(c):  # a kernel that compiles on first use (Flex, triton_flash), not estimated clearly ahead
        own = registry.COMPILES_NOTHING if c.kernel == tuning.ORIGINAL else registry.get(c.kernel).compiles
        cheaper = [e for tier, e in tiers.items() if tier < own]
        return bool(cheaper) and c.estimate * tuning.COMPILED_LEAD > min(cheaper)

    near = [c for c in timed if c.kernel == tuning.ORIGINAL or c.estimate <= within]
    far = [c for c in timed if c not in near]
    # every kernel within FAR_SLOWER of the fastest estimate is timed, the original too, but a compiling kernel
    # estimated behind; the reference kernel (estimated far slower at this length) is not, and keeps its estimate
    assert len(near) > 2 and all(c.measured != behind(c) for c in near), found
    assert "reference" in {c.kernel for c in far} and not any(c.measured for c in far), found
    print({c.kernel: c.cost for c in timed})
    again = candidates(spec, tune=True, cache=cache, original=original)
    assert cache.hits >= 1 and [c.cost for c in again if c.supported] == [c.cost for c in timed]


@pytest.mark.keeps_original
def test_the_default_of_tune_comes_from_the_environment(monkeypatch):
    from attnopt.config import TUNE_ENV, Options

    monkeypatch.delenv(TUNE_ENV, raising=False)
    assert Options.build().tune and Options.build().keep_original
    monkeypatch.setenv(TUNE_ENV, "0")
    assert not Options.build().tune and Options.build(tune=True).tune
    monkeypatch.setenv(TUNE_ENV, "maybe")
    with pytest.raises(ValueError, match="ATTNOPT_TUNE"):
        Options.build()
    with pytest.raises(TypeError, match="keep_original"):
        Options.build(tune=False, keep_original="no")


def test_noisy_cpu_timing_is_measured_again(tmp_path, monkeypatch):
    """A CPU timing whose rounds spread widely (a busy machine) is used, but the next process measures it
    again; a quiet one is read from the cache from then on."""
    calls = []
    rounds = iter([({"original": 1e-3, "sdpa_cpu": 2e-3}, 3.0), ({"original": 2e-3, "sdpa_cpu": 1e-3}, 1.1)])

    def time_candidates(runs, device, spread=None, **kwargs):
        calls.append(sorted(runs))
        seconds, ratio = next(rounds)
        spread.update({name: ratio for name in runs})
        return {name: seconds[name] for name in runs}

    monkeypatch.setattr(tuning, "time_candidates", time_candidates)
    cache = tuning.TuningCache(tmp_path)
    names, original = [tuning.ORIGINAL, "sdpa_cpu"], tuning.Original("softmax")
    key = tuning.cache_key(_spec())
    first = tuning.measured_seconds(_spec(), names, cache, original=original)
    assert first == {tuning.ORIGINAL: 1e-3, "sdpa_cpu": 2e-3} and cache.is_noisy(key)
    second = tuning.measured_seconds(_spec(), names, cache, original=original)
    assert second == {tuning.ORIGINAL: 2e-3, "sdpa_cpu": 1e-3} and not cache.is_noisy(key)
    third = tuning.measured_seconds(_spec(), names, cache, original=original)
    assert third == second and len(calls) == 2


def test_time_candidates_reports_the_spread_of_its_rounds():
    # warm-up, then two slow rounds of five; sleeps of tens of ms, so that a busy machine's scheduling jitter
    # (a few ms) does not make the even one look noisy
    delays = iter([0.0, 0.02, 0.12, 0.02, 0.12, 0.02])

    def uneven():
        time.sleep(next(delays))

    spread = {}
    tuning.time_candidates({"uneven": uneven, "even": lambda: time.sleep(0.02),
                            "tiny": lambda: None}, torch.device("cpu"), spread=spread)
    assert spread["uneven"] > tuning.NOISY_SPREAD > spread["even"] >= 1.0
    assert "tiny" not in spread  # microsecond runs: jitter, not a busy machine


def test_a_gpu_kernel_estimated_far_slower_is_not_timed():
    """The reference kernel on a GPU is some 60x the fast kernels by estimate (measured ~30x): timing it at a
    long training shape would cost minutes of the first call. The original is always timed: it is the baseline."""
    q = torch.empty(1, 16, 16384, 128, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cuda"))
    estimates = {tuning.ORIGINAL: 0.5, "triton_flash": 2e-3, "sdpa_flash": 3e-3, "reference": 0.18}
    plan = tuning.plan_timing(spec, estimates, math.inf)
    assert plan.timed == [tuning.ORIGINAL, "triton_flash", "sdpa_flash"] and plan.skipped == ["reference"]
    # the fastest kernel counts even when its timing is already cached (only the reference left to time)
    later = tuning.plan_timing(spec, {"reference": 0.18}, math.inf, fastest=2e-3)
    assert later.timed == [] and later.skipped == ["reference"]
    # a call estimated in microseconds is always timed: estimates leave out host time (a decode step)
    decode = tuning.plan_timing(spec, {tuning.ORIGINAL: 3e-4, "sdpa_cudnn": 3e-7, "triton_decode": 8e-6}, math.inf)
    assert decode.timed == [tuning.ORIGINAL, "sdpa_cudnn", "triton_decode"] and decode.skipped == []
    # on the CPU the budget decides, not the ratio
    cpu = tuning.plan_timing(spec.with_(device=torch.device("cpu")), {"sdpa_cpu": 1e-6, "reference": 1e-4}, math.inf)
    assert cpu.timed == ["sdpa_cpu", "reference"]


def test_an_inference_call_is_timed_through_the_prepared_call(monkeypatch):
    """A replaced site's inference calls run ``Kernel.prepare``'s call (``SiteCall``), not ``forward``: the
    planner times that, or a decode step would be charged bookkeeping it never runs."""
    from attnopt.kernels import registry

    kernel = registry.get("sdpa_cpu")
    calls = []
    real_prepare = kernel.prepare

    def prepare(spec):
        run = real_prepare(spec)
        return lambda *args: calls.append("prepared") or run(*args)

    monkeypatch.setattr(kernel, "prepare", prepare)
    inference = _spec(32)
    tuning._runner("sdpa_cpu", inference, None)()
    assert calls == ["prepared"]
    calls.clear()  # a training call runs forward and backward through the op: nothing prepared
    tuning._runner("sdpa_cpu", inference.with_(requires_grad=True), None)()
    tuning._runner("sdpa_cpu", inference.with_(dropout_p=0.1), None)()
    assert calls == []


def test_a_compiling_kernel_is_timed_on_a_gpu_only_where_it_leads():
    """FlexAttention compiles on first use through inductor (its backward: minutes at long lengths; its forward:
    seconds, and inductor's start in a fresh process), triton_flash its large Triton kernels (a second or two
    each): a call on a GPU times one only when its estimate is COMPILED_LEAD below the fastest kernel of a lower
    compile tier."""
    q = torch.empty(1, 16, 4096, 128, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cuda"), requires_grad=True)
    assert (registry.get("sdpa_cudnn").compiles < registry.get("triton_flash").compiles
            < registry.get("flex").compiles)
    assert registry.get("triton_decode").compiles == registry.COMPILES_NOTHING  # small: decode is host-bound
    behind = tuning.plan_timing(spec, {tuning.ORIGINAL: 0.5, "sdpa_flash": 1e-3, "flex": 2e-3}, math.inf)
    assert behind.timed == [tuning.ORIGINAL, "sdpa_flash"] and behind.skipped == ["flex"]
    leads = tuning.plan_timing(spec, {tuning.ORIGINAL: 0.5, "triton_flash": 4e-3, "flex": 1e-3}, math.inf)
    assert leads.timed == [tuning.ORIGINAL, "flex", "triton_flash"]
    # estimated a little ahead is not enough to pay for the compile (packed documents: 3.3 ms against 2.75 ms)
    close = tuning.plan_timing(spec, {tuning.ORIGINAL: 0.5, "triton_flash": 2.75e-3, "flex": 2.4e-3}, math.inf)
    assert close.timed == [tuning.ORIGINAL, "triton_flash"] and close.skipped == ["flex"]
    # Flex is compared with triton_flash too, triton_flash with the SDPA backends only (packed documents: the
    # backends take a dense mask, triton_flash skips tiles)
    docs = tuning.plan_timing(spec, {"sdpa_efficient": 9e-3, "triton_flash": 2.75e-3, "flex": 2.4e-3}, math.inf)
    assert docs.timed == ["triton_flash", "sdpa_efficient"] and docs.skipped == ["flex"]
    # pure causal: cuDNN estimated ahead, so triton_flash's kernel is not compiled to be timed
    causal = tuning.plan_timing(spec, {"sdpa_cudnn": 2.75e-4, "triton_flash": 3.5e-4}, math.inf)
    assert causal.timed == ["sdpa_cudnn"] and causal.skipped == ["triton_flash"]
    # the fastest cheaper kernel counts when its timing is cached already
    later = tuning.plan_timing(spec, {"flex": 2e-3}, math.inf, cheaper={registry.COMPILES_NOTHING: 1e-3})
    assert later.skipped == ["flex"]
    later = tuning.plan_timing(spec, {"flex": 2e-3}, math.inf, cheaper={registry.COMPILES_TRITON: 1e-3})
    assert later.skipped == ["flex"]
    # inference alike: a forward estimated behind is not compiled, one estimated clearly ahead is
    inference = spec.with_(requires_grad=False)
    behind = tuning.plan_timing(inference, {"sdpa_flash": 1e-3, "flex": 2e-3}, math.inf)
    assert behind.timed == ["sdpa_flash"] and behind.skipped == ["flex"]
    leads = tuning.plan_timing(inference, {"sdpa_flash": 1e-3, "flex": 0.5e-3}, math.inf)
    assert leads.timed == ["flex", "sdpa_flash"]
    # on the CPU its own budget decides (the rule is the GPU's)
    cpu = tuning.plan_timing(inference.with_(device=torch.device("cpu")), {"sdpa_cpu": 1e-3, "flex": 2e-3}, math.inf)
    assert cpu.timed == ["sdpa_cpu", "flex"]


def test_a_kernel_timed_later_still_keeps_a_slower_compiling_one_from_being_timed(tmp_path):
    """The packed-document training site of an 8-layer Llama-style model on the GPU (16k tokens, 16/4 heads, D 128,
    the kernels' estimates for it): ``optimize()`` times triton_flash after its background compile (``deferrable``)
    and the others at once. Flex, estimated at 3.3 ms against triton_flash's 2.75 ms, is behind it all the same:
    measured against cuDNN's 4.7 ms alone it led, and the first call compiled FlexAttention's forward and backward
    for more than five minutes."""
    n = 16384
    q = torch.empty(1, 16, n, 128, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(1, 4, n, 128, dtype=torch.bfloat16, device="meta")
    docs = torch.empty(1, n, dtype=torch.long, device="meta")
    spec = AttentionSpec.from_tensors(q, kv, kv, causal=True, q_doc=docs, kv_doc=docs, fill=Fill.FINITE_ADDED)
    spec = spec.with_(device=torch.device("cuda"), requires_grad=True)
    estimates = {"triton_flash": 2.75e-3, "flex": 3.3e-3, "sdpa_cudnn": 4.67e-3, "sdpa_efficient": 9.06e-3,
                 "reference": 0.179, tuning.ORIGINAL: 0.034}
    later = tuning.deferrable(spec, list(estimates), estimates, tuning.TuningCache(tmp_path))
    assert later == ["triton_flash"]
    now = [name for name in estimates if name not in later]
    plan = tuning.timing_plan(spec, now, estimates, math.inf)
    assert "flex" in plan.skipped and "flex" not in plan.timed
    assert "sdpa_cudnn" in plan.timed
    # with triton_flash's timing cached instead of deferred, the same
    assert "flex" in tuning.timing_plan(spec, ["flex", "sdpa_cudnn"], estimates, math.inf).skipped
    # and Flex clearly ahead of every kernel is timed
    ahead = {**estimates, "flex": 1e-3}
    assert "flex" in tuning.timing_plan(spec, now, ahead, math.inf).timed


def test_a_candidate_failing_when_timed_is_reported_with_its_error(tmp_path, monkeypatch, caplog):
    spec = _spec(64)
    real_runner = tuning._runner

    def runner(name, spec, original, padding=None, sharing=1):
        if name == "reference":
            def once():
                raise RuntimeError("out of resources: shared memory")
            return once
        return real_runner(name, spec, original, padding, sharing)

    monkeypatch.setattr(tuning, "_runner", runner)
    with caplog.at_level("WARNING", logger="attnopt"):
        found = candidates(spec, tune=True, cache=tuning.TuningCache(tmp_path))
    failed = next(c for c in found if c.kernel == "reference")
    assert not failed.supported and failed.reasons == (FAILED_WHEN_TIMED,)
    assert "reference failed when timed" in caplog.text and "out of resources: shared memory" in caplog.text
    assert any(c.supported and c.measured for c in found)


def test_short_gpu_calls_are_timed_in_bursts(monkeypatch):
    """A decode-sized call on a GPU overlaps with the next launch in a model: it is timed as a burst of calls
    before one synchronization. A long call, and every CPU call, is timed alone."""
    monkeypatch.setattr(tuning, "_sync", lambda device: None)
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1
        time.sleep(2 * tuning.BURST_BELOW_S)

    seconds = tuning.time_candidates({"short": short, "long": long}, torch.device("cuda"), repeats=3)
    assert calls["short"] == 1 + 3 * tuning.BURST_CALLS and calls["long"] == 1 + 3
    assert seconds["long"] >= 2 * tuning.BURST_BELOW_S > seconds["short"]
    calls["short"] = 0
    tuning.time_candidates({"short": short}, torch.device("cpu"), repeats=3)
    assert calls["short"] == 1 + 3


def test_training_candidates_are_timed_through_the_sites_call_path(monkeypatch):
    """A training call of a replaced site runs the kernel inside the op's autograd function: the timing runs
    the same path, so that its host work per call is counted as the original's autograd work is."""
    from attnopt import ops

    calls = []
    through_site = ops._eager_training
    monkeypatch.setattr(ops, "_eager_training", lambda *args: calls.append(args[1].name) or through_site(*args))
    q = torch.randn(1, 2, 16, 8)
    training = AttentionSpec.from_tensors(q, q, q, causal=True, requires_grad=True)
    assert tuning.time_kernel("sdpa_cpu", training) > 0
    assert calls and set(calls) == {"sdpa_cpu"}
    calls.clear()
    assert tuning.time_kernel("sdpa_cpu", training.with_(requires_grad=False)) > 0
    assert not calls  # an inference call runs the kernel's prepared call


def test_graphs_that_run_inside_cuda_graphs_are_known_from_the_options():
    """inductor's "reduce-overhead" and "max-autotune" (or its own switch) run the compiled graph inside CUDA
    graphs; the eager compiler and the other modes do not. Those timings get cache keys of their own, and
    only a GPU inference call is timed by replays."""
    from torch._inductor import config as inductor_config

    from attnopt.config import Options

    assert tuning.replays_graphs(Options.build(compiler="inductor", mode="reduce-overhead"))
    assert tuning.replays_graphs(Options.build(compiler="inductor", mode="max-autotune"))
    assert not tuning.replays_graphs(Options.build(compiler="inductor", mode="max-autotune-no-cudagraphs"))
    assert not tuning.replays_graphs(Options.build(compiler="inductor"))
    assert not tuning.replays_graphs(Options.build(compiler="eager"))
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert tuning.replays_graphs(Options.build(compiler="inductor"))
        assert not tuning.replays_graphs(Options.build(compiler="eager"))

    q = torch.empty(4, 16, 1, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(4, 4, 4096, 128, device="meta", dtype=torch.bfloat16)
    decode = AttentionSpec.from_tensors(q, k, k).with_(device=torch.device("cuda"))
    assert tuning.cache_key(decode, True) != tuning.cache_key(decode) == tuning.cache_key(decode, False)
    assert tuning.replayable(decode, True) and not tuning.replayable(decode, False)
    assert not tuning.replayable(decode.with_(requires_grad=True), True)
    assert not tuning.replayable(decode.with_(device=torch.device("cpu")), True)


def test_the_planner_times_by_replays_where_the_graph_runs_inside_cuda_graphs(monkeypatch, tmp_path):
    """``plan_graph`` hands ``replays_graphs(options)`` to the timing of every site: a model compiled with
    ``mode="reduce-overhead"`` has its candidates timed as the CUDA graphs will run them (here on the CPU,
    where nothing is replayed, with inductor itself left out: only what the planner is told is checked)."""
    import attnopt
    from attnopt import backend

    asked = []
    measured = tuning.measured_seconds

    def spy(*args, **kwargs):
        asked.append(kwargs.get("replayed"))
        return measured(*args, **kwargs)

    monkeypatch.setattr(tuning, "measured_seconds", spy)
    monkeypatch.setattr(backend, "run_compiler", lambda gm, inputs, options: gm.forward)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    q = torch.randn(1, 2, 64, 16)
    for mode, want in (("reduce-overhead", True), ("max-autotune-no-cudagraphs", False)):
        asked.clear()
        model = attnopt.optimize(Attention(), tune=True, cache_dir=str(tmp_path / mode), compiler="inductor",
                                 mode=mode)
        with torch.no_grad():
            torch.testing.assert_close(model(q, q, q), Attention()(q, q, q))
        assert asked == [want], asked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_candidates_are_timed_by_replays(tmp_path):
    """A decode step (a static cache's 1 query over 4159 keys, one row left-padded) in a graph that runs inside
    CUDA graphs: the original and the kernels are captured and timed by their replays, and cached under the
    replayed key only. A candidate that syncs the host cannot be captured: inf, and the others still time."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 16, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(4, 4, 4159, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    keep = torch.ones(4, 4159, dtype=torch.bool, device="cuda")
    keep[3, :1024] = False
    spec = AttentionSpec.from_tensors(q, k, k, key_padding=keep)
    cache = tuning.TuningCache(tmp_path)
    found = candidates(spec, tune=True, cache=cache, original=tuning.Original("softmax", 0), replayed=True)
    timed = {c.kernel: c.cost for c in found if c.measured}
    assert tuning.ORIGINAL in timed and "triton_decode" in timed, found
    assert all(0 < t < 1e-2 for t in timed.values()), timed
    assert cache.get(tuning.cache_key(spec, True)) and cache.get(tuning.cache_key(spec)) is None

    x = torch.zeros(1, device="cuda")
    callers, rng = torch.cuda.current_stream(), torch.cuda.get_rng_state()
    seconds = tuning.time_replayed({"adds": lambda: x.add_(1), "syncs": lambda: x.add_(1).item()},
                                   torch.device("cuda"), repeats=3)
    assert 0 < seconds["adds"] < 1e-3 and seconds["syncs"] == math.inf
    # the failed capture left neither its stream current nor the user's generator capturing, nor moved it
    assert torch.cuda.current_stream() == callers
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert torch.randn(1024, device="cuda").std() > 0.5


class _FakeCuda:
    """The stream bookkeeping of ``torch.cuda`` as ``time_replayed`` meets it, on a machine without CUDA:
    ``torch.cuda.graph`` behaves as torch's does (enter its capture stream, then begin; on exit end the capture,
    then restore the stream, with the default generator in capture mode in between), and ending a capture that a
    host sync invalidated raises."""

    class Generator:
        def __init__(self):
            self.capturing = False

        def clone_state(self):
            return type(self)()

        def graphsafe_set_state(self, state):
            self.capturing = state.capturing

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            pass

    def __init__(self):
        self.callers, self.capture_stream = self.Stream("callers"), self.Stream("capture")
        self.current, self.invalidated = self.callers, False
        self.default_generators = (self.Generator(),)

    def current_stream(self, device=None):
        return self.current

    def set_stream(self, stream):
        self.current = stream

    def stream(self, stream):
        fake = self

        class Switch:
            def __enter__(self):
                self.before, fake.current = fake.current, stream

            def __exit__(self, *exc):
                fake.current = self.before
        return Switch()

    def graph(self, graph):
        fake, switch = self, self.stream(self.capture_stream)

        class Capture:
            def __enter__(self):
                switch.__enter__()
                fake.invalidated, fake.default_generators[0].capturing = False, True

            def __exit__(self, *exc):
                if fake.invalidated:  # capture_end raises: torch's __exit__ stops before restoring the stream,
                    # and the generator's capture epilogue never runs
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                fake.default_generators[0].capturing = False
                switch.__exit__(*exc)
        return Capture()


def test_a_failed_capture_leaves_the_callers_stream_and_generator_as_they_were(monkeypatch):
    """A candidate that syncs the host cannot be captured. Its failed capture must not leave
    ``torch.cuda.graph``'s capture stream current (the model's next work would run there), nor the device's
    default generator in capture mode (the user's next ``torch.randn`` on the device would raise)."""
    fake = _FakeCuda()
    for name in ("current_stream", "set_stream", "stream", "graph", "default_generators"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: fake.Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(tuning, "_failed", lambda *args, **kwargs: None)

    def syncs():
        if fake.current == fake.capture_stream:
            fake.invalidated = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    seconds = tuning.time_replayed({"syncs": syncs}, torch.device("cuda"), repeats=1)
    assert seconds == {"syncs": math.inf}
    assert fake.current is fake.callers
    assert not fake.default_generators[0].capturing


class _DropoutAroundAttention(torch.nn.Module):
    """Attention without dropout of its own between two dropouts, as GPT-2's embedding and residual dropouts sit
    around its attention: the model's random numbers come from torch's generator, call after call."""

    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.drop = heads, torch.nn.Linear(d, 3 * d), torch.nn.Dropout(0.2)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.drop(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.drop(out.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("train", [True, False])
def test_timing_leaves_the_users_random_numbers_alone(tmp_path, train, device):
    """Timing the candidates (on the first call, and for each new shape bucket) draws random inputs and runs
    kernels that may draw their own: none of it may come from the user's generator. Otherwise every dropout
    mask of the optimized model, from its first call on, differs from the original's under the same seed."""
    import copy

    import attnopt

    def state():
        return torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None

    torch.manual_seed(0)
    model = _DropoutAroundAttention().train(train).to(device)
    optimized = attnopt.optimize(copy.deepcopy(model), tune=True, cache_dir=str(tmp_path))
    # 48: planned while dynamo compiles (which keeps the generator's state itself); 200: recompiled with a
    # symbolic length; 700: a new shape bucket of that graph, timed at the call (``RechoicePlan``)
    for n in (48, 200, 700):
        x = torch.randn(2, n, 32, device=device)
        torch.manual_seed(1)
        want, after = model(x), state()
        torch.manual_seed(1)
        got = optimized(x)
        assert all(a is None or torch.equal(a, b) for a, b in zip(after, state())), n
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
@pytest.mark.parametrize("training", [False, True])
def test_timed_calls_build_what_a_models_calls_build(monkeypatch, kernel, training):
    """A model's calls hand each site new term tensors (a view made per call, none shared between sites), so
    what a kernel keeps per term tensor (tile lists, SDPA's mask, rows without keys) is never found from one
    call to the next. The timed calls must not find it either, or a kernel whose per-call work is mostly that
    build is timed faster than it runs (a padded training site's triton_flash: 1.3 ms timed, 4.6 ms in the model,
    ``benchmarks/results/padded_training.md``). Within one call (forward, then backward) it may be found."""
    from attnopt.kernels import term_cache

    lookups = []  # per lookup: (the tensors' ids, whether it was found)
    real_get = term_cache.TermCache.get

    def get(self, tensors, static, build):
        built = []
        value = real_get(self, tensors, static, lambda: built.append(1) or build())
        lookups.append((tuple(id(t) for t in tensors), not built))
        return value

    monkeypatch.setattr(term_cache.TermCache, "get", get)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :30] = False  # left padding: rows without a key
    spec = _spec(40).with_(batch=2, causal=True, key_padding=keep, fill=Fill.FINITE_ADDED, requires_grad=training)
    run = tuning._runner(kernel, spec, None, padding=keep)
    for _ in range(3):
        lookups.clear()
        run()
        assert lookups, f"{kernel} looks nothing up: this test checks nothing"
        for n, (ids, found) in enumerate(lookups):
            assert not found or ids in [earlier for earlier, _ in lookups[:n]], "found what an earlier call built"


def test_sites_sharing_their_terms_share_the_timed_build():
    """``sharing`` sites read one term tensor per forward: the timed calls take new terms every ``sharing`` calls,
    the same ones in between, so each call costs a site's share of what a kernel builds per term."""
    keep = torch.ones(2, 40, dtype=torch.bool)
    spec = _spec(40).with_(batch=2, causal=True, key_padding=keep, fill=Fill.FINITE_ADDED)
    terms = tuning.calls_terms(spec, 3)
    calls = [terms() for _ in range(7)]
    assert [c.key_padding is calls[0].key_padding for c in calls[:3]] == [True] * 3
    assert calls[3].key_padding is not calls[0].key_padding and calls[4].key_padding is calls[3].key_padding
    assert calls[6].key_padding is not calls[3].key_padding
    assert all(torch.equal(c.key_padding, keep) and c.key_padding is not keep for c in calls)
    assert tuning.cache_key(spec, sharing=3) == tuning.cache_key(spec, sharing=2) != tuning.cache_key(spec)
