"""``torch.compile(backend="attnopt")`` with the timing of compiling kernels after inductor's compile (issue 15's
first-call overhead): the kernel is compiled in a background thread while inductor compiles the graph, timed after
it, and the site's ``Deferred`` kernel points at the fastest before the first call.

On a GPU the compiling kernels are ``triton_flash`` and FlexAttention. Here a test kernel plays one on the CPU
(``tuning.DEFER_DEVICES`` extended to it): it computes with the reference kernel, estimates itself far ahead so that
it leads the kernels that compile nothing, records the thread of each call, and its measured time is set by the
test.
"""

import math
import threading

import pytest
import torch
from torch import nn

from attnopt.backend import Backend, report_of
from attnopt.kernels import registry
from attnopt.passes import plan, tuning

NAME = "test_compiling"
DIM, HEADS = 16, 2


class Compiling(registry.Kernel):
    name = NAME
    compiles = registry.COMPILES_TRITON

    def __init__(self):
        self.threads: list[str] = []
        self.compiled = threading.Event()
        self.compiled.set()

    @property
    def reference(self):
        return registry.get("reference")

    def not_supported_reasons(self, spec):
        return self.reference.not_supported_reasons(spec)

    def memory_bytes(self, spec):
        return self.reference.memory_bytes(spec)

    def cost(self, spec):
        return 1e-9  # leads every kernel that compiles nothing by far

    def forward(self, q, k, v, spec, seed):
        self.threads.append(threading.current_thread().name)
        if threading.current_thread().name == "attnopt-warm-up":
            self.compiled.wait(timeout=60)  # "compiling" until the test lets it finish
        return self.reference.forward(q, k, v, spec, seed)

    def backward(self, *args):
        return self.reference.backward(*args)


@pytest.fixture
def compiling(monkeypatch, tmp_path):
    """The test kernel registered (and removed after), deferral on the CPU, and the time its timing after the
    compile gives it (``times[NAME]``: a factor of the fastest other kernel's measured time)."""
    kernel = registry.register(Compiling())
    monkeypatch.setattr(tuning, "DEFER_DEVICES", ("cpu", "cuda"))
    factor = {"value": 0.1}
    real = tuning.measured_seconds

    def measured(spec, names, cache, **kw):
        got = real(spec, [n for n in names if n != NAME], cache, **kw)
        if NAME in names:
            got[NAME] = factor["value"] * min(t for n, t in got.items() if n != tuning.ORIGINAL)
        return got

    monkeypatch.setattr(tuning, "measured_seconds", measured)
    kernel.factor = factor
    kernel.cache = str(tmp_path)
    yield kernel
    del registry._KERNELS[NAME]


