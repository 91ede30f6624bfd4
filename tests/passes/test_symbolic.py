"""Index masks read as bands without evaluating them (dynamic shapes)."""

import pytest
import torch
from torch.fx import symbolic_trace

from attnopt.passes.symbolic import band_of_comparison


def comparison_node(fn):
    graph = symbolic_trace(fn).graph
    return [n for n in graph.nodes if n.op == "call_function"][-1]


@pytest.mark.parametrize(
    "fn, negated, band",
    [
        (lambda n: torch.arange(n)[None, :] <= torch.arange(n)[:, None], False, (None, 0)),  # causal
        (lambda n: torch.arange(n)[None, :] > torch.arange(n)[:, None], True, (None, 0)),  # masked_fill(j > i)
        (lambda n: torch.arange(n)[:, None] - 3 < torch.arange(n)[None, :], False, (-2, None)),  # window of 3
        (lambda n: torch.arange(n)[None, :] < torch.arange(n)[:, None] + 2, False, (None, 1)),
        (lambda n: torch.arange(n)[:, None] >= torch.arange(n)[None, :], False, (None, 0)),
    ],
)
def test_bands(fn, negated, band):
    assert band_of_comparison(comparison_node(fn), negated, 2) == band


def test_batch_dependence_is_not_a_band():
    node = comparison_node(lambda n: torch.arange(n)[:, None, None] <= torch.arange(n)[None, None, :])
    assert band_of_comparison(node, False, 3) is None


def test_same_axis_is_not_a_band():
    node = comparison_node(lambda n: torch.arange(n)[None, :] <= torch.arange(n)[None, :] + 1)
    assert band_of_comparison(node, False, 2) is None
