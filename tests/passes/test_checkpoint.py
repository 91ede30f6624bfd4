"""Activation checkpointing: attention inside ``torch.utils.checkpoint`` regions is found and replaced.

Dynamo captures a non-reentrant checkpoint as a higher-order op whose body is a subgraph; the pass
rewrites the body, so the recomputation in the backward runs the kernel too. Reentrant checkpoints
run their function eagerly inside dynamo's graph and are rewritten as ordinary code.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnopt
from attnopt.passes import plan

from .test_zoo import CASES

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_llama_trains_as_the_original(reentrant, monkeypatch):
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: rows that see no key
    for _ in range(2):
        expected = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        got = optimized(input_ids=ids, attention_mask=mask, labels=ids).loss
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for a, b in zip(model.parameters(), optimized.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)
    sites = optimized.attnopt_report.sites
    assert len(sites) == 2 and all(s.replaced for s in sites), str(optimized.attnopt_report)
