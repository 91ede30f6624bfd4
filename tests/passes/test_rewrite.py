"""The first pattern family end to end: sites found, replaced, outputs and gradients unchanged."""

import pytest
import torch

import attnopt

from . import models

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def inputs(dtype=torch.float32, batch=3, n=12):
    x = torch.randn(batch, n, 32, dtype=dtype)
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[1, 7:] = False  # padded
    keep[2, :] = False  # fully padded: every row of this batch is fully masked
    return x, keep


def positive_cases():
    x, keep = inputs()
    bool_mask = torch.rand(12, 12) > 0.3
    return {
        "nanogpt": (models.NanoGPTBlock(), (x,)),
        "padded_encoder": (models.PaddedEncoder(), (x, keep.float())),
        "finfo_masked_fill": (models.FinfoMaskedFill(), (x, keep)),
        "where_causal": (models.WhereCausal(), (x,)),
        "sdpa_causal": (models.SDPAModel(mode="causal"), (x,)),
        "sdpa_bool_mask": (models.SDPAModel(mode="mask"), (x, bool_mask)),
        "sdpa_gqa": (models.SDPAModel(mode="gqa"), (x,)),
    }


def run(model, args):
    optimized = attnopt.optimize(model)
    return optimized(*args), optimized.attnopt_report


@pytest.mark.parametrize("name", list(positive_cases()))
def test_site_is_replaced_and_output_unchanged(name):
    model, args = positive_cases()[name]
    model.eval()
    expected = model(*args)
    got, report = run(model, args)
    assert len(report.sites) == 1 and report.sites[0].replaced, str(report)
    assert report.sites[0].exact and report.sites[0].kernel in ("reference", "sdpa_cpu")
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, atol=TOL[torch.float32], rtol=TOL[torch.float32], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["nanogpt", "padded_encoder", "finfo_masked_fill", "sdpa_bool_mask"])
def test_half_precision_models(name, dtype):
    model, args = positive_cases()[name]
    model = model.to(dtype).eval()
    args = tuple(a.to(dtype) if a.is_floating_point() and a.dtype == torch.float32 and a.dim() == 3 else a for a in args)
    if name == "padded_encoder":
        args = (args[0], args[1].to(dtype))
    expected = model(*args)
    got, report = run(model, args)
    assert report.sites[0].replaced, str(report)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=TOL[dtype] * 4, rtol=TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("name", ["nanogpt", "padded_encoder", "finfo_masked_fill", "sdpa_causal"])
def test_training_gradients_unchanged(name):
    model, args = positive_cases()[name]
    model.train()
    x = args[0].clone().requires_grad_()
    loss = model(x, *args[1:]).square().sum()
    expected = torch.autograd.grad(loss, [x, *model.parameters()])
    optimized = attnopt.optimize(model)
    x2 = args[0].clone().requires_grad_()
    got = torch.autograd.grad(optimized(x2, *args[1:]).square().sum(), [x2, *model.parameters()])
    assert optimized.attnopt_report.sites[0].replaced
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_training_dropout_is_replaced_with_dropout():
    model = models.NanoGPTBlock(dropout=0.5).train()
    optimized = attnopt.optimize(model)
    x = torch.randn(2, 12, 32)
    out = optimized(x)
    site = optimized.attnopt_report.sites[0]
    assert site.replaced
    assert not torch.allclose(out, model.eval()(x))  # dropout was applied in training


def test_graph_breaks_give_one_graph_each():
    model = models.TwoLayers().eval()
    x = torch.randn(2, 10, 32)
    expected = model(x)
    got, report = run(model, (x,))
    assert report.graphs == 2
    assert [s.replaced for s in report.sites] == [True, True]
    assert [s.where for s in report.sites] == ["a", "b"]
    torch.testing.assert_close(got, expected)


NEGATIVES = {
    "classifier": (models.Classifier, "not attention"),
    "router": (models.Router, "not attention"),
    "returns_weights": (models.ReturnsWeights, "used outside"),
    "softmax_over_queries": (models.SoftmaxOverQueries, "dim"),
    "changed_probabilities": (models.ChangedProbabilities, "used outside|not to a product"),
}


@pytest.mark.parametrize("name", list(NEGATIVES))
def test_softmax_that_is_not_attention_is_left_alone(name):
    cls, reason = NEGATIVES[name]
    model = cls().eval()
    x = torch.randn(2, 12, 32)
    expected = model(x)
    optimized = attnopt.optimize(model)
    got = optimized(x)
    report = optimized.attnopt_report
    assert len(report.sites) == 1 and not report.sites[0].replaced
    assert report.sites[0].reason
    import re

    assert re.search(reason, report.sites[0].reason), report.sites[0].reason
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(g, e)


def test_explain_changes_nothing_and_reports_a_dry_run():
    model = models.NanoGPTBlock().eval()
    x = torch.randn(2, 12, 32)
    report = attnopt.explain(model, (x,))
    assert report.dry_run and len(report.replaced) == 1
    assert "would be replaced" in str(report)
    site = report.sites[0].__dict__
    for key in ("where", "replaced", "reason", "kernel", "exact", "causal", "mask_terms", "cross", "q_heads",
                "kv_heads", "q_len", "kv_len", "head_dim", "dtype", "bytes_before", "bytes_after"):
        assert key in site
    assert report.to_dict()["sites"][0]["q_len"] == 12
    assert type(model).forward is models.NanoGPTBlock.forward and "forward" not in model.__dict__


def test_optimized_model_shares_parameters_and_state_dict():
    model = models.NanoGPTBlock()
    optimized = attnopt.optimize(model)
    assert isinstance(optimized, models.NanoGPTBlock)
    assert optimized.qkv.weight is model.qkv.weight
    assert list(optimized.state_dict()) == list(model.state_dict())


def test_compile_backend_by_name_with_inductor():
    model = models.NanoGPTBlock().eval()
    x = torch.randn(2, 12, 32)
    report = attnopt.Report()
    compiled = torch.compile(model, backend="attnopt", options={"report": report})
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(report.replaced) == 1


def test_forced_kernel_is_used():
    model = models.NanoGPTBlock().eval()
    optimized = attnopt.optimize(model, kernel="reference")
    optimized(torch.randn(1, 8, 32))
    assert "forced" in optimized.attnopt_report.sites[0].reason


class UpcastThenMask(torch.nn.Module):
    """Scores upcast to float32 before a float16 mask is added: eager adds in float32 (no saturation)."""

    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-1, -2)).float() * 0.125
        return torch.softmax(s + mask, -1).to(q.dtype) @ v


def test_mask_is_added_at_the_precision_eager_added_it():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float16) * 4 for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float16)
    mask[..., 2, :] = torch.finfo(torch.float16).min  # row 2 fully masked: in float32, softmax(s) survives
    model = UpcastThenMask()
    expected = model(q, k, v, mask)
    optimized = attnopt.optimize(model)
    got = optimized(q, k, v, mask)
    assert optimized.attnopt_report.sites[0].replaced
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)
    uniform = v.float().mean(2)[:, :, None]
    assert not torch.allclose(got[:, :, 2:3].float(), uniform, atol=1e-2)  # not the saturated (uniform) row
