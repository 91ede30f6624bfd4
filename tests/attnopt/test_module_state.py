"""The optimized model is a model of its own: mode switches, copies and saving (issue 10, item 17)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import attnopt

DIM, HEADS, N = 16, 2, 6
#: a kernel other than the planner's CPU default, so a report shows that the options survived a copy
OPTIONS = {"kernel": "sdpa_cpu"}


class CausalBlock(nn.Module):
    """Causal attention with a mask buffer, and dropout that only ``train()`` turns on."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("tril", torch.ones(N, N, dtype=torch.bool).tril())

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        s = (q @ k.transpose(-1, -2) * (c // HEADS) ** -0.5).masked_fill(~self.tril[:n, :n], float("-inf"))
        return self.drop(torch.softmax(s, dim=-1) @ v)  # [B, H, N, D]


def _model():
    torch.manual_seed(0)
    return CausalBlock().eval()


def _x(dtype=torch.float32):
    return torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _assert_optimized_with_options(model):
    report = model.attnopt_report
    assert [(s.replaced, s.kernel) for s in report.sites] == [(True, OPTIONS["kernel"])], str(report)


def _assert_same_state(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_optimize_returns_the_model_and_mode_switches_act_on_it():
    model = _model()
    reference = copy.deepcopy(model)
    optimized = attnopt.optimize(model, **OPTIONS)
    assert optimized is model and type(optimized) is CausalBlock
    torch.testing.assert_close(optimized(_x()), reference(_x()))
    _assert_optimized_with_options(optimized)

    optimized.train()
    assert all(m.training for m in model.modules())
    assert not torch.equal(optimized(_x()), optimized(_x()))  # dropout is on
    optimized.eval()
    assert not any(m.training for m in model.modules())

    optimized.to(torch.float64)
    reference.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in model.parameters())
    torch.testing.assert_close(optimized(_x(torch.float64)), reference(_x(torch.float64)))
    assert model.tril.dtype == torch.bool  # .to(dtype) leaves integer and bool buffers alone, as for any module
    _assert_same_state(optimized, reference)

    graphs = optimized.attnopt_report.graphs
    attnopt.explain(optimized, (_x(torch.float64),))
    assert optimized.attnopt_report.graphs == graphs  # explain changes nothing


def test_deepcopy_is_an_independent_optimized_model():
    optimized = attnopt.optimize(_model(), **OPTIONS)
    expected = optimized(_x())
    twin = copy.deepcopy(optimized)
    assert twin.attnopt_report is not optimized.attnopt_report and not twin.attnopt_report.sites
    _assert_same_state(twin, optimized)

    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    reference = copy.deepcopy(_model())
    with torch.no_grad():
        for p in reference.parameters():
            p.zero_()
    torch.testing.assert_close(twin(_x()), reference(_x()))  # its own weights
    _assert_optimized_with_options(twin)  # optimized afresh, with the same options
    twin.train()
    assert optimized.training is False
    torch.testing.assert_close(optimized(_x()), expected)  # the original is untouched
    assert len(optimized.attnopt_report.sites) == 1


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("round_trip", [_pickle, _torch_save], ids=["pickle", "torch.save"])
def test_saved_and_loaded_model_is_optimized_afresh(round_trip):
    optimized = attnopt.optimize(_model(), **OPTIONS)
    expected = optimized(_x())
    loaded = round_trip(optimized)
    assert type(loaded) is CausalBlock and not loaded.attnopt_report.sites
    _assert_same_state(loaded, optimized)
    torch.testing.assert_close(loaded(_x()), expected)
    _assert_optimized_with_options(loaded)
    _assert_optimized_with_options(optimized)


def test_every_optimized_instance_compiles_its_own_forward():
    """Dynamo caches per code object, and stops compiling a code object after 8 entries (recompile_limit).

    Instances of one class share ``forward``: were they compiled through it, the 9th optimized model
    would silently run the original code with an empty report.
    """
    x = _x()
    for i in range(torch._dynamo.config.recompile_limit + 1):
        model = attnopt.optimize(_model(), **OPTIONS)
        model(x)
        assert [s.replaced for s in model.attnopt_report.sites] == [True], f"instance {i}: {model.attnopt_report}"
