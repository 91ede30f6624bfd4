"""A dead copy of the scores (x-transformers keeps ``sim.clone()`` in its graph) is not a use of them."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import attnopt
from attnopt.passes import plan


class DeadClone(nn.Module):
    def forward(self, q, k, v):
        sim = q @ k.transpose(-1, -2) * 0.25
        sim.clone()  # nothing reads it
        sim = sim.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        return sim.softmax(dim=-1) @ v


class LiveClone(nn.Module):
    """The copy is returned: the scores are used outside the attention, the site stays."""

    def forward(self, q, k, v):
        sim = q @ k.transpose(-1, -2) * 0.25
        return sim.softmax(dim=-1) @ v, sim.clone()


def test_dead_copy_of_the_scores_is_ignored(monkeypatch):
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    expected = DeadClone()(q, k, v)
    optimized = attnopt.optimize(DeadClone(), tune=False)
    torch.testing.assert_close(optimized(q, k, v), expected, atol=1e-5, rtol=1e-5)
    (site,) = optimized.attnopt_report.sites
    assert site.replaced and site.causal, str(optimized.attnopt_report)


def test_live_copy_of_the_scores_keeps_the_site():
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    expected = LiveClone()(q, k, v)
    optimized = attnopt.optimize(copy.deepcopy(LiveClone()), tune=False)
    for got, want in zip(optimized(q, k, v), expected):
        torch.testing.assert_close(got, want)
    (site,) = optimized.attnopt_report.sites
    assert not site.replaced and "outside the attention" in site.reason, site.reason
