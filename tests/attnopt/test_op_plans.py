"""The op's call plans: a compiled graph's calls of ``attnopt::attention`` build and check their spec once per call
signature, and each call still computes its own terms' function."""

from __future__ import annotations

import pytest
import torch

from attnopt import ops
from attnopt.kernels import AttentionSpec
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Fill


def _call(q, k, v, key_padding=None, mask=None, kernel="sdpa_cpu", fill="-inf"):
    return torch.ops.attnopt.attention.default(q, k, v, key_padding, None, None, None, mask, 0.25, True,
                                               "top_left", None, None, None, 0.0, fill, kernel)[0]


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 16, 16, generator=g) for _ in range(3)]


@pytest.fixture
def specs_built(monkeypatch):
    built = []
    original = ops.spec_from_args
    monkeypatch.setattr(ops, "spec_from_args", lambda *args: built.append(1) or original(*args))
    ops._OP_PLANS.clear()
    yield built
    ops._OP_PLANS.clear()


def test_calls_of_one_signature_build_one_spec_and_each_computes_its_own_terms(specs_built):
    for step in range(4):  # new values every call, same shapes: one plan
        q, k, v = _qkv(step)
        keep = torch.rand(2, 16, generator=torch.Generator().manual_seed(step)) > 0.3
        keep[:, 0] = True  # every causal row sees a key
        got = _call(q, k, v, key_padding=keep, fill="finite_added")
        spec = AttentionSpec.from_tensors(q, k, v, scale=0.25, causal=True, key_padding=keep, fill=Fill.FINITE_ADDED)
        torch.testing.assert_close(got.double(), naive_attention(q, k, v, spec), atol=1e-5, rtol=1e-5)
    assert len(specs_built) == 1


def test_another_term_dtype_or_kernel_is_another_plan_and_is_checked_again(specs_built):
    q, k, v = _qkv()
    _call(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool))
    _call(q, k, v, mask=torch.zeros(16, 16))  # an additive mask: another signature
    _call(q, k, v, mask=torch.zeros(16, 16), kernel="reference")
    assert len(specs_built) == 3
    with pytest.raises(ValueError, match="cannot compute this attention call"):
        # a named kernel that cannot take the call is refused whatever was planned before
        torch.ops.attnopt.attention.default(q, k, v, None, None, None, None, torch.zeros(16, 16), 0.25, True,
                                            "top_left", None, None, None, 0.0, "-inf", "sdpa_flash")
