"""The optimized graph's estimated peak counts what the rewrite leaves: not the masks, scores and copies it erases.

At N = 8192 a ``[1, 1, N, N]`` float mask is 256 MiB and ``~tril`` 64 MiB, while
what the optimized models below really hold at their peak is about 14 MiB.
"""

import copy
import re

import pytest
import torch

import attnopt
from attnopt.kernels.sdpa import SDPAKernel
from attnopt.measure import cpu_peak_bytes
from attnopt.passes.plan import MemoryBudgetError

from .budget_models import PaddedEncoder, TrilCausal

N = 8192
MiB = 1 << 20


def _resident(model, args) -> int:
    return sum(t.numel() * t.element_size() for t in [*args, *model.parameters(), *model.buffers()])


def _optimized(model, args, **options):
    """The optimized copy after its first call, and its measured steady peak (with what is resident)."""
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False, **options)
    with torch.no_grad():
        optimized(*args)
        peak = cpu_peak_bytes(lambda: optimized(*args)) + _resident(model, args)
    return optimized, peak


def _budget_error(model, args, **options) -> MemoryBudgetError:
    with pytest.raises(Exception) as info, torch.no_grad():
        attnopt.optimize(copy.deepcopy(model), tune=False, **options)(*args)
    err = info.value
    while not isinstance(err, MemoryBudgetError) and err is not None:  # dynamo wraps backend errors
        err = getattr(err, "inner_exception", None) or err.__cause__
    assert isinstance(err, MemoryBudgetError), info.value
    return err


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, N, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def causal(x):
    model = TrilCausal().eval()
    optimized, measured = _optimized(model, (x,))
    return model, optimized, measured


def test_erased_tril_is_not_counted(causal):
    """Each layer's ``~ones(n, n).tril()`` is erased with its site: the estimate is near the measured peak,
    far below one [N, N] mask (counting the mask's construction gave 138 MiB here)."""
    _, optimized, measured = causal
    (site, _), (mem,) = optimized.attnopt_report.sites, optimized.attnopt_report.memory
    assert site.replaced and site.kernel == "sdpa_cpu"
    assert mem.after < N * N / 2 < mem.before
    assert abs(mem.after - measured) / measured < 0.2, (mem.after / MiB, measured / MiB)


def test_erased_dense_mask_is_not_counted(x, monkeypatch):
    """The ``[1, 1, N, N]`` additive mask every layer reads is erased once the rewrite reads the padding rows
    instead: with the kernel's own workspace left out, what the graph holds is a small part of that mask."""
    monkeypatch.setattr(SDPAKernel, "memory_bytes", lambda self, spec: 0)
    padding = torch.ones(1, N, dtype=torch.long)
    padding[:, N * 3 // 4:] = 0
    model = PaddedEncoder().eval()
    optimized, measured = _optimized(model, (x, padding))
    assert all(s.replaced and s.mask_terms == ("key_padding",) for s in optimized.attnopt_report.sites), str(
        optimized.attnopt_report)
    (mem,) = optimized.attnopt_report.memory
    dense_mask = 4 * N * N
    assert mem.after < dense_mask / 8 < mem.before, mem.after / MiB  # counting its construction gave 255 MiB
    assert mem.after < measured


def test_a_budget_just_above_the_real_need_is_accepted(x, causal):
    model, _, measured = causal
    budget = int(measured * 1.25)
    optimized, used = _optimized(model, (x,), max_mem=budget)
    (mem,) = optimized.attnopt_report.memory
    assert mem.budget == budget and mem.after <= budget and used <= budget
    assert all(s.replaced and s.kernel == "sdpa_cpu" for s in optimized.attnopt_report.sites)


def test_a_budget_below_every_exact_plan_is_refused_and_sized_right(x, causal):
    model, _, measured = causal
    err = str(_budget_error(model, (x,), max_mem=int(measured * 0.5)))
    assert "cannot be met" in err and "a budget of at least" in err, err
    needed = float(re.search(r"a budget of at least ([\d.]+) MiB", err).group(1)) * MiB
    # sized to what the optimized model holds, not to the [N, N] mask the rewrite erases
    assert measured * 0.85 < needed < measured * 1.2, (needed / MiB, measured / MiB)


def test_first_call_does_not_keep_each_layers_mask(x):
    """The capture's proofs read each layer's ``~ones(n, n).tril()`` (a 64 MiB boolean mask at N = 8192); a
    computed constant that large is not kept once read, so the first call (capture, proofs, rewrite, then the
    call itself) does not hold one mask per layer: below three masks with four layers (it held nine before)."""
    model = TrilCausal(layers=4).eval()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    with torch.no_grad():
        first = cpu_peak_bytes(lambda: optimized(x))
    assert all(s.replaced for s in optimized.attnopt_report.sites) and len(optimized.attnopt_report.sites) == 4
    assert first < 3 * N * N, f"first call {first / MiB:.0f} MiB"
