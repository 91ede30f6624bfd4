"""A top-left slice of a constant band (nanoGPT's ``bias[:, :, :t, :t]``) stays causal under dynamic shapes.

At a second sequence length dynamo recompiles with a symbolic ``t``; the slice then has no concrete
value, but every top-left block of a matrix constant along its diagonals keeps its band, so the
proof reads the whole buffer (guarded) instead. A slice that does not start at 0 stays dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt


class SlicedTril(nn.Module):
    def __init__(self, start_at_zero: bool = True):
        super().__init__()
        self.start_at_zero = start_at_zero
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

    def forward(self, q, k, v):
        t = q.shape[2]
        if self.start_at_zero:
            keep = self.bias[:, :, :t, :t]
        else:  # rows 1 .. t of the buffer: a band shifted by one key
            keep = self.bias[:, :, 1:t + 1, :t]
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return F.softmax(s.masked_fill(keep == 0, float("-inf")), dim=-1) @ v


def _run(model, lengths):
    optimized = attnopt.optimize(SlicedTril(model.start_at_zero), tune=False)
    optimized.load_state_dict(model.state_dict())
    for n in lengths:
        q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
        torch.testing.assert_close(optimized(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5, equal_nan=True)
    return optimized.attnopt_report


def test_top_left_slice_of_a_tril_buffer_is_causal_at_every_length():
    report = _run(SlicedTril(), (8, 11, 13))
    assert report.graphs == 2, str(report)  # the second is captured with a symbolic length
    assert len(report.sites) == 2, str(report)
    assert all(s.causal and "dense" not in s.found for s in report.sites), str(report)


def test_shifted_slice_is_not_read_as_causal():
    report = _run(SlicedTril(start_at_zero=False), (8, 11, 13))
    # the static graph proves the shifted band (keys up to i + 1: a window); the dynamic one cannot
    assert not any(s.causal for s in report.sites), str(report)
    assert "dense" in report.sites[-1].found, str(report)


def test_buffer_changed_after_the_dynamic_capture_is_seen():
    model, optimized = SlicedTril(), attnopt.optimize(SlicedTril(), tune=False)
    for n in (8, 11):
        q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
        optimized(q, k, v)
    with torch.no_grad():
        for m in (model, optimized):
            m.bias.fill_(1.0)  # no mask at all from now on
    q, k, v = (torch.randn(2, 2, 13, 8) for _ in range(3))
    torch.testing.assert_close(optimized(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5)