class Causal(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        s = (q @ k.transpose(-1, -2) * self.scale).masked_fill(~causal, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _model_and_input():
    torch.manual_seed(0)
    return Causal(), torch.randn(2, 32, DIM, generator=torch.Generator().manual_seed(1))


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=Backend(tune=True, **options))


def _check_same(compiled, model, x):
    got = compiled(x)
    expected = model(x)
    torch.testing.assert_close(got, expected)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(x1).square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("factor", [0.1, 10.0, math.inf],
                         ids=["compiled_kernel_faster", "compiled_kernel_slower", "compiled_kernel_fails"])
def test_compiling_kernel_is_warmed_in_the_background_and_timed_after_the_compile(compiling, factor):
    """The test kernel leads by estimate, so it is not timed in the pass: the site runs a Deferred kernel, the
    test kernel runs first in the background thread, then is timed, and the Deferred kernel points at whichever
    measured faster (the kernel timed before the compile when the test kernel fails). Outputs and gradients are
    the original's either way."""
    compiling.factor["value"] = factor
    faster = factor < 1
    model, x = _model_and_input()
    compiled = _compiled(model, cache_dir=compiling.cache)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    (site,) = report_of(compiled).sites
    assert site.replaced
    assert f"{NAME} compiled in the background and timed after inductor's compile" in site.reason
    assert "measured fastest once compiled" in site.reason
    assert compiling.threads and compiling.threads[0] == "attnopt-warm-up"
    times = {k: (t, m) for k, t, m in site.candidate_times}
    assert times[NAME][1] == math.isfinite(factor)  # measured, unless it failed (then its estimate stays)
    if math.isfinite(factor):
        others = min(t for k, (t, m) in times.items() if k not in (NAME, tuning.ORIGINAL) and m)
        assert (times[NAME][0] < others) == faster
    assert (site.kernel == NAME) == faster
    aliases = [k for k in registry._ALIASES.values() if k.target.name == site.kernel]
    assert aliases and aliases[-1].target is registry.get(site.kernel)
    calls = len(compiling.threads)
    _check_same(compiled, model, x)
    assert ("MainThread" in compiling.threads[calls:]) == faster  # the graph runs the test kernel only if it won


@pytest.mark.parametrize("options", [{"max_mem": "1GB"}, {"verify": True}, {"compiler": "eager"},
                                     {"mode": "max-autotune-no-cudagraphs"}],
                         ids=["max_mem", "verify", "compiler_eager", "autotuning_mode"])
def test_no_deferral_where_the_plan_needs_every_kernel_now(compiling, options):
    """A memory budget, verify, a graph run as Python and inductor's autotuning modes time the test kernel in the
    pass, in the main thread, as before: no Deferred kernel, no background thread."""
    model, x = _model_and_input()
    compiled = _compiled(model, cache_dir=compiling.cache, **options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    (site,) = report_of(compiled).sites
    assert site.replaced and site.kernel == NAME
    assert "background" not in site.reason
    assert "attnopt-warm-up" not in compiling.threads


def test_no_deferral_on_devices_not_listed(compiling, monkeypatch):
    monkeypatch.setattr(tuning, "DEFER_DEVICES", ("cuda",))
    model, x = _model_and_input()
    compiled = _compiled(model, cache_dir=compiling.cache)
    with torch.no_grad():
        compiled(x)
    (site,) = report_of(compiled).sites
    assert site.kernel == NAME and "background" not in site.reason
    assert "attnopt-warm-up" not in compiling.threads


def _choose(spec, cache, original_seconds):
    """``plan.choose`` with deferral, the original measured at ``original_seconds``."""
    real = tuning.measured_seconds

    def measured(spec, names, cache, **kw):
        got = real(spec, names, cache, **kw)
        if tuning.ORIGINAL in got:
            got[tuning.ORIGINAL] = original_seconds
        return got

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "measured_seconds", measured)
        return plan.choose(spec, tune=True, cache=cache, original=tuning.Original("softmax", 1 << 20), defer=True)


def test_the_original_kept_by_the_kernels_timed_now_times_the_deferred_ones_now(compiling, tmp_path):
    """When no kernel timed in the pass beats the original, only the deferred kernel could replace the site: it
    is timed in the pass then (a replacement is not undone after the compile), and chosen if it is faster."""
    from attnopt.kernels.spec import AttentionSpec

    q = torch.randn(1, 2, 64, 8)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))
    cache = tuning.TuningCache(tmp_path / "slow")
    # the original far slower: the kernels timed now replace it, the test kernel waits for the compile
    waits = _choose(spec, cache, original_seconds=10.0)
    assert waits.kernel != NAME and waits.deferred == (NAME,)
    assert not waits.chosen.deferred and waits.chosen.measured
    # the original faster than every kernel timed now: the test kernel (10x faster than those) is timed now
    compiling.factor["value"] = 0.1
    kept = _choose(spec, tuning.TuningCache(tmp_path / "fast"), original_seconds=1e-12)
    assert kept.deferred == ()
    assert kept.kernel == tuning.ORIGINAL  # 1e-12 s: nothing beats it, the test kernel included
    tested = {c.kernel: c for c in kept.candidates}
    assert tested[NAME].measured and not tested[NAME].deferred


def test_deferred_kernel_delegates_every_call_to_its_target():
    alias = registry.deferred("reference")
    assert registry.get(alias.name) is alias
    assert alias not in registry.all_kernels()
    q = torch.randn(1, 2, 16, 8)
    from attnopt.kernels.spec import AttentionSpec

    spec = AttentionSpec.from_tensors(q, q, q, causal=True)
    out, lse = alias.forward(q, q, q, spec, 0)
    ref_out, ref_lse = registry.get("reference").forward(q, q, q, spec, 0)
    torch.testing.assert_close(out, ref_out)
    alias.target = registry.get("sdpa_cpu")
    assert alias.exact and alias.not_supported_reasons(spec) == registry.get("sdpa_cpu").not_supported_reasons(spec)
    torch.testing.assert_close(alias.infer(q, q, q, spec), ref_out)


