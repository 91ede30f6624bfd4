"""The lean call path of a replaced site (``attnopt.ops.SiteCall``): what it computes, what it skips.

An inference call runs the kernel chosen at rewrite time directly, on a call plan made once per call
shape; everything else takes the ``attnopt::attention`` op. These tests check that the two paths give
the same output (and the float64 oracle's) for every fill and mask term, that nothing is rebuilt or
looked up per call, and that each call that needs the op still gets it.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend

import attnopt
import attnopt.ops as ops
from attnopt.kernels import registry
from attnopt.kernels import sdpa as sdpa_module
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.registry import Kernel
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from attnopt.ops import SiteCall, spec_from_args

NO_TERMS = (None, None, None, None, None)
#: the fills of any combination of terms
FILLS = [f.value for f in (Fill.NEG_INF, Fill.FINITE, Fill.FINITE_ADDED, Fill.SAFE)]


# ------------------------------------------------------------------ same output as the op, and the oracle


@st.composite
def calls(draw):
    """A call of every term and fill a CPU kernel takes: static arguments and tensors (rows without keys
    included: left padding, a fully padded batch row, documents, boolean and additive masks)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    nq, nk, d = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.sampled_from([4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(b, hkv * group, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g).to(dtype) for _ in range(2))
    causal = draw(st.booleans())
    align = draw(st.sampled_from(["top_left", "bottom_right"]))
    left, right = (draw(st.none() | st.integers(0, 4)) for _ in range(2))
    key_padding = q_doc = kv_doc = bias = mask = None
    if draw(st.booleans()):
        key_padding = torch.rand(b, nk, generator=g) > 0.4
        key_padding[0, : draw(st.integers(0, nk))] = False  # left padding, up to a batch row with no key
    if draw(st.booleans()):
        q_doc = torch.sort(torch.randint(0, 3, (1, nq), generator=g)).values
        kv_doc = torch.sort(torch.randint(0, 3, (1, nk), generator=g)).values
    kind = draw(st.sampled_from(["none", "bool", "finfo_min", "-inf", "bias"]))
    if kind == "bool":
        mask = torch.rand(1, 1, nq, nk, generator=g) > 0.3
    elif kind in ("finfo_min", "-inf"):
        masked = torch.rand(b, 1, nq, nk, generator=g) < 0.7
        mask = torch.zeros(masked.shape, dtype=dtype).masked_fill(
            masked, torch.finfo(dtype).min if kind == "finfo_min" else float("-inf"))
    elif kind == "bias":
        bias = torch.randn(1, hkv * group, nq, nk, generator=g).to(dtype)
    softcap = draw(st.none() | st.just(5.0))
    # an additive -inf makes a row NaN in the original whatever fill its boolean terms have
    fill = "-inf" if kind == "-inf" else draw(st.sampled_from(FILLS))
    static = (d ** -0.5, causal, align, left, right, softcap)
    return (q, k, v, key_padding, q_doc, kv_doc, bias, mask), static, fill


@pytest.mark.parametrize("kernel", ["sdpa_cpu", "reference"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_inference_gives_the_training_path_output_and_the_oracle(kernel, call):
    tensors, static, fill = call
    spec = spec_from_args(*tensors, *static, 0.0, fill)
    if registry.get(kernel).not_supported_reasons(spec):
        return  # the planner never hands this call to this kernel
    site = SiteCall(kernel, *static, fill)
    with torch.no_grad():
        lean = site(*tensors, 0.0)[0]
        lean_again = site(*tensors, 0.0)[0]  # from the call plan the first call made
    q, k, v, *terms = tensors
    trained = [t.clone().requires_grad_(True) for t in (q, k, v)]
    op = site(*trained, *terms, 0.0)[0]  # grad asked: the op, with autograd
    assert op.grad_fn is not None and lean.grad_fn is None
    torch.testing.assert_close(lean, op.detach(), atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(lean_again, lean, atol=0, rtol=0, equal_nan=True)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[q.dtype]
    want = naive_attention(q, k, v, spec)
    assert torch.isnan(lean).equal(torch.isnan(want)), "rows without keys differ"
    torch.testing.assert_close(lean.double(), want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("kernel", ["sdpa_cpu", "reference"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls(), dropout=st.sampled_from([0.0, 0.3]))
def test_training_call_skips_the_op_dispatch_with_the_ops_gradients(kernel, call, dropout):
    """Under autograd a site runs the op's body and autograd as an ``autograd.Function``: output and
    gradients (q, k, v, an additive term) bit for bit the op's, dropout included (same seed)."""
    tensors, static, fill = call
    spec = spec_from_args(*tensors, *static, dropout, fill)
    if registry.get(kernel).not_supported_reasons(spec):
        return
    q, k, v, key_padding, q_doc, kv_doc, bias, mask = tensors
    trained = bias if bias is not None else mask if mask is not None and mask.is_floating_point() else None

    def run(call_op):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        term = None if trained is None else trained.clone().requires_grad_(True)
        terms = [key_padding, q_doc, kv_doc, term if bias is not None else None,
                 term if bias is None and term is not None else mask]
        torch.manual_seed(7)
        out = call_op(*leaves, *terms)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        wrt = leaves + ([term] if term is not None else [])
        return out, torch.autograd.grad(out, wrt, grad, allow_unused=True)

    site = SiteCall(kernel, *static, fill)
    out, grads = run(lambda *a: site(*a, dropout)[0])
    assert type(out.grad_fn).__name__.startswith("_EagerAttention")
    want, want_grads = run(lambda *a: torch.ops.attnopt.attention.default(*a, *static, dropout, fill, kernel)[0])
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    for g, w in zip(grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("empty_row", [False, True], ids=["every_row_keyed", "a_row_without_keys"])
def test_training_call_backward_takes_its_forwards_mask(empty_row, monkeypatch):
    """A training call builds (or looks up) its mask once: the backward takes what the forward found, rows to
    fill included, instead of a second lookup. Padding that leaves every row a key fills nothing; a batch row
    of padding only is filled, with its gradients, as the op fills it."""
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 8, 2, 4
    q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, n // 2:] = False
    if empty_row:
        keep[1] = False
    static = (d ** -0.5, False, "top_left", None, None, None)
    lookups, fills = [], []
    lookup, fill = sdpa_module.mask_and_empty_rows, sdpa_module.fill_empty_rows
    monkeypatch.setattr(sdpa_module, "mask_and_empty_rows", lambda spec: lookups.append(1) or lookup(spec))
    monkeypatch.setattr(sdpa_module, "fill_empty_rows", lambda *a, **kw: fills.append(1) or fill(*a, **kw))
    site = SiteCall("sdpa_cpu", *static, "finite_added")
    grad = torch.randn(b, h, n, d, generator=g)

    def run(call):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = call(*leaves)
        return out, torch.autograd.grad(out, leaves, grad)

    out, grads = run(lambda *qkv: site(*qkv, keep, None, None, None, None, 0.0)[0])
    assert len(lookups) == 1 and len(fills) == int(empty_row)
    want, want_grads = run(lambda *qkv: torch.ops.attnopt.attention.default(
        *qkv, keep, None, None, None, None, *static, 0.0, "finite_added", "sdpa_cpu")[0])
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_training_call_on_a_device_without_the_eager_path_runs_the_op(monkeypatch):
    """A training call on a device outside ``EAGER_TRAINING_DEVICES`` goes through the op with its autograd,
    never the inference path (which records no graph): gradients equal the eager path's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    static = (8 ** -0.5, True, "top_left", None, None, None)
    site = SiteCall("reference", *static, "-inf")

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = site(*leaves, *NO_TERMS, 0.0)[0]
        return out, torch.autograd.grad(out.square().sum(), leaves)

    eager_out, eager_grads = grads()
    monkeypatch.setattr(ops, "EAGER_TRAINING_DEVICES", ())
    out, op_grads = grads()
    assert type(out.grad_fn).__name__ != type(eager_out.grad_fn).__name__  # the op's autograd node
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
    for x, w in zip(op_grads, eager_grads):
        torch.testing.assert_close(x, w, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "triton_flash", "reference"])
def test_training_call_on_cuda_gives_the_ops_gradients(kernel, monkeypatch):
    """The ``autograd.Function`` path on CUDA (``EAGER_TRAINING_DEVICES`` opened for the test), HF's
    transposed layouts, GQA 8/2, causal, bf16: output and gradients equal the op's (kernels whose backward
    accumulates in another order agree to rounding)."""
    monkeypatch.setattr(ops, "EAGER_TRAINING_DEVICES", ("cpu", "cuda"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, h, 64, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for h in (8, 2, 2))
    grad = torch.randn(2, 8, 256, 64, generator=g).to("cuda", torch.bfloat16)
    static = (0.125, True, "top_left", None, None, None)
    site = SiteCall(kernel, *static, "-inf")

    def run(call_op):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = call_op(*leaves)
        return out, torch.autograd.grad(out, leaves, grad)

    out, grads = run(lambda q, k, v: site(q, k, v, *NO_TERMS, 0.0)[0])
    assert type(out.grad_fn).__name__.startswith("_EagerAttention")
    want, want_grads = run(lambda q, k, v: torch.ops.attnopt.attention.default(
        q, k, v, *NO_TERMS, *static, 0.0, "-inf", kernel)[0])
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for x, w in zip(grads, want_grads):
        torch.testing.assert_close(x.float(), w.float(), atol=2e-2 * w.abs().max().item(), rtol=0)


def test_training_call_second_derivatives_are_the_ops():
    """create_graph=True through a site's training call: the gradient penalty's gradients equal the op's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[True] * 5, [False] * 2 + [True] * 3])
    static = (0.5, True, "bottom_right", None, None, None)
    site = SiteCall("reference", *static, "finite_added")

    def second(call_op):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        first = torch.autograd.grad(call_op(*leaves).square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(x.square().sum() for x in first), leaves)

    got = second(lambda q, k, v: site(q, k, v, keep, None, None, None, None, 0.0)[0])
    want = second(lambda q, k, v: torch.ops.attnopt.attention.default(
        q, k, v, keep, None, None, None, None, *static, 0.0, "finite_added", "reference")[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fast_mask_decisions_match_their_definition_in_mask_terms():
    """``needs_mask`` and ``is_causal`` read the spec field by field (they run per call); their
    definition is in terms of ``mask_terms``: the two agree on every combination of terms."""
    meta = torch.empty(1, 2, 5, 8, device="meta")

    def definition(spec: AttentionSpec) -> tuple[bool, bool]:
        terms = set(spec.mask_terms)
        pure = spec.causal and spec.align == Align.TOP_LEFT and terms == {"causal"}
        hides_nothing = terms <= {"causal", "window"} and spec.band_hides_nothing()
        return bool(terms) and not pure and not hides_nothing, pure and not spec.band_hides_nothing()

    seen = set()
    for nq, nk in ((5, 8), (1, 8), (8, 1), (5, 5)):
        q, k = meta[:, :, :nq], meta[:, :, :nk]
        for causal in (False, True):
            for align in Align:
                for window in (None, Window(2, 0), Window(None, 1), Window(20, 20)):
                    for extra in ({}, {"key_padding": torch.ones(1, nk, dtype=torch.bool)},
                                  {"bias": torch.zeros(1, 1, nq, nk)}, {"softcap": 3.0},
                                  {"mask": torch.ones(1, 1, nq, nk, dtype=torch.bool)}):
                        spec = AttentionSpec.from_tensors(q, k, k, causal=causal, align=align, window=window,
                                                          **extra)
                        fast = (sdpa_module.needs_mask(spec), sdpa_module._is_causal(spec))
                        assert fast == definition(spec), spec
                        seen.add(fast)
    assert seen == {(False, False), (True, False), (False, True)}  # every outcome was reached


def test_cpu_kernel_reads_grouped_heads_as_repeated_heads():
    """Where ATen's CPU flash attention reads K/V groups itself, the forward repeats nothing; the output is
    the one over repeated heads, bit for bit."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 5, 16, generator=g)
    k, v = (torch.randn(2, 2, 7, 16, generator=g) for _ in range(2))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT)
    kernel = registry.get("sdpa_cpu")
    grouped = kernel.infer(q, k, v, spec)
    repeated = kernel.infer(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), spec.with_(kv_heads=8))
    assert torch.equal(grouped, repeated)
    torch.testing.assert_close(grouped.double(), naive_attention(q, k, v, spec), atol=2e-5, rtol=2e-5)


def test_cuda_kernels_python_path_on_cpu_tensors():
    """The CUDA SDPA kernels' inference path (``prepare``, the pinned backend, native GQA, the mask and fills
    when terms need them), run here on CPU tensors with the one backend SDPA has on both devices."""
    kernel = sdpa_module.SDPAKernel("flash_pinned", SDPBackend.FLASH_ATTENTION, "cuda", (torch.float32,), 256, True,
                                    1e12, "")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 6, 16, generator=g)
    k, v = (torch.randn(2, 2, 6, 16, generator=g) for _ in range(2))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :4] = False  # rows 0-3 of batch row 1 see no key under causal
    enabled = [get() for get in sdpa_module._IS_ENABLED]
    for terms in ({}, {"key_padding": keep, "fill": Fill.FINITE}):
        spec = AttentionSpec.from_tensors(q, k, v, causal=True, **terms)
        run = kernel.prepare(spec)
        got = run(q, k, v, spec)
        torch.testing.assert_close(got.double(), naive_attention(q, k, v, spec), atol=2e-5, rtol=2e-5)
        assert torch.equal(got, kernel.infer(q, k, v, spec))
    assert [get() for get in sdpa_module._IS_ENABLED] == enabled  # the switches are as they were


@pytest.mark.filterwarnings("ignore:Flash attention")
def test_pinned_backend_switches_are_restored_after_an_error():
    enabled = [get() for get in sdpa_module._IS_ENABLED]
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError):
        sdpa_module._pinned(sdpa_module._only(SDPBackend.FLASH_ATTENTION), q, q[..., :4], q, None, False, None)
    assert [get() for get in sdpa_module._IS_ENABLED] == enabled


# ------------------------------------------------------------------ nothing rebuilt or looked up per call


class _Probe(Kernel):
    """A kernel that records how it is called: ``forward`` (the op's way), ``infer`` and ``prepare``."""

    name = "lean_probe"
    summary = "records its calls"

    def __init__(self):
        self.calls: list[str] = []
        self.autocast_seen: list[bool] = []

    def not_supported_reasons(self, spec):
        return []

    def forward(self, q, k, v, spec, seed):
        self.calls.append("forward")
        out = naive_attention(q, k, v, spec).to(q.dtype)
        return out, torch.zeros(q.shape[:-1])

    def infer(self, q, k, v, spec):
        self.calls.append("infer")
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return naive_attention(q, k, v, spec).to(q.dtype)

    def prepare(self, spec):
        self.calls.append("prepare")
        return self.infer


@pytest.fixture
def probe(monkeypatch):
    kernel = _Probe()
    monkeypatch.setitem(registry._KERNELS, kernel.name, kernel)
    return kernel


def _qkv(b=2, h=2, n=6, d=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_no_spec_built_and_no_lookup_per_call(probe, monkeypatch):
    built, looked_up = [], []
    from_tensors, get = AttentionSpec.from_tensors, registry.get
    monkeypatch.setattr(AttentionSpec, "from_tensors", staticmethod(lambda *a, **kw: built.append(1) or
                                                                    from_tensors(*a, **kw)))
    monkeypatch.setattr(registry, "get", lambda name: looked_up.append(name) or get(name))
    site = SiteCall(probe.name, 0.25, True, "top_left", None, None, None, "-inf")
    assert looked_up == [probe.name]  # once, when the call is built
    keep = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        for n in (6, 6, 6, 4, 6, 4):
            q, k, v = _qkv(n=n)
            site(q, k, v, *NO_TERMS, 0.0)
            site(q, k, v, keep[:, :n], None, None, None, None, 0.0)
    assert len(built) == 1  # the first call's spec; the other call shapes' are copies of it
    assert probe.calls.count("prepare") == 4 and probe.calls.count("infer") == 12  # one plan per shape and terms
    assert "forward" not in probe.calls and looked_up == [probe.name]
    monkeypatch.undo()
    for (q_shape, k_shape, v_shape, *_), (template, _, _) in site._plans.items():
        q, k, v = (torch.empty(shape) for shape in (q_shape, k_shape, v_shape))
        want = spec_from_args(q, k, v, *NO_TERMS, 0.25, True, "top_left", None, None, None, 0.0, "-inf")
        assert vars(template) == vars(want)


def test_plans_keep_no_tensor_of_a_call_and_are_bounded(probe):
    site = SiteCall(probe.name, 0.25, False, "top_left", None, None, None, "-inf")
    q, k, v = _qkv()
    keep = torch.ones(2, 6, dtype=torch.bool)
    gone = weakref.ref(keep)
    with torch.no_grad():
        site(q, k, v, keep, None, None, None, None, 0.0)
    del keep
    gc.collect()
    assert gone() is None, "a call plan kept the call's key padding alive"
    with torch.no_grad():
        for n in range(1, SiteCall.MAX_SHAPES + 10):
            site(*_qkv(b=1, h=1, n=n, d=4), *NO_TERMS, 0.0)
    assert 0 < len(site._plans) <= SiteCall.MAX_SHAPES


@pytest.mark.parametrize("case", ["grad", "dropout", "auto", "fake", "functorch"])
def test_calls_that_need_the_op_get_it(probe, case, monkeypatch):
    site = SiteCall("auto" if case == "auto" else probe.name, 0.25, True, "top_left", None, None, None, "-inf")
    if case == "auto":
        monkeypatch.setattr("attnopt.passes.plan.choose", lambda spec: type("Choice", (), {"kernel": probe.name}))
    q, k, v = _qkv(requires_grad=case == "grad")
    dropout = 0.1 if case == "dropout" else 0.0
    if case == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            q, k, v = (mode.from_tensor(t) for t in (q, k, v))
            out = site(q, k, v, *NO_TERMS, dropout)[0]
        assert out.shape == q.shape and probe.calls == []  # the op's fake implementation ran
        return
    if case == "functorch":
        out = torch.vmap(lambda q_: site(q_, k, v, *NO_TERMS, 0.0)[0])(q[None])[0]
    else:
        out = site(q, k, v, *NO_TERMS, dropout)[0]
    assert "forward" in probe.calls and "infer" not in probe.calls, probe.calls
    assert out.shape == q.shape
    if case == "grad":
        assert out.grad_fn is not None


def test_context_parallel_scope_gets_the_op(probe, monkeypatch):
    seen = []

    class Scope:
        def op_forward(self, q, *args):
            seen.append(args[-1])  # the kernel's name, with every other argument of the op
            return q.clone(), q.new_zeros(q.shape[:-1]), q.new_zeros((1,), dtype=torch.int64)

    monkeypatch.setattr(ops, "_context_parallel", lambda: Scope())
    q, k, v = _qkv()
    with torch.no_grad():
        SiteCall(probe.name, 0.25, True, "top_left", None, None, None, "-inf")(q, k, v, *NO_TERMS, 0.0)
    assert seen == [probe.name] and probe.calls == []


def test_kernel_runs_outside_autocast(probe):
    q, k, v = _qkv()
    site = SiteCall(probe.name, 0.25, True, "top_left", None, None, None, "-inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = site(q, k, v, *NO_TERMS, 0.0)[0]
    assert probe.autocast_seen == [False] and out.dtype == torch.float32


@pytest.mark.parametrize("bad, error", [
    ({"align": "diagonal"}, "align='diagonal' is not allowed"),
    ({"fill": "zero"}, "fill='zero' is not allowed"),
    ({"window_left": -1}, "window left=-1 is not allowed"),
    ({"softcap": 0.0}, "softcap=0.0 must be a positive number"),
    ({"scale": "1"}, "scale='1' must be a number"),
    ({"kernel": "no_such_kernel"}, "unknown attention kernel 'no_such_kernel'"),
])
def test_bad_static_arguments_are_refused_when_the_call_is_built(bad, error):
    args = dict(kernel="reference", scale=0.25, causal=True, align="top_left", window_left=None,
                window_right=None, softcap=None, fill="-inf")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=error):
        SiteCall(**args)


def test_terms_are_validated_once_per_call_plan(probe):
    site = SiteCall(probe.name, 0.25, True, "top_left", None, None, None, "-inf")
    q, k, v = _qkv()
    with torch.no_grad(), pytest.raises(ValueError, match=r"key_padding_mask of shape \(2, 5\)"):
        site(q, k, v, torch.ones(2, 5, dtype=torch.bool), None, None, None, None, 0.0)
    assert probe.calls == []


# ------------------------------------------------------------------ in an optimized model


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, keep):  # keep: [B, N] bool key padding
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)  # [B, H, N, D] each
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~(causal & keep[:, None, None, :]), torch.finfo(x.dtype).min)
        return F.softmax(scores, dim=-1) @ v


def test_optimized_model_calls_its_kernel_through_the_plan_it_was_given(monkeypatch):
    torch.manual_seed(0)
    model = _Attention().eval()
    original = copy.deepcopy(model)  # optimize rewrites the model in place: the original runs from its copy
    optimized = attnopt.optimize(model, kernel="sdpa_cpu", tune=False)
    x = torch.randn(2, 5, 16)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, :3] = False  # rows 0-2 of batch row 1 see no key: the finfo.min fill averages v there
    with torch.no_grad():
        expected = original(x, keep)
        torch.testing.assert_close(optimized(x, keep), expected, atol=1e-5, rtol=1e-5)
        built = []
        from_tensors = AttentionSpec.from_tensors
        monkeypatch.setattr(AttentionSpec, "from_tensors", staticmethod(lambda *a, **kw: built.append(1) or
                                                                        from_tensors(*a, **kw)))
        monkeypatch.setattr(registry, "get", lambda name: pytest.fail(f"kernel {name} looked up per call"))
        for _ in range(3):
            torch.testing.assert_close(optimized(x, keep), expected, atol=1e-5, rtol=1e-5)
    assert built == [], "a spec was built per call"
    assert [s.replaced for s in optimized.attnopt_report.sites] == [True]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("fill", ["-inf", "finite", "safe"])
def test_cuda_inference_gives_the_op_output(kernel, fill):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 64, 64, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, 2, 64, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    keep = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    keep[1, :40] = False
    for key_padding in (None, keep):
        tensors = (q, k, v, key_padding, None, None, None, None)
        static = (0.125, True, "top_left", None, None, None)
        if registry.get(kernel).not_supported_reasons(spec_from_args(*tensors, *static, 0.0, fill)):
            continue
        with torch.no_grad():
            lean = SiteCall(kernel, *static, fill)(*tensors, 0.0)[0]
            op = torch.ops.attnopt.attention(*tensors, *static, 0.0, fill, kernel)[0]
        torch.testing.assert_close(lean, op, atol=0, rtol=0, equal_nan=True)


def test_training_call_backward_keeps_the_kernels_layouts(monkeypatch):
    """The backward of a training call hands the kernel the output's gradient as autograd gives it (laid out
    like the output the kernel made, as cuDNN's backward wants it) and hands on the kernel's gradients as
    it made them: no contiguous copy of either, which HF's transpose and view backward would copy back.
    The op's backward, which its fake implementation describes, still makes both contiguous."""
    g = torch.Generator().manual_seed(1)
    b, n, hq, hkv, d = 2, 16, 4, 2, 8
    q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2).requires_grad_(True) for h in (hq, hkv, hkv))
    static = (d ** -0.5, True, "top_left", None, None, None)
    kernel = registry.get("sdpa_cpu")
    seen = {}
    train_backward = type(kernel).train_backward

    def recorded(self, residual, grad_out, *args):  # the training call's and (through ``backward``) the op's
        grads = train_backward(self, residual, grad_out, *args)
        seen["grad_out"], seen["grads"] = grad_out, grads[:3]
        return grads

    monkeypatch.setattr(type(kernel), "train_backward", recorded)
    out = SiteCall("sdpa_cpu", *static, "-inf")(q, k, v, *NO_TERMS, 0.0)[0]
    merged = out.transpose(1, 2).reshape(b, n, hq * d)
    grads = torch.autograd.grad(merged.square().sum(), (q, k, v))
    assert seen["grad_out"].stride() == out.stride() and not seen["grad_out"].is_contiguous()
    for got, made in zip(grads, seen["grads"]):
        assert got.data_ptr() == made.data_ptr()  # the kernel's own tensor, not a copy
    op = torch.ops.attnopt.attention.default(q, k, v, *NO_TERMS, *static, 0.0, "-inf", "sdpa_cpu")[0]
    want = torch.autograd.grad(op.transpose(1, 2).reshape(b, n, hq * d).square().sum(), (q, k, v))
    assert seen["grad_out"].is_contiguous()  # the op's backward
    for x, w in zip(grads, want):
        torch.testing.assert_close(x, w, atol=1e-6, rtol=1e-6)


def test_training_call_keeps_the_kernels_output_layout():
    """HF's layer reads the output as ``transpose(1, 2).reshape(B, N, H * D)``. SDPA's output is laid out like
    the queries, so that is a view; a training call hands it on as the kernel made it (the op, whose fake
    describes a contiguous output, makes it contiguous, and the reshape then copies what a step keeps)."""
    g = torch.Generator().manual_seed(0)
    b, n, hq, hkv, d = 2, 16, 4, 2, 8
    q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2).requires_grad_(True) for h in (hq, hkv, hkv))
    static = (d ** -0.5, True, "top_left", None, None, None)
    out = SiteCall("sdpa_cpu", *static, "-inf")(q, k, v, *NO_TERMS, 0.0)[0]
    assert type(out.grad_fn).__name__.startswith("_EagerAttention")
    merged = out.transpose(1, 2).reshape(b, n, hq * d)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, no copy
    op = torch.ops.attnopt.attention.default(q, k, v, *NO_TERMS, *static, 0.0, "-inf", "sdpa_cpu")[0]
    assert op.is_contiguous()
    torch.testing.assert_close(out, op, atol=0, rtol=0)
    grads = torch.autograd.grad(merged.square().sum(), (q, k, v))
    want = torch.autograd.grad(op.transpose(1, 2).reshape(b, n, hq * d).square().sum(), (q, k, v))
    for x, w in zip(grads, want):
        torch.testing.assert_close(x, w, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ the functional API's plain calls


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
@pytest.mark.parametrize("terms", ["causal_padding", "documents_gqa"])
def test_functional_plain_calls_skip_the_op_with_its_results(kernel, terms):
    """``attnopt.attention`` with a named kernel on plain tensors: inference runs the kernel, a call under
    autograd runs ``_EagerAttention``; outputs and gradients are the op's, bit for bit. With kernel "auto" (the
    planner chooses per call) the op still runs."""
    g = torch.Generator().manual_seed(0)
    hkv = 2 if terms == "documents_gqa" else 4
    q = torch.randn(2, 4, 12, 8, generator=g)
    k, v = torch.randn(2, hkv, 12, 8, generator=g), torch.randn(2, hkv, 12, 8, generator=g)
    extra = ({"causal": True, "key_padding_mask": torch.tensor([[True] * 12, [False] * 4 + [True] * 8])}
             if terms == "causal_padding" else
             {"document_ids": torch.tensor([[0] * 5 + [1] * 7, [0] * 12])})
    spec = AttentionSpec.from_tensors(q, k, v, causal=extra.get("causal", False),
                                      key_padding=extra.get("key_padding_mask"),
                                      q_doc=extra.get("document_ids"), kv_doc=extra.get("document_ids"))
    op_args = (spec.key_padding, spec.q_doc, spec.kv_doc, None, None, spec.scale, spec.causal, "top_left", None,
               None, None, 0.0, "safe", kernel)
    with torch.no_grad():
        out = attnopt.attention(q, k, v, kernel=kernel, **extra)
        assert torch.equal(out, torch.ops.attnopt.attention(q, k, v, *op_args)[0])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnopt.attention(*leaves, kernel=kernel, **extra)
    assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, grad)
    op_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op_out = torch.ops.attnopt.attention(*op_leaves, *op_args)[0]
    assert "attnopt_attention" in type(op_out.grad_fn).__name__
    assert torch.equal(out, op_out)
    assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(op_out, op_leaves, grad)))
    auto = attnopt.attention(*leaves, kernel="auto", **extra)
    assert "attnopt_attention" in type(auto.grad_fn).__name__


