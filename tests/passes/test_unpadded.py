"""Key padding that keeps every key: the site runs its unpadded kernel, decided once per forward.

HF models pass ``attention_mask`` on every call, padded or not; with the mask all ones the call is
plain causal attention, which the fastest backends take. The rewrite checks the padding once per
forward (one host sync shared by every layer) and picks the planned kernel or the unpadded one.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import attnopt
from attnopt.kernels import registry
from attnopt.passes import plan

from .test_zoo import CASES

transformers = pytest.importorskip("transformers")


@pytest.fixture
def ran(monkeypatch):
    """(kernel name, with key padding) -> number of calls, through ``forward`` or a prepared inference call
    (``Kernel.prepare``, which may call ``forward`` itself: counted once); every site the analysis accepts is
    replaced."""
    counts = collections.Counter()
    inside = []
    for kernel in registry.all_kernels():
        def forward(q, k, v, spec, seed, _kernel=kernel, _forward=kernel.forward):
            if not inside:
                counts[_kernel.name, spec.key_padding is not None] += 1
            return _forward(q, k, v, spec, seed)

        def prepare(spec, _kernel=kernel, _prepare=kernel.prepare):
            run = _prepare(spec)

            def counted(q, k, v, spec):
                counts[_kernel.name, spec.key_padding is not None] += 1
                inside.append(True)
                try:
                    return run(q, k, v, spec)
                finally:
                    inside.pop()
            return counted

        monkeypatch.setattr(kernel, "forward", forward)
        monkeypatch.setattr(kernel, "prepare", prepare)
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))
    return counts


def test_unpadded_batches_run_the_unpadded_kernel(ran):
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().eval()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    ids = torch.randint(0, 100, (2, 12))
    for padded in (False, True, False):
        mask = torch.ones(2, 12, dtype=torch.long)
        if padded:
            mask[1, :5] = 0  # rows 0-4 of batch 1 see no key
        ran.clear()
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            got = optimized(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        sites = optimized.attnopt_report.sites
        assert len(sites) == 2 and all(s.replaced for s in sites), str(optimized.attnopt_report)
        unpadded = sites[0].reason.rsplit("run ", 1)[-1]
        assert "padding keeps every key" in sites[0].reason, sites[0].reason
        if padded:
            assert ran == {(sites[0].kernel, True): 2}, ran
        else:
            assert ran == {(unpadded, False): 2}, ran


def test_unpadded_branch_is_not_taken_by_inductor(ran):
    """Graphs traced again (inductor, ONNX) keep one op call per site: no data-dependent branch."""
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().eval()
    report = attnopt.Report()
    compiled = torch.compile(copy.deepcopy(model), backend="attnopt", options={"report": report, "tune": False})
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=2e-5, rtol=2e-5)
    assert all(s.replaced and "padding keeps every key" not in s.reason for s in report.sites), str(report)


@pytest.mark.gpu
def test_unpadded_batches_on_cuda(ran):
    """HF Llama in bfloat16 with an all-ones attention_mask: the unpadded kernel, the same logits."""
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().to("cuda", torch.bfloat16).eval()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)  # no timing runs among the counted calls
    ids = torch.randint(0, 100, (2, 64), device="cuda")
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[1, :9] = 0
        ran.clear()
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits.float()
            got = optimized(input_ids=ids, attention_mask=mask).logits.float()
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
        assert all(with_padding == padded for _, with_padding in ran), ran


def test_layers_share_one_key_padding_tensor(monkeypatch):
    """Every layer's call gets the same key-padding tensor object in one forward, so per-mask work that
    kernels cache by tensor (the Triton kernels' tile lists) is done once per forward, not once per layer."""
    seen = []
    kernel = registry.get("reference")
    original_forward = kernel.forward

    def forward(q, k, v, spec, seed):
        seen.append(spec.key_padding)
        return original_forward(q, k, v, spec, seed)

    monkeypatch.setattr(kernel, "forward", forward)
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().eval()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False, kernel="reference")
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        seen.clear()
        got = optimized(input_ids=ids, attention_mask=mask).logits
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert len(seen) == 2 and seen[0] is not None and seen[1] is seen[0]