class Window(nn.Module):
    """A causal sliding window of ``WINDOW`` keys, built from ``arange`` in the forward: SDPA needs the dense mask,
    triton_flash walks the band, so triton_flash leads by estimate and must first compile."""

    WINDOW = 128

    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)
        keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < self.WINDOW)
        s = (q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("route", ["backend", "optimize"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_gpu_triton_flash_is_compiled_in_the_background_and_timed_after(tmp_path, train, route):
    """On the GPU with an empty tuning cache, a windowed site's triton_flash is compiled in the background thread
    (while inductor compiles the graph, or while ``optimize``'s first call runs) and timed after it (before the
    graph's first call, or before the next call); the site runs whichever kernel measured faster, with the
    original's outputs (and gradients), and later calls keep that kernel."""
    import attnopt

    torch.manual_seed(0)
    model = Window().cuda().to(torch.bfloat16)
    x = torch.randn(2, 2048, 256, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    if route == "backend":
        compiled = torch.compile(model, backend=Backend(tune=True, cache_dir=str(tmp_path)))
    else:
        torch.manual_seed(0)
        compiled = attnopt.optimize(Window().cuda().to(torch.bfloat16), tune=True, cache_dir=str(tmp_path))
        compiled.load_state_dict(model.state_dict())
    with torch.set_grad_enabled(train):
        got, expected = compiled(x), model(x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    if route == "optimize":
        assert "triton_flash compiled in the background, timed before a later call" in \
            compiled.attnopt_report.sites[0].reason
        for thread in _warm_up_threads():
            thread.join()
        with torch.set_grad_enabled(train):
            torch.testing.assert_close(compiled(x), expected, atol=2e-2, rtol=2e-2)
    report = report_of(compiled) if route == "backend" else compiled.attnopt_report
    (site,) = report.sites
    assert site.replaced and "triton_flash compiled in the background" in site.reason
    assert "measured fastest once compiled" in site.reason
    times = {k: (t, m) for k, t, m in site.candidate_times}
    assert times["triton_flash"][1]  # timed after the compile
    assert site.kernel == min((k for k, (t, m) in times.items() if m), key=lambda k: times[k][0])
    if train:
        g = torch.randn_like(got)
        (gx,) = torch.autograd.grad(compiled(x), x, g)
        (ex,) = torch.autograd.grad(model(x), x, g)
        torch.testing.assert_close(gx, ex, atol=5e-2, rtol=5e-2)
    assert report.sites == [site]  # settled once


def test_only_triton_compiles_are_deferred(compiling, tmp_path):
    """A kernel compiled through torch.compile (FlexAttention's tier) is never deferred: its compile in another
    thread would wait for dynamo's lock, held by the thread that waits for it. Cached timings are not deferred."""
    from attnopt.kernels.spec import AttentionSpec

    q = torch.randn(1, 2, 64, 8)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True).with_(device=torch.device("cpu"))
    cache = tuning.TuningCache(tmp_path)
    estimates = {"sdpa_cpu": 1e-3, NAME: 1e-9}
    assert tuning.deferrable(spec, list(estimates), estimates, cache) == [NAME]
    compiling.compiles = registry.COMPILES_INDUCTOR
    assert tuning.deferrable(spec, list(estimates), estimates, cache) == []
    compiling.compiles = registry.COMPILES_TRITON
    cache.put(tuning.cache_key(spec), {NAME: 1e-6, "sdpa_cpu": 1e-3})
    assert tuning.deferrable(spec, list(estimates), estimates, cache) == []
    # not ahead of the kernels that compile nothing by COMPILED_LEAD: timed now, if at all
    assert tuning.deferrable(spec, list(estimates), {"sdpa_cpu": 1e-3, NAME: 0.9e-3}, tuning.TuningCache(
        tmp_path / "empty")) == []


def test_a_compiling_kernel_chosen_without_deferral_is_compiled_beside_inductor(compiling, monkeypatch):
    """A site whose compiling kernel was timed already (here: nothing deferrable, so it is timed in the pass, as
    when its timing comes from the cache) runs it directly, and the warm-up thread runs it once while inductor
    compiles (its Triton compile, or the load of its cached binary, off the first call's path)."""
    monkeypatch.setattr(tuning, "deferrable", lambda *args, **kwargs: [])
    model, x = _model_and_input()
    compiled = _compiled(model, cache_dir=compiling.cache)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    (site,) = report_of(compiled).sites
    assert site.kernel == NAME and "background" not in site.reason
    assert "attnopt-warm-up" in compiling.threads


def test_triton_flash_warms_up_in_the_thread_under_the_interpreter(monkeypatch, tmp_path):
    """The real kernel in the background thread (Triton's interpreter here, its compile on a GPU), inference and
    training: made a CPU candidate estimated far ahead, it is run first by the warm-up thread, then timed, and the
    site keeps whichever kernel measured faster, with the original's outputs and gradients."""
    kernel = registry.get("triton_flash")
    monkeypatch.setattr(type(kernel), "devices", None)
    monkeypatch.setattr(type(kernel), "cost", lambda self, spec: 1e-9)
    monkeypatch.setattr(tuning, "DEFER_DEVICES", ("cpu",))
    threads = []
    forward = type(kernel).forward

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(kernel), "forward", spy)
    monkeypatch.setattr(Window, "WINDOW", 16)
    torch.manual_seed(0)
    model = Window(dim=32, heads=2)
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    for train in (False, True):
        torch._dynamo.reset()
        threads.clear()
        compiled = torch.compile(model, backend=Backend(tune=True, cache_dir=str(tmp_path / str(train))))
        _same_in_mode(compiled, model, x, train)
        (site,) = report_of(compiled).sites
        assert "triton_flash compiled in the background and timed after inductor's compile" in site.reason
        assert threads[0] == "attnopt-warm-up" and "MainThread" in threads  # warmed, then timed here


def _same_in_mode(optimized, model, x, train: bool) -> None:
    """``optimized`` gives ``model``'s output on ``x`` and, in training, its input gradient."""
    x1, x2 = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        got, expected = optimized(x1), model(x2)
    torch.testing.assert_close(got, expected)
    if train:
        got.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)


def _warm_up_threads():
    return [t for t in threading.enumerate() if t.name == "attnopt-warm-up"]


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_optimize_switches_a_site_between_calls_once_its_kernel_is_compiled(compiling, train):
    """``attnopt.optimize`` (a graph run as Python, no compile to wait for): the first calls run the kernel timed
    in the pass while the test kernel "compiles" in the background; the call after its compile times it and
    switches the site before running. Each call's backward runs the kernel its forward ran; outputs and gradients
    are the original's throughout."""
    import attnopt

    compiling.compiled.clear()
    model, x = _model_and_input()
    optimized = attnopt.optimize(Causal(), tune=True, cache_dir=compiling.cache)
    optimized.load_state_dict(model.state_dict())

    def step():
        _same_in_mode(optimized, model, x, train)

    step()
    (site,) = optimized.attnopt_report.sites
    assert site.kernel != NAME and f"{NAME} compiled in the background, timed before a later call" in site.reason
    step()  # still compiling: no timing, no switch
    assert optimized.attnopt_report.sites[0].kernel != NAME
    assert "MainThread" not in compiling.threads
    compiling.compiled.set()
    for thread in _warm_up_threads():
        thread.join()
    step()  # settles first: the test kernel measured 10x faster, then runs
    site = optimized.attnopt_report.sites[0]
    assert site.kernel == NAME and "measured fastest once compiled" in site.reason
    assert compiling.threads.count("MainThread") >= 1
    step()
    assert optimized.attnopt_report.sites[0] == site  # settled once


def test_settle_waits_for_the_compile_and_switches_without_a_call(compiling):
    """``attnopt.settle``: with a timeout shorter than the compile it returns False and changes nothing; without
    one it waits for the compile, times the kernel and switches the site before any further call. Nothing is left
    to settle then, and the outputs are the original's."""
    import attnopt

    compiling.compiled.clear()
    model, x = _model_and_input()
    optimized = attnopt.optimize(Causal(), tune=True, cache_dir=compiling.cache)
    optimized.load_state_dict(model.state_dict())
    _same_in_mode(optimized, model, x, train=True)
    before = optimized.attnopt_report.sites[0]
    assert before.kernel != NAME
    assert attnopt.settle(optimized, timeout=0.05) is False
    assert optimized.attnopt_report.sites[0] == before and "MainThread" not in compiling.threads
    threading.Timer(0.2, compiling.compiled.set).start()
    assert attnopt.settle(optimized) is True
    site = optimized.attnopt_report.sites[0]
    assert site.kernel == NAME and "measured fastest once compiled" in site.reason
    assert attnopt.settle(optimized, timeout=0) is True
    _same_in_mode(optimized, model, x, train=True)  # runs the switched kernel
    assert optimized.attnopt_report.sites[0] == site and "MainThread" in compiling.threads


def test_optimize_warms_triton_flash_in_the_thread_under_the_interpreter(monkeypatch, tmp_path):
    """``attnopt.optimize`` with the real kernel (Triton's interpreter): compiled in the background after the
    first call's rewrite, timed before the call after it, outputs the original's on every call."""
    import attnopt

    kernel = registry.get("triton_flash")
    monkeypatch.setattr(type(kernel), "devices", None)
    monkeypatch.setattr(type(kernel), "cost", lambda self, spec: 1e-9)
    monkeypatch.setattr(tuning, "DEFER_DEVICES", ("cpu",))
    monkeypatch.setattr(Window, "WINDOW", 16)
    torch.manual_seed(0)
    model = Window(dim=32, heads=2)
    optimized = attnopt.optimize(Window(dim=32, heads=2), tune=True, cache_dir=str(tmp_path))
    optimized.load_state_dict(model.state_dict())
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))
        assert "triton_flash compiled in the background, timed before a later call" in \
            optimized.attnopt_report.sites[0].reason
        for thread in _warm_up_threads():
            thread.join()
        torch.testing.assert_close(optimized(x), model(x))
    site = optimized.attnopt_report.sites[0]
    assert "measured fastest once compiled" in site.reason
    assert any(k == "triton_flash" and measured for k, _, measured in site.candidate_times)


