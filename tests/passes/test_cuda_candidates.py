"""The planner's whole candidate evaluation for CUDA calls, run on a machine without a GPU.

The Triton and CUDA SDPA kernels are only candidates when a call is on
``cuda``, so on a CPU machine their ``cost`` / ``memory_bytes`` code never ran
and a ``NameError`` there reached the H200 untested (issue 9). Here every
registered kernel's ``not_supported_reasons``, ``cost``, ``memory_bytes`` and
``saved_bytes``, and the planner's ``candidates`` / ``choose``, run on
``AttentionSpec``s whose device is ``cuda`` (meta tensors, as ``spec_of``
builds them), for every mask family x dtype x train/eval x fill, on two
hosts:

* ``h200``: ``torch.cuda`` answers as an H200 would (available, compute
  capability 9.0, 132 SMs), so the CUDA SDPA backends are candidates too;
* ``no_gpu``: the real answers of this machine (no CUDA).

``TRITON_INTERPRET`` (set for the CPU suite by ``conftest.py``) is removed for
these tests: it makes the Triton kernels take their interpreter branches.
Tuning is off, so nothing is launched. Any exception fails the test.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import attnopt
from attnopt.kernels import flex, registry
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from attnopt.passes import plan, tuning
from attnopt.passes.plan import NoKernelError

from . import models

CUDA = torch.device("cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
H200 = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=141 * 2**30)
#: kernels that never run a CUDA call: the rest must each be a supported candidate for some family below
CPU_ONLY = {"sdpa_cpu"}


def meta(*shape, dtype=torch.bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def spec_for(dtype: torch.dtype, train: bool, fill: Fill, *, b=2, hq=8, hkv=8, nq=256, nk=256, d=64, dv=None,
             **terms) -> AttentionSpec:
    """A CUDA spec built as ``passes/rewrite.py:spec_of`` builds one: meta tensors, then ``device=cuda``."""
    q, k, v = meta(b, hq, nq, d, dtype=dtype), meta(b, hkv, nk, d, dtype=dtype), meta(b, hkv, nk, dv or d, dtype=dtype)
    spec = AttentionSpec.from_tensors(q, k, v, fill=fill, requires_grad=train, **terms)
    spec = spec.with_(device=CUDA)
    spec.validate()
    return spec


B, H, N = 2, 8, 256
#: family -> (dtype -> keyword arguments of ``spec_for``)
FAMILIES = {
    "no_mask": lambda dt: {},
    "causal_top_left": lambda dt: dict(causal=True),
    "causal_bottom_right": lambda dt: dict(causal=True, align=Align.BOTTOM_RIGHT, nq=128, nk=384),
    "causal_bottom_right_nq_over_nk": lambda dt: dict(causal=True, align=Align.BOTTOM_RIGHT, nq=384, nk=128),
    "window_causal": lambda dt: dict(causal=True, window=Window(64, 0)),
    "window_two_sided": lambda dt: dict(window=Window(32, 32)),
    "window_left_unbounded": lambda dt: dict(window=Window(None, 16)),
    "window_bottom_right": lambda dt: dict(causal=True, align=Align.BOTTOM_RIGHT, window=Window(32, 0), nq=64, nk=512),
    "key_padding_bool": lambda dt: dict(key_padding=meta(B, N)),
    "key_padding_lengths": lambda dt: dict(key_padding=meta(B, dtype=torch.int64)),
    "documents": lambda dt: dict(q_doc=meta(1, N, dtype=torch.int64), kv_doc=meta(1, N, dtype=torch.int64)),
    "documents_per_batch": lambda dt: dict(causal=True, q_doc=meta(B, N, dtype=torch.int32),
                                           kv_doc=meta(B, N, dtype=torch.int32)),
    "bias_alibi_float32": lambda dt: dict(causal=True, bias=meta(1, H, N, N, dtype=torch.float32)),
    "bias_per_batch": lambda dt: dict(bias=meta(B, H, N, N, dtype=dt)),
    "bias_float64": lambda dt: dict(bias=meta(H, N, N, dtype=torch.float64)),
    "dense_bool": lambda dt: dict(mask=meta(B, 1, N, N)),
    "dense_bool_per_head": lambda dt: dict(mask=meta(B, H, N, N)),
    "dense_bool_2d": lambda dt: dict(mask=meta(N, N)),
    "dense_additive_padding": lambda dt: dict(mask=meta(B, 1, 1, N, dtype=dt)),
    "dense_additive": lambda dt: dict(mask=meta(B, 1, N, N, dtype=dt)),
    "dense_additive_float32": lambda dt: dict(causal=True, mask=meta(B, 1, N, N, dtype=torch.float32)),
    "gqa": lambda dt: dict(causal=True, hkv=2),
    "mqa": lambda dt: dict(hkv=1, key_padding=meta(B, N)),
    "cross": lambda dt: dict(nq=77, nk=300, key_padding=meta(B, 300)),
    "cross_short_keys": lambda dt: dict(nq=300, nk=7),
    "decode": lambda dt: dict(nq=1, nk=8192, hkv=2, causal=True, align=Align.BOTTOM_RIGHT,
                              key_padding=meta(B, dtype=torch.int64)),
    "decode_speculative": lambda dt: dict(nq=4, nk=4096, hkv=1, causal=True, align=Align.BOTTOM_RIGHT),
    "decode_window_bias": lambda dt: dict(nq=1, nk=8192, causal=True, align=Align.BOTTOM_RIGHT,
                                          window=Window(1024, 0), bias=meta(1, H, 1, 8192, dtype=torch.float32)),
    "decode_dense_mask": lambda dt: dict(nq=1, nk=2048, mask=meta(B, 1, 1, 2048)),
    "softcap": lambda dt: dict(causal=True, softcap=30.0),
    "dropout": lambda dt: dict(causal=True, dropout_p=0.1),
    "head_dim_128": lambda dt: dict(d=128, hkv=2, causal=True),
    "head_dim_256": lambda dt: dict(d=256, nq=128, nk=128),
    "head_dim_odd": lambda dt: dict(d=80),
    "head_dim_too_large": lambda dt: dict(d=512, nq=16, nk=16),
    "v_head_dim_differs": lambda dt: dict(d=192, dv=128, causal=True),
    "one_query_one_key": lambda dt: dict(nq=1, nk=1),
    "everything": lambda dt: dict(
        hkv=2, causal=True, window=Window(128, 0), key_padding=meta(B, N), q_doc=meta(1, N, dtype=torch.int64),
        kv_doc=meta(1, N, dtype=torch.int64), bias=meta(1, H, N, N, dtype=torch.float32), mask=meta(B, 1, N, N),
        softcap=50.0),
}


HOSTS = ("h200", "no_gpu")


def simulate(mp: pytest.MonkeyPatch, host: str) -> None:
    """Make ``torch.cuda`` answer as ``host`` does, and the Triton kernels leave their interpreter branches."""
    mp.delenv("TRITON_INTERPRET", raising=False)
    if host == "h200":
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (H200.major, H200.minor))
        mp.setattr(torch.cuda, "get_device_properties", lambda device=None: H200)
        mp.setattr(torch.cuda, "get_device_name", lambda device=None: H200.name)


@pytest.fixture(params=HOSTS)
def cuda_host(request, monkeypatch):
    simulate(monkeypatch, request.param)
    return request.param


def evaluate(spec: AttentionSpec) -> set[str]:
    """Everything the planner computes for ``spec`` without launching: returns the supported kernels."""
    kernels = registry.all_kernels()
    supported = set()
    for kernel in kernels:
        reasons = kernel.not_supported_reasons(spec)
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), (kernel.name, reasons)
        if reasons:
            continue
        supported.add(kernel.name)
        cost, mem, saved = kernel.cost(spec), kernel.memory_bytes(spec), kernel.saved_bytes(spec)
        assert isinstance(cost, float) and math.isfinite(cost) and cost >= 0, (kernel.name, cost)
        assert isinstance(mem, int) and mem >= 0, (kernel.name, mem)
        assert isinstance(saved, int) and saved >= 0, (kernel.name, saved)

    found = plan.candidates(spec, tune=False)
    assert [c.kernel for c in found if c.supported] == sorted(
        (c.kernel for c in found if c.supported), key=lambda name: next(c.cost for c in found if c.kernel == name))
    for c in found:
        assert c.supported == (c.cost is not None) == (c.memory_bytes is not None), c
    choice = plan.choose(spec, tune=False)
    assert choice.exact and choice.chosen.supported and choice.kernel not in CPU_ONLY, choice
    assert choice.reason and all(c.reasons for c in choice.rejected)

    # exact=False: per site the planner still chooses among the exact kernels (approximations are a whole-graph
    # decision), and each approximate kernel says so
    relaxed = plan.choose(spec, exact=False, tune=False)
    assert relaxed.chosen.supported and relaxed.exact
    assert all(c.reasons for c in relaxed.candidates if not c.exact), relaxed

    # never slower: the site's original code (eager ops, or one SDPA call) is a candidate too, on its estimate
    for kind in ("softmax", "sdpa"):
        decided = plan.choose(spec, tune=False, original=tuning.Original(kind, 1 << 20))
        assert decided.chosen.supported and decided.reason, decided

    # kernel="name": only that kernel, or NoKernelError listing its reasons
    for kernel in kernels:
        try:
            forced = plan.choose(spec, forced=kernel.name, tune=False)
        except NoKernelError as err:
            assert kernel.name in str(err)
        else:
            assert forced.kernel == kernel.name and forced.reason.startswith("forced")

    tuning.cache_key(spec)  # what tune=True would look the measurement up by
    return supported


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_kernel_plans_cuda_calls(cuda_host, family):
    """Every dtype, train and eval, every fill: no kernel's CUDA path raises, and the planner chooses."""
    for dtype, train, fill in itertools.product(DTYPES, (False, True), Fill):
        terms = FAMILIES[family](dtype)
        if fill == Fill.FINITE_REPLACED_ADDED and any(t in terms for t in ("q_doc", "bias", "mask")):
            # GPT-2's fill comes with a band and key padding alone: any other term is refused by name
            with pytest.raises(ValueError, match="band and key padding only"):
                spec_for(dtype, train, fill, **terms)
            continue
        spec = spec_for(dtype, train, fill, **terms)
        try:
            evaluate(spec)
        except Exception as err:
            raise AssertionError(
                f"{family} {dtype} {'train' if train else 'eval'} fill={fill.value} on {cuda_host}: "
                f"{type(err).__name__}: {err}"
            ) from err