@pytest.mark.parametrize("own", [True, False], ids=["kernel_has_own_autograd", "kernel_has_none"])
def test_a_training_call_with_dropout_takes_the_kernels_own_autograd(own, monkeypatch):
    """With dropout (never twice differentiable, ``ops._differentiable_grads``) a training call's output is the
    kernel's ``autograd_forward`` where it gives one, under the call's seed and outside autocast; where it gives
    None, the op's autograd function. Without dropout (twice differentiable) it is never asked."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    static = (0.5, True, "top_left", None, None, None)
    site = SiteCall("reference", *static, "-inf")
    asked = []

    def autograd_forward(q, k, v, spec, seed):
        asked.append((spec.dropout_p, seed, torch.is_autocast_enabled("cpu")))
        return (q * 3.0) if own else None

    monkeypatch.setattr(site.kernel, "autograd_forward", autograd_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = site(q, k, v, *NO_TERMS, 0.25)[0]
    assert len(asked) == 1 and asked[0][0] == 0.25 and asked[0][1] != 0 and asked[0][2] is False
    if own:
        torch.testing.assert_close(out, q * 3.0, atol=0, rtol=0)
    else:
        assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction) and out.shape == q.shape
    site(q, k, v, *NO_TERMS, 0.0)
    assert len(asked) == 1
