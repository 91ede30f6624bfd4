"""The in-model trial (``passes/trial.py``): an optimized model's first inference calls alternate the planner's
kernels with their runners-up, timed whole, and the faster configuration stays.

The trial runs on CUDA; here its sites are on the CPU (``trial.DEVICES`` extended to it), where the planner's
candidates are ``sdpa_cpu`` and ``reference``. The time of a call comes from a clock the test sets: it reads which
kernel the site runs when the call ends, so each test says which configuration is faster in "the model".
"""

import copy

import pytest
import torch
from torch import nn

import attnopt
from attnopt.kernels import registry
from attnopt.passes import trial, tuning

DIM, HEADS = 32, 2


class Causal(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM)


class Clock:
    """Seconds per call by the kernel the trial's first site runs at the call's end (``seconds``)."""

    def __init__(self, report, seconds: dict[str, float]):
        self.report, self.seconds, self.now, self.reads = report, seconds, 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # a call's end
            running = trial.running(self.report)
            self.now += self.seconds[running.sites[0].calls[0].kernel_name]
        return self.now


@pytest.fixture(autouse=True)
def measured(monkeypatch, tmp_path):
    """The planner measures (the suite's default ranks by the cost models), into a cache of the test's own."""
    monkeypatch.setenv("ATTNOPT_TUNE", "1")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(trial, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(trial, "CLOSE", 1e9)  # the CPU's reference kernel is far behind sdpa_cpu


def optimized(**options):
    """The original model and an optimized copy of it."""
    torch.manual_seed(0)
    model = Causal().eval()
    return model, attnopt.optimize(copy.deepcopy(model), **options)


def calls(model, optimized_model, count: int, shape=(2, 64, DIM)):
    """``count`` inference calls on fresh inputs, each checked against the original model."""
    for _ in range(count):
        x = torch.randn(*shape)
        with torch.no_grad():
            want, got = model(x), optimized_model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def started(monkeypatch, seconds: dict[str, float] | None = None):
    """``(model, optimized copy, its report, its trial, the trial's site)`` after the copy's first call (the capture,
    where the planner chooses); with ``seconds``, the test's clock (``Clock``) set."""
    model, fast = optimized()
    calls(model, fast, 1)
    report = fast.attnopt_report
    running = trial.running(report)
    [site] = running.sites
    if seconds is not None:
        monkeypatch.setattr(trial, "clock", Clock(report, seconds))
    return model, fast, report, running, site


def site_kernel(optimized_model) -> str:
    [site] = optimized_model.attnopt_report.sites
    return site.kernel


def test_a_runner_up_faster_in_the_model_replaces_the_planned_kernel(on_cpu, monkeypatch):
    model, fast, report, _, site = started(monkeypatch, {"sdpa_cpu": 2e-3, "reference": 1e-3})
    assert site_kernel(fast) == "sdpa_cpu" and site.allowed == ("reference",)
    calls(model, fast, 2 + 2 * trial.ROUNDS)  # each configuration's first call, then ROUNDS of each
    assert trial.running(report) is None
    [entry] = report.sites
    assert entry.kernel == "reference"
    assert "per call: sdpa_cpu 2.0 ms, reference 1.0 ms: reference kept" in entry.reason
    assert [call.kernel_name for call in site.calls] == ["reference"]
    calls(model, fast, 3)  # the model keeps its output on the kernel it switched to


@pytest.fixture
def third():
    """A third exact kernel on the CPU: the reference kernel under another name (a ``Deferred`` kernel forwards
    every call to its target; registered by name, it is a candidate like any other)."""
    name = "test_third"
    registry.register(registry.Deferred(name, registry.get("reference")))
    yield name
    del registry._KERNELS[name]


def test_up_to_three_finalists_take_turns_and_the_fastest_in_the_model_stays(on_cpu, monkeypatch, third):
    model, fast, report, running, site = started(monkeypatch, {"sdpa_cpu": 3e-3, "reference": 2e-3, third: 1e-3})
    assert set(site.allowed) == {"reference", third}
    ran = []
    real = trial.Trial._use

    def use(self, config):
        real(self, config)
        ran.append(site.calls[0].kernel_name)

    monkeypatch.setattr(trial.Trial, "_use", use)
    calls(model, fast, 3 * (1 + trial.ROUNDS) - 1)
    assert trial.running(report) is running
    kernels = running.finalists[0][1]
    assert kernels[0] == "sdpa_cpu" and set(kernels) == {"sdpa_cpu", "reference", third}
    # each call: its configuration, then the planner's again (between the trial's calls)
    assert ran[::2] == [kernels[i % 3] for i in range(3 * (1 + trial.ROUNDS) - 1)] and set(ran[1::2]) == {"sdpa_cpu"}
    calls(model, fast, 1)
    assert trial.running(report) is None and report.sites[0].kernel == third
    assert site.calls[0].kernel_name == third
    calls(model, fast, 2)


def test_a_kernel_needing_more_memory_than_the_original_and_the_choice_is_no_finalist(on_cpu, monkeypatch):
    class Hungry(registry.Deferred):
        def memory_bytes(self, spec):
            return 1 << 40

    registry.register(Hungry("test_hungry", registry.get("reference")))
    try:
        _, _, report, _, site = started(monkeypatch)
        assert "test_hungry" in {kernel for kernel, _, _ in report.sites[0].candidate_times}
        assert site.allowed == ("reference",)
    finally:
        del registry._KERNELS["test_hungry"]


def test_the_planned_kernel_stays_when_the_runner_up_is_not_faster_beyond_noise(on_cpu, monkeypatch):
    model, fast, report, _, site = started(monkeypatch, {"sdpa_cpu": 1.00e-3, "reference": 0.97e-3})
    calls(model, fast, 2 + 2 * trial.ROUNDS)
    assert trial.running(report) is None
    assert site_kernel(fast) == "sdpa_cpu"
    assert "sdpa_cpu kept" in report.sites[0].reason
    assert [call.kernel_name for call in site.calls] == ["sdpa_cpu"]


def test_calls_that_need_gradients_are_not_timed_and_run_the_planned_kernel(on_cpu, monkeypatch):
    model, fast, report, running, site = started(monkeypatch, {"sdpa_cpu": 2e-3, "reference": 1e-3})
    calls(model, fast, 4)  # sdpa_cpu, reference, then one timed call of each
    assert site.calls[0].kernel_name == "sdpa_cpu"  # the planner's, between the trial's calls
    x = torch.randn(2, 64, DIM, requires_grad=True)
    fast(x).sum().backward()  # a training call: the planner's kernel, no clock read
    assert site.calls[0].kernel_name == "sdpa_cpu" and trial.clock.reads == 8
    want = torch.autograd.grad(model(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
    assert trial.running(report) is running


def test_a_call_that_runs_no_site_of_the_trial_is_not_counted(on_cpu, monkeypatch):
    model, fast, report, running, site = started(monkeypatch, {"sdpa_cpu": 2e-3, "reference": 1e-3})
    counted = {((0, (2, 64, DIM)),): 2 + 2 * trial.ROUNDS - 1}
    calls(model, fast, 2 + 2 * trial.ROUNDS - 1)
    assert running.counts == counted
    # another shape: dynamo compiles a graph with symbolic shapes, which then serves the first shape too; its
    # site re-chooses by shape bucket and takes no part in the trial, whose site no longer runs
    calls(model, fast, 2, shape=(3, 40, DIM))
    calls(model, fast, 2)
    assert trial.running(report) is running and running.counts == counted
    assert site.calls[0].kernel_name == "sdpa_cpu" and report.sites[site.index].kernel == "sdpa_cpu"


def test_a_call_made_while_another_is_timed_runs_untimed_and_an_ended_trial_times_nothing(on_cpu, monkeypatch):
    """Calls from several threads: while one call is timed (the trial's lock held), another runs as the sites are,
    untimed and switching nothing; once the trial has chosen, a call that still holds the ended trial runs plainly,
    so the sites stay on the kernel the report names."""
    model, fast, report, running, site = started(monkeypatch, {"sdpa_cpu": 2e-3, "reference": 1e-3})
    compiled = fast.forward.compiled
    x = torch.randn(2, 64, DIM)
    inner = []

    def with_a_call_meanwhile(x):  # the timed call; "another thread" calls the model while it runs
        inner.append(running.run(compiled, (x,), {}))
        return compiled(x)

    with torch.no_grad():
        out = running.run(with_a_call_meanwhile, (x,), {})
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inner[0], model(x), rtol=1e-5, atol=1e-5)
    assert trial.clock.reads == 2 and running.counts == {((0, (2, 64, DIM)),): 1}
    calls(model, fast, 1 + 2 * trial.ROUNDS)
    assert trial.running(report) is None and running.ended and site.calls[0].kernel_name == "reference"
    with torch.no_grad():
        running.run(compiled, (x,), {})
    assert site.calls[0].kernel_name == "reference" == report.sites[0].kernel
    assert report.sites[0].reason.count("in the model's own inference calls") == 1


def test_a_trial_that_no_shape_completes_ends_on_the_planned_kernels(on_cpu, monkeypatch):
    model, fast, report, _, site = started(monkeypatch, {"sdpa_cpu": 2e-3, "reference": 1e-3})
    monkeypatch.setattr(trial, "MAX_CALLS", 5)
    calls(model, fast, 5)
    assert trial.running(report) is None
    assert site.calls[0].kernel_name == "sdpa_cpu" and site_kernel(fast) == "sdpa_cpu"


@pytest.mark.parametrize("options", [dict(kernel="sdpa_cpu"), dict(tune=False)], ids=["kernel forced", "no tuning"])
def test_no_trial_without_measured_finalists(on_cpu, options):
    model, fast = optimized(**options)
    calls(model, fast, 1)
    assert fast.attnopt_report.sites[0].replaced
    assert trial.running(fast.attnopt_report) is None


def test_no_trial_on_the_cpu():
    model, fast = optimized()
    calls(model, fast, 1)
    assert trial.running(fast.attnopt_report) is None


def test_a_site_switched_back_reuses_its_prepared_call(on_cpu, monkeypatch):
    model, fast, _, _, site = started(monkeypatch)
    [call] = site.calls
    plans = call._plans
    assert plans  # the first call's plan, on sdpa_cpu
    call.use("reference")
    calls(model, fast, 1)
    assert call._plans is not plans and call._plans
    call.use("sdpa_cpu")
    assert call._plans is plans and call.kernel_name == "sdpa_cpu"
    call.switch("reference")
    assert call._kept == {} and call.kernel_name == "reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_a_trial_on_cuda_chooses_between_its_finalists_and_keeps_the_output(monkeypatch):
    monkeypatch.setattr(trial, "CLOSE", 1e9)  # a runner-up however far behind in the planner's timing
    torch.manual_seed(0)
    model = Causal().to("cuda", torch.float16).eval()
    fast = attnopt.optimize(copy.deepcopy(model))
    x = torch.randn(2, 1024, DIM, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        fast(x)
        attnopt.settle(fast)
        report = fast.attnopt_report
        running = trial.running(report)
        assert running is not None
        planned = report.sites[0].kernel
        for _ in range(trial.FINALISTS * (1 + trial.ROUNDS)):
            x = torch.randn_like(x)
            torch.testing.assert_close(fast(x), model(x), rtol=2e-3, atol=2e-3)
    assert trial.running(report) is None
    [(site, kernels)] = running.finalists
    assert kernels[0] == planned and set(kernels[1:]) <= set(site.allowed)
    [entry] = report.sites
    assert f"per call: {planned} " in entry.reason and entry.kernel in kernels
    assert [call.kernel_name for call in site.calls] == [entry.kernel]