def test_every_cuda_kernel_is_evaluated(monkeypatch):
    """The sweep reaches each kernel's cost path: a kernel no family supports would be tested by nothing."""
    simulate(monkeypatch, "h200")
    names = {k.name for k in registry.all_kernels()}
    if importlib.util.find_spec("triton") is not None:
        assert {"triton_flash", "triton_decode"} <= names
        if flex._torch_support() is None:
            assert "flex" in names
    assert {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "reference"} <= names
    reached = set()
    for family, dtype in itertools.product(FAMILIES, DTYPES):
        spec = spec_for(dtype, False, Fill.SAFE, **FAMILIES[family](dtype))
        for kernel in registry.all_kernels():
            if not kernel.not_supported_reasons(spec):
                reached.add(kernel.name)
    assert names - reached <= CPU_ONLY, f"never a candidate on CUDA: {sorted(names - reached - CPU_ONLY)}"


def test_cuda_ranking_prefers_gpu_kernels(monkeypatch):
    """On an H200 the cost models put a GPU kernel first, never the PyTorch-ops reference."""
    simulate(monkeypatch, "h200")
    for family in ("causal_top_left", "gqa", "key_padding_bool", "dense_bool", "decode"):
        for dtype in DTYPES:
            spec = spec_for(dtype, False, Fill.SAFE, **FAMILIES[family](dtype))
            assert plan.choose(spec).kernel != "reference", (family, dtype)