def test_a_failing_later_timing_leaves_the_sites_as_they_are(compiling, monkeypatch, caplog):
    """The timing before a later call is an optimization: when it raises, the call runs on the kernel the site
    had, with a warning, and the model's outputs are the original's."""
    import attnopt

    model, x = _model_and_input()
    optimized = attnopt.optimize(Causal(), tune=True, cache_dir=compiling.cache)
    optimized.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))
    kernel = optimized.attnopt_report.sites[0].kernel
    for thread in _warm_up_threads():
        thread.join()

    def broken(*args, **kwargs):
        raise RuntimeError("no device memory left")

    monkeypatch.setattr(tuning, "measured_seconds", broken)
    with torch.no_grad(), caplog.at_level("WARNING", logger="attnopt"):
        torch.testing.assert_close(optimized(x), model(x))
    assert "no device memory left" in caplog.text
    assert optimized.attnopt_report.sites[0].kernel == kernel != NAME


def test_a_script_that_returns_during_the_warm_up_waits_for_it(tmp_path):
    """A user's script may end right after its first call, while ``triton_flash`` still compiles in the background:
    the interpreter then waits for the warm-up to end rather than tear CUDA down under it (the thread is not a
    daemon). Here the warm-up's kernel takes half a second and then writes a file; the script returns at once."""
    import subprocess
    import sys
    import textwrap

    done = tmp_path / "done"
    script = textwrap.dedent(f"""
        import time, torch
        from attnopt.kernels.spec import AttentionSpec
        from attnopt.passes import tuning

        def runner(name, spec, original, padding=None, sharing=1):
            def run():
                time.sleep(0.5)
                open({str(done)!r}, "w").close()
            return run

        tuning._runner = runner
        q = torch.randn(1, 1, 4, 8)
        tuning.warm_up([("reference", AttentionSpec.from_tensors(q, q, q))])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert done.exists(), "the script's exit did not wait for the warm-up"
