"""``torch.compile(..., backend="attnopt")`` in depth (issue 15): options typed and checked, the report without
passing one in, fullgraph / dynamic / inductor modes, and no recompiles for new lengths and batch sizes."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import attnopt

DIM, HEADS = 16, 2


class Causal(nn.Module):
    """Causal self-attention masked by a ``tril`` buffer sliced to the length (nanoGPT's spelling).

    The scale is a number fixed at construction, as HF models keep it: with ``dynamic=True`` every size is
    a symbol, and a scale computed from the input's width would be one too.
    """

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.register_buffer("tril", torch.ones(64, 64, dtype=torch.bool).tril())
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        s = (q @ k.transpose(-1, -2) * self.scale).masked_fill(~self.tril[:n, :n], float("-inf"))
        return torch.softmax(s, dim=-1) @ v  # [B, H, N, D]


def _model():
    torch.manual_seed(0)
    return Causal()


def _x(b=2, n=8):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(b * 100 + n))


@pytest.fixture
def fresh_inductor():
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("options, error, needle", [
    ({"max_mem": "24 parsecs"}, ValueError, "max_mem"),
    ({"mode": "turbo"}, ValueError, "reduce-overhead"),
    ({"compiler": "eager", "mode": "max-autotune"}, ValueError, "compiler='inductor'"),
    ({"verify": "yes"}, TypeError, "verify"),
    ({"dynamic": "auto"}, TypeError, "dynamic"),
    ({"kernel": 3}, TypeError, "kernel"),
    ({"fast_mode": True}, TypeError, "fast_mode"),
])
def test_options_are_checked_when_the_backend_is_made(options, error, needle):
    with pytest.raises(error, match=needle):
        attnopt.Backend(**options)


def test_a_backend_takes_keyword_options_and_a_report():
    with pytest.raises(TypeError):
        attnopt.Backend({"max_mem": "1GB"})
    with pytest.raises(TypeError, match="attnopt.Report"):
        attnopt.Backend(report={"sites": []})


def test_unknown_options_by_name_are_named_at_the_first_call():
    compiled = torch.compile(_model(), backend="attnopt", options={"fast_mode": True})
    with pytest.raises(Exception, match="fast_mode"):
        compiled(_x())


def test_defaults():
    backend = attnopt.Backend()
    assert backend.options.compiler == "inductor" and backend.options.verify is False
    assert backend.options.mode is None and attnopt.Options().verify is False


# ------------------------------------------------------------------ the report


def test_report_without_passing_one_in():
    model = _model()
    first, second = torch.compile(model, backend="attnopt", options={"compiler": "eager"}), \
        torch.compile(_model(), backend="attnopt", options={"compiler": "eager"})
    early = attnopt.report_of(first)  # before the first call: empty, then filled
    assert not early.sites and early.graphs == 0
    torch.testing.assert_close(first(_x()), model(_x()))
    assert attnopt.report_of(first) is early
    assert [s.replaced for s in early.sites] == [True] and early.sites[0].causal
    assert attnopt.report_of(second).graphs == 0  # each torch.compile call has its own report


def test_report_of_a_compiled_function_and_of_the_string_backend_without_options():
    model = _model()

    def attend(x):
        return model(x) * 2

    compiled = torch.compile(attend, backend="attnopt")
    torch.testing.assert_close(compiled(_x()), attend(_x()))
    assert [s.replaced for s in attnopt.report_of(compiled).sites] == [True]


def test_report_of_a_backend_object_and_of_a_given_report():
    backend = attnopt.Backend(compiler="eager", kernel="reference")
    compiled = torch.compile(_model(), backend=backend)
    compiled(_x())
    assert attnopt.report_of(compiled) is backend.report and backend.report.sites[0].kernel == "reference"
    given = attnopt.Report()
    compiled = torch.compile(_model(), backend="attnopt", options={"report": given, "compiler": "eager"})
    compiled(_x())
    assert attnopt.report_of(compiled) is given and given.sites


def test_report_of_an_optimized_model_and_of_anything_else():
    optimized = attnopt.optimize(_model())
    assert attnopt.report_of(optimized) is optimized.attnopt_report
    with pytest.raises(ValueError, match="no attnopt report"):
        attnopt.report_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no attnopt report"):
        attnopt.report_of(torch.compile(nn.Linear(2, 2), backend="eager"))


# ------------------------------------------------------------------ compile options


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_inductor_modes_keep_one_attnopt_call_per_site(mode, fresh_inductor):
    """Inductor compiles the rest of the graph in its mode; its own attention fusion finds nothing left to
    fuse (no softmax, no SDPA) and the rewritten op runs once per site."""
    from torch._inductor.utils import run_and_get_code

    model = _model()
    compiled = torch.compile(model, backend="attnopt", mode=mode)
    got, code = run_and_get_code(compiled, _x())
    torch.testing.assert_close(got, model(_x()))
    assert [s.replaced for s in attnopt.report_of(compiled).sites] == [True]
    source = "\n".join(code)
    assert source.count("= torch.ops.attnopt.attention.default(") == 1, source
    assert "scaled_dot_product" not in source and "softmax" not in source.lower().replace("softmax,", "")


def test_a_mode_with_a_backend_object(fresh_inductor):
    backend = attnopt.Backend(kernel="reference")
    model = _model()
    compiled = torch.compile(model, backend=backend, mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(compiled(_x()), model(_x()))
    assert backend.report.sites[0].kernel == "reference"


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_fullgraph(compiler):
    model = _model()
    compiled = torch.compile(model, backend="attnopt", fullgraph=True, options={"compiler": compiler})
    torch.testing.assert_close(compiled(_x()), model(_x()))
    assert [s.replaced for s in attnopt.report_of(compiled).sites] == [True]


# ------------------------------------------------------------------ dynamic shapes

SHAPES = [(2, 8), (3, 12), (4, 17), (2, 23), (5, 9), (3, 31)]


def _count_graphs(compiled, model, shapes) -> int:
    counters.clear()
    for b, n in shapes:
        torch.testing.assert_close(compiled(_x(b, n)), model(_x(b, n)), atol=1e-5, rtol=1e-5)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("route", ["optimize", "backend"])
def test_new_lengths_and_batch_sizes_do_not_recompile_after_the_first_recompile(route):
    """The first call specializes; the second, with a new length and batch size, compiles them as symbols
    (dynamo's automatic dynamic shapes); no later length or batch size recompiles. Sizes 0 and 1 are
    specialized by dynamo itself and left out."""
    model = _model()
    if route == "optimize":
        compiled = attnopt.optimize(_model())
        report = compiled.attnopt_report
    else:
        compiled = torch.compile(_model(), backend="attnopt")
        report = attnopt.report_of(compiled)
    assert _count_graphs(compiled, model, SHAPES) == 2
    assert report.graphs == 2 and all(s.replaced and s.causal for s in report.sites), str(report)
    assert len(report.rows()) == 1


class SdpaCausal(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("route", ["optimize", "backend"])
def test_dynamic_true_compiles_once(route):
    torch.manual_seed(0)
    model = SdpaCausal()
    if route == "optimize":
        compiled = attnopt.optimize(SdpaCausal(), dynamic=True)
        compiled.load_state_dict(model.state_dict())
    else:
        compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"compiler": "eager"})
    assert _count_graphs(compiled, model, SHAPES) == 1
    report = attnopt.report_of(compiled)
    assert report.graphs == 1 and report.sites[0].replaced and report.sites[0].causal, str(report)


def test_dynamic_true_with_a_scale_attribute():
    model = _model()
    compiled = torch.compile(_model(), backend="attnopt", dynamic=True, options={"compiler": "eager"})
    assert _count_graphs(compiled, model, SHAPES[:2]) == 1
    assert attnopt.report_of(compiled).sites[0].replaced, str(attnopt.report_of(compiled))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_inductor_modes_on_cuda(mode):
    """CUDA graphs (reduce-overhead) replay the rewritten op; outputs stay those of the original model."""
    model = _model().cuda().half()
    compiled = torch.compile(model, backend="attnopt", mode=mode)
    for n in (32, 32, 32, 48, 48):  # replays, then a new length (the tril buffer holds 64)
        x = _x(2, n).cuda().half()
        torch.testing.assert_close(compiled(x).clone(), model(x), atol=2e-3, rtol=2e-3)
    report = attnopt.report_of(compiled)
    # the suite replaces every supported site (conftest): a site left as written here is a failure of the rewrite
    assert report.sites and all(s.replaced for s in report.sites), str(report)
