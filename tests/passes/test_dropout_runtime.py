"""A dropout probability changed after the first call: the site is still replaced, and the op runs with the new
p on every call (not left alone, not baked in). Depending on the torch version, dynamo either reads
``Dropout.p`` as a graph input once it changes, or guards on its value and captures the graph again, which is
then planned with the new p (torch 2.13: one graph per value, up to dynamo's recompile limit)."""

import torch
import torch.nn as nn

import attnopt
import attnopt.ops

from .models import assert_same_function


class DropoutAttention(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        probs = self.drop(torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1))
        return (probs @ v).transpose(1, 2).reshape(b, n, 16)


def test_a_changed_dropout_probability_reaches_the_op(monkeypatch):
    seen = []
    run_forward = attnopt.ops._train_forward

    def recording(q, k, v, spec, kernel, *args, **options):  # the kernel's spec, through the op or a training call
        seen.append(spec.dropout_p)
        return run_forward(q, k, v, spec, kernel, *args, **options)

    monkeypatch.setattr(attnopt.ops, "_train_forward", recording)
    torch.manual_seed(0)
    model = DropoutAttention().train()
    reference = DropoutAttention().train()
    reference.load_state_dict(model.state_dict())
    optimized = attnopt.optimize(model, tune=False)
    x = torch.randn(2, 6, 16)
    optimized(x)
    assert [s.replaced for s in optimized.attnopt_report.sites] == [True]
    assert seen[-1] == 0.1
    for p in (0.2, 0.35, 0.05):  # a graph input, or a new graph planned with it
        model.drop.p = p
        optimized(x)
        assert seen[-1] == p
    sites = optimized.attnopt_report.sites
    assert len(sites) >= 2 and all(s.replaced for s in sites), str(optimized.attnopt_report)
    # a graph that reads p at run time is planned with a stand-in p, which the report does not quote as the model's
    reasons = " ".join(r for s in sites for _, rs in s.rejected_kernels for r in rs)
    assert "p=0.5" not in reasons and ("read at run time" in reasons or "p=0.35" in reasons), reasons
    # p = 0 in training drops nothing: the output (and gradient) is the original's exactly
    model.drop.p = reference.drop.p = 0.0
    assert_same_function(optimized, reference, x)
    assert seen[-1] == 0.0


def test_dropout_statistics_follow_the_run_time_probability():
    """With p read at run time the kernel drops about a fraction p (scaled by 1/(1-p)) of each row's weight."""
    torch.manual_seed(0)
    model = DropoutAttention(p=0.1).train()
    optimized = attnopt.optimize(model, tune=False)
    x = torch.randn(4, 64, 16)
    optimized(x)
    model.drop.p = 0.5
    outs = torch.stack([optimized(x) for _ in range(40)])
    with torch.no_grad():
        model.eval()
        mean_expected = DropoutAttention.forward(model, x)  # dropout off: the expectation of the dropped output
    # the mean over draws approaches the no-dropout output; with p = 0.5 single draws differ from it
    assert (outs.mean(0) - mean_expected).abs().mean() < 0.25 * (outs[0] - mean_expected).abs().mean()
    assert (outs[0] - mean_expected).abs().max() > 1e-3