# ------------------------------------------------------------------ whole graphs, planned for CUDA
GRAPHS = {
    "nanogpt_causal": (models.NanoGPTBlock, lambda: (torch.randn(2, 12, 32),)),
    "alibi": (models.Alibi, lambda: (torch.randn(2, 12, 32),)),
    "sliding_window": (models.SlidingWindow, lambda: (torch.randn(2, 12, 32),)),
    "padding": (models.PaddedEncoder, lambda: (torch.randn(2, 12, 32), torch.ones(2, 12))),
    "documents": (models.Documents, lambda: (torch.randn(2, 12, 32), torch.tensor([[0] * 5 + [1] * 7] * 2))),
    "gqa": (models.GroupedQuery, lambda: (torch.randn(2, 12, 32),)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_explain_plans_captured_graphs_for_cuda(monkeypatch, training):
    """plan_graph, the memory model and the report on real captured graphs whose sites are on CUDA.

    The graphs are captured on CPU and the planner sees their specs moved to
    ``cuda`` on a simulated H200; the simulation is active only while the pass
    runs, not while dynamo traces.
    """
    from attnopt import backend

    spec_of, run_pass = plan.spec_of, backend.optimize_graph
    passes = []

    def optimize_graph_on_h200(*args, **kwargs):
        passes.append(1)
        with pytest.MonkeyPatch.context() as mp:
            simulate(mp, "h200")
            mp.setattr(plan, "spec_of", lambda match: spec_of(match).with_(device=CUDA))
            return run_pass(*args, **kwargs)

    monkeypatch.setattr(backend, "optimize_graph", optimize_graph_on_h200)
    for name, (build, inputs) in GRAPHS.items():
        torch.manual_seed(0)
        with torch.set_grad_enabled(training):
            report = attnopt.explain(build().train(training), inputs(), tune=False)
        assert passes, "the pass ran without the simulated H200"
        # each site replaced by a CUDA kernel, or kept because the original is estimated no slower
        assert report.sites, f"{name}: no site"
        for site in report.sites:
            planned = site.kernel not in CPU_ONLY if site.replaced else site.reason.startswith("original")
            assert planned, f"{name}:\n{report}"
        assert str(report)


@pytest.mark.parametrize(("terms", "takes_dropout"), [
    (dict(causal=True), True),
    (dict(key_padding=meta(B, N)), True),
    (dict(causal=True, q_doc=meta(B, N, dtype=torch.int64), kv_doc=meta(B, N, dtype=torch.int64)), True),
    (dict(d=60), False),  # ATen's pair takes head dims divisible by 8
    (dict(mask=meta(B, 1, 1, N, dtype=torch.float32)), False),  # an additive term: SDPA's autograd only
], ids=["causal", "key_padding", "documents", "head_dim_60", "additive_mask"])
def test_cudnn_takes_dropout_through_its_saved_forward_pair_only(monkeypatch, terms, takes_dropout):
    """SDPA's own cuDNN dropout backward is wrong when the output's gradient is in the queries' layout (torch
    2.11, ``benchmarks/results/sdpa_dropout_layouts.md``); ATen's forward and backward pair, as attnopt calls
    it, is right in both. So cuDNN takes dropout exactly where its calls go through that pair."""
    simulate(monkeypatch, "h200")
    spec = spec_for(torch.bfloat16, True, Fill.FINITE_ADDED, **terms).with_(dropout_p=0.1)
    cudnn = registry.get("sdpa_cudnn")
    dropout_reasons = [r for r in cudnn.not_supported_reasons(spec) if r.startswith("dropout")]
    assert cudnn._saves_lse(spec) == takes_dropout
    assert (not dropout_reasons) == takes_dropout, dropout_reasons
    if not takes_dropout:
        assert "forward and backward pair" in dropout_reasons[0]
