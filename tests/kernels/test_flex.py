"""flex against the float64 oracle and the reference kernel, for every term it claims, empty rows included.

On the CPU most tests run torch's FlexAttention uncompiled (its reference
implementation, the same ``mask_mod``/``score_mod``/``BlockMask`` semantics):
compiling a FlexAttention graph takes seconds per spec family there. One
test runs the compiled CPU kernel. GPU tests (``-m gpu``) run the compiled
CUDA kernels in half precision, forward and backward.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import flex, reference
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from attnopt.passes import plan
from attnopt.passes.plan import NoKernelError

pytestmark = pytest.mark.skipif(flex._torch_support() is not None, reason="this torch has no FlexAttention")

#: max abs error on unit-variance inputs (scaled by max(1, |oracle|))
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def uncompiled(monkeypatch):
    """FlexAttention's own uncompiled implementation in place of the compiled kernel."""
    module = flex._flex_module
    monkeypatch.setattr(module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    monkeypatch.setattr(flex, "compiled", lambda device_type, family: module.flex_attention)


def _packed_ids(gen, batch, n):
    """Document ids of ``batch`` rows of ``n`` packed tokens: sorted, up to three documents."""
    starts = torch.rand(batch, n, generator=gen) < 2.0 / max(n, 1)
    return torch.cumsum(starts, dim=1).clamp(max=2)


#: each term flex claims: name -> spec terms, from ``c`` (the call: b, h, nq, nk, dtype and a generator g)
TERMS = {
    "none": lambda c: {},
    "causal": lambda c: {"causal": True},
    "causal_bottom_right": lambda c: {"causal": True, "align": Align.BOTTOM_RIGHT},
    "window_two_sided": lambda c: {"window": Window(9, 4)},
    "window_causal": lambda c: {"causal": True, "window": Window(24, 0)},
    "window_left_open": lambda c: {"window": Window(None, 3), "align": Align.BOTTOM_RIGHT},
    "key_lengths": lambda c: {"key_padding": torch.randint(0, c.nk + 1, (c.b,), generator=c.g)},
    "key_padding": lambda c: {"key_padding": torch.rand(c.b, c.nk, generator=c.g) > 0.3},
    "documents": lambda c: {"q_doc": _packed_ids(c.g, c.b, c.nq), "kv_doc": _packed_ids(c.g, c.b, c.nk)},
    "documents_shared": lambda c: {"q_doc": _packed_ids(c.g, 1, c.nq), "kv_doc": _packed_ids(c.g, 1, c.nk),
                                   "causal": True},
    "alibi_float32": lambda c: {
        "bias": (torch.arange(c.nk) - torch.arange(c.nq)[:, None]).float() * -torch.rand(c.h, 1, 1, generator=c.g)},
    "bias_key_only": lambda c: {"bias": torch.randn(c.h, 1, c.nk, generator=c.g)},
    "bias_input_dtype": lambda c: {"bias": torch.randn(c.b, 1, c.nq, c.nk, generator=c.g).to(c.dtype)},
    "mask_bool": lambda c: {"mask": torch.rand(c.b, 1, c.nq, c.nk, generator=c.g) > 0.5},
    "mask_bool_per_head": lambda c: {"mask": torch.rand(c.h, c.nq, c.nk, generator=c.g) > 0.5},
    "mask_finfo_min": lambda c: {
        "mask": torch.where(torch.rand(c.b, 1, 1, c.nk, generator=c.g) > 0.3, 0.0, torch.finfo(c.dtype).min).to(c.dtype)},
    "softcap_scale": lambda c: {"softcap": 4.0, "scale": 0.4},
    "everything": lambda c: {
        "causal": True, "window": Window(40, 0), "key_padding": torch.rand(c.b, c.nk, generator=c.g) > 0.2,
        "q_doc": _packed_ids(c.g, c.b, c.nq), "kv_doc": _packed_ids(c.g, c.b, c.nk),
        "bias": torch.randn(1, c.h, c.nq, c.nk, generator=c.g), "softcap": 20.0},
}
#: (B, Hq, Hkv, Nq, Nk): lengths cross FlexAttention's 128-blocks; grouped-query; cross attention with MQA
LAYOUTS = {"gqa": (2, 4, 2, 136, 136), "cross_mqa": (1, 3, 1, 37, 200)}
#: the terms also run in cross attention with one kv head
CROSS_TERMS = ("causal_bottom_right", "window_two_sided", "key_padding", "documents", "mask_finfo_min", "everything")


def make_inputs(layout, term, dtype=torch.float32, fill=Fill.SAFE, seed=0, device="cpu", d=16):
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, nq, nk = layout
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    terms = TERMS[term](SimpleNamespace(b=b, h=hq, nq=nq, nk=nk, dtype=dtype, g=gen))
    terms = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in terms.items()}
    q, k, v = q.to(device), k.to(device), v.to(device)
    return q, k, v, AttentionSpec.from_tensors(q, k, v, fill=fill, **terms)


def assert_close(name, got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN rows differ"
    scale = max(1.0, want.nan_to_num(0).abs().max().item())
    err = (got - want).nan_to_num(0).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol * scale:.3g}"


def check_forward(q, k, v, spec, tol):
    """Both forward paths (with FlexAttention's log-sum-exp, as on CUDA; with the ones column, as on the
    CPU) against the float64 oracle and the reference kernel."""
    oracle = naive_attention(q, k, v, spec)
    ref, ref_lse = reference.ReferenceKernel().forward(q, k, v, spec, 0)
    with torch.no_grad():
        out, lse = flex.attend(q, k, v, spec, with_lse=True)
    empty = torch.isneginf(lse)
    assert torch.equal(empty, torch.isneginf(ref_lse)), "rows with no visible key differ from the reference's"
    for name, got in (("with lse", flex._filled(out, empty, v, spec)), ("ones column", flex.registry.get("flex")._cpu_forward(q, k, v, spec)[0])):
        assert got.dtype == q.dtype and got.shape == oracle.shape
        assert_close(f"{name} vs oracle", got, oracle, tol)
        assert_close(f"{name} vs reference", got, ref, tol)
    # rows made only of huge fills carry a floored log-sum-exp (flex.SCORE_FLOOR); the backward recomputes those
    ordinary = ~empty & (ref_lse.abs() < 1e30)
    torch.testing.assert_close(lse[ordinary], ref_lse.float()[ordinary], atol=tol * 10, rtol=tol * 10)


# ------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("term,layout", [(t, "gqa") for t in TERMS] + [(t, "cross_mqa") for t in CROSS_TERMS])
def test_every_term_matches_the_oracle(term, layout, uncompiled):
    q, k, v, spec = make_inputs(LAYOUTS[layout], term, fill=Fill.FINITE)
    assert flex.registry.get("flex").not_supported_reasons(spec) == []
    check_forward(q, k, v, spec, TOL[torch.float32])


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("term", ["key_lengths", "window_left_open", "everything"])
def test_rows_without_keys_follow_the_fill(term, fill, uncompiled):
    b, hq, hkv, nq, nk = LAYOUTS["gqa"]
    q, k, v, spec = make_inputs(LAYOUTS["gqa"], term, fill=fill, seed=3)
    if spec.key_padding is not None:  # batch 1 sees no key at all
        spec = spec.with_(key_padding=torch.tensor([nk, 0]) if term == "key_lengths" else spec.key_padding & (
            torch.arange(b)[:, None] == 0))
    if term == "window_left_open":  # rows before the first key: a bottom-right band with Nq > Nk
        q = torch.randn(b, hq, nk + 40, 16)
        spec = AttentionSpec.from_tensors(q, k, v, window=Window(None, 0), align=Align.BOTTOM_RIGHT, fill=fill)
    if fill == Fill.FINITE_REPLACED_ADDED and term == "everything":  # made of a band and key padding only
        with pytest.raises(NotImplementedError, match="band and key padding only"):
            reference.ReferenceKernel().forward(q, k, v, spec, 0)
        return
    empty = torch.isneginf(reference.ReferenceKernel().forward(q, k, v, spec, 0)[1])
    assert empty.any(), "the case has no empty row"
    check_forward(q, k, v, spec, TOL[torch.float32])


@st.composite
def problems(draw):
    """Any combination of the terms flex claims, on lengths around a block."""
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    nq, nk = draw(st.integers(1, 136)), draw(st.integers(1, 136))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, h, n, 16, generator=gen) for h, n in ((hkv * group, nq), (hkv, nk), (hkv, nk)))
    # Fill.FINITE_REPLACED_ADDED is made of a band and key padding only (test_rows_without_keys_follow_the_fill)
    terms = {"fill": draw(st.sampled_from([f for f in Fill if f != Fill.FINITE_REPLACED_ADDED]))}
    align = draw(st.sampled_from([None, *Align]))
    if align is not None:
        terms.update(causal=True, align=align)
    if draw(st.booleans()):
        terms["window"] = Window(draw(st.sampled_from([None, 0, 5, 60])), draw(st.sampled_from([None, 0, 7])))
    chosen = draw(st.sets(st.sampled_from(["key_lengths", "key_padding", "documents", "alibi_float32",
                                           "bias_key_only", "mask_bool", "mask_finfo_min", "softcap_scale"])))
    call = SimpleNamespace(b=b, h=hkv * group, nq=nq, nk=nk, dtype=torch.float32, g=gen)
    for name in sorted(chosen - ({"key_lengths"} if "key_padding" in chosen else set())):
        terms.update(TERMS[name](call))
    if "mask_bool" in chosen and "mask_finfo_min" in chosen:
        terms["mask"] = TERMS["mask_bool"](call)["mask"]
    return q, k, v, AttentionSpec.from_tensors(q, k, v, **terms)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems())
def test_any_combination_matches_the_oracle(uncompiled, problem):
    q, k, v, spec = problem
    spec.validate()
    assert flex.registry.get("flex").not_supported_reasons(spec) == []
    check_forward(q, k, v, spec, TOL[torch.float32])


@pytest.mark.parametrize("term", ["causal_bottom_right", "window_two_sided", "key_padding", "documents",
                                  "mask_bool_per_head", "everything"])
def test_block_mask_is_sound(term):
    """No visible entry lies in a skipped block, and full blocks hold no masked entry."""
    q, k, v, spec = make_inputs((2, 3, 3, 300, 270), term)
    bm = flex.block_mask(spec, flex.mask_mod_of(spec))
    keep, _ = spec.materialize()
    keep = keep.expand(2, 3, 300, 270)

    def tiles(outside):  # entries past the lengths count as ``outside``
        return torch.nn.functional.pad(keep, (0, -270 % 128, 0, -300 % 128), value=outside).reshape(2, 3, 3, 128, 3, 128)

    any_, all_ = tiles(False).any(5).any(3), tiles(True).all(5).all(3)
    listed = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    full = torch.zeros_like(listed)
    for kind, count, index in (("partial", bm.kv_num_blocks, bm.kv_indices), ("full", bm.full_kv_num_blocks, bm.full_kv_indices)):
        count, index = count.expand(2, 3, 3), index.expand(2, 3, 3, index.shape[-1])
        for bi, hi, row in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(3)).tolist():
            cols = index[bi, hi, row, : count[bi, hi, row]]
            listed[bi, hi, row, cols] = True
            if kind == "full":
                full[bi, hi, row, cols] = True
    assert not (any_ & ~listed).any(), "a block with a visible entry is skipped"
    assert not (full & ~all_).any(), "a block marked full has a masked entry"
    if term in ("causal_bottom_right", "window_two_sided", "everything"):
        assert listed.sum() < listed.numel(), "the band skipped no block"


def test_block_mask_is_built_once_per_mask_tensor_and_version(uncompiled):
    q, k, v, spec = make_inputs(LAYOUTS["gqa"], "key_padding", fill=Fill.NEG_INF)
    mask_mod = flex.mask_mod_of(spec)
    first, second = flex.block_mask(spec, mask_mod), flex.block_mask(spec, flex.mask_mod_of(spec))
    assert first.kv_indices is second.kv_indices and first.mask_mod is not second.mask_mod
    spec.key_padding[1] = False  # in place: the next call must see it
    third = flex.block_mask(spec, mask_mod)
    assert third.kv_indices is not first.kv_indices
    check_forward(q, k, v, spec, TOL[torch.float32])


def test_compiled_cpu_kernel_through_the_public_op():
    """The compiled CPU kernel (one compilation) by name, empty rows included."""
    q, k, v, spec = make_inputs((2, 2, 1, 96, 96), "key_lengths", fill=Fill.FINITE)
    lengths = torch.tensor([50, 0])
    out = attnopt.attention(q, k, v, key_padding_mask=lengths, causal=True, fill="finite", kernel="flex")
    spec = spec.with_(key_padding=lengths, causal=True)
    assert_close("compiled cpu", out, naive_attention(q, k, v, spec), TOL[torch.float32])
    assert_close("compiled cpu vs reference", out, reference.ReferenceKernel().forward(q, k, v, spec, 0)[0],
                 TOL[torch.float32])


def test_declared_support():
    """What flex refuses, each with its reason; and on the CPU the planner takes it only by name."""
    kernel = flex.registry.get("flex")
    q, k, v, spec = make_inputs(LAYOUTS["gqa"], "causal")
    assert kernel.not_supported_reasons(spec) == []
    refused = {
        "backward": spec.with_(requires_grad=True),
        "float64": spec.with_(dtype=torch.float64),
        "head_dim": spec.with_(head_dim=8),
        "dropout": spec.with_(dropout_p=0.1),
        "float64 bias": spec.with_(bias=torch.zeros(1, dtype=torch.float64)),
        "meta": spec.with_(device=torch.device("meta")),
    }
    for what, bad in refused.items():
        reasons = kernel.not_supported_reasons(bad)
        assert reasons and all(isinstance(r, str) and r for r in reasons), what
    assert plan.choose(spec, tune=False).kernel != "flex"
    forced = plan.choose(spec, forced="flex", tune=False)
    assert forced.kernel == "flex"
    with pytest.raises(NoKernelError, match="no backward on the CPU"):
        plan.choose(spec.with_(requires_grad=True), forced="flex", tune=False)
    # a first call compiles for seconds: the estimate says so, and is above the banded reference's
    big = spec.with_(q_len=2048, kv_len=2048, window=Window(127, 0))
    assert kernel.cost(big) > flex.CPU_COMPILE_SECONDS > reference.ReferenceKernel().cost(big)


def test_memory_estimate_counts_the_block_map():
    q = torch.empty(1, 8, 8192, 64, device="meta")
    plain = AttentionSpec.from_tensors(q, q, q).with_(device=torch.device("cuda"))
    padded = plain.with_(key_padding=torch.empty(1, 8192, dtype=torch.bool, device="meta"))
    kernel = flex.registry.get("flex")
    assert 0 < kernel.memory_bytes(plain) < kernel.memory_bytes(padded) < kernel.memory_bytes(
        padded.with_(requires_grad=True))
    assert kernel.memory_bytes(padded) < 8192 * 8192  # a tile map, not a score matrix


# ------------------------------------------------------------------------------------ GPU
GPU_LAYOUTS = {"gqa": (2, 8, 2, 1000, 1000), "decode": (4, 8, 2, 1, 3000), "cross": (2, 4, 4, 200, 700)}
#: (term, layout, dtype): every term in bfloat16, the other dtypes and layouts on a few
GPU_CASES = [(t, "gqa", torch.bfloat16) for t in TERMS] + [
    (t, layout, dt) for t in ("causal", "key_padding", "everything") for layout, dt in
    (("gqa", torch.float16), ("gqa", torch.float32), ("decode", torch.bfloat16), ("cross", torch.bfloat16))]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("term,layout,dtype", GPU_CASES, ids=str)
def test_gpu_every_term(term, layout, dtype):
    q, k, v, spec = make_inputs(GPU_LAYOUTS[layout], term, dtype=dtype, fill=Fill.FINITE, device="cuda", d=64)
    kernel = flex.registry.get("flex")
    assert kernel.not_supported_reasons(spec) == []
    out, lse = kernel.forward(q, k, v, spec, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, naive_attention(q, k, v, spec), TOL[dtype])
    assert_close("out vs reference", out, reference.ReferenceKernel().forward(q, k, v, spec, 0)[0], TOL[dtype])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("term", ["key_lengths", "documents", "everything", "mask_finfo_min"])
def test_gpu_gradients_and_empty_rows(term):
    """Forward and backward for every fill against autograd through the float64 oracle; batch 1 sees no key."""
    for fill in Fill:
        if fill == Fill.FINITE_REPLACED_ADDED and term != "key_lengths":  # a band and key padding only
            continue
        q, k, v, spec = make_inputs(GPU_LAYOUTS["cross"], term, dtype=torch.float32, fill=fill, device="cuda", d=64)
        kp = torch.ones(2, spec.kv_len, dtype=torch.bool, device="cuda") if spec.key_padding is None else spec.key_padding
        kp = kp.clone()
        kp[1] = 0 if kp.dtype != torch.bool else False
        spec = spec.with_(key_padding=kp)
        kernel = flex.registry.get("flex")
        grad_out = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda")
        out, lse = kernel.forward(q, k, v, spec, 0)
        grads = kernel.backward(grad_out, q, k, v, out, lse, spec, 0, False, False)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        oracle = naive_attention(*leaves, spec)
        assert_close(f"out {fill}", out, oracle, 1e-4)
        want = torch.autograd.grad(oracle, leaves, grad_out.double())
        for name, got, ref in zip(("dq", "dk", "dv"), grads[:3], want):
            assert_close(f"{name} {fill}", got, ref, 5e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_half_training_and_bias_gradient(dtype):
    """Half precision training through the public op; an additive bias's gradient (the reference's backward)."""
    q, k, v, spec = make_inputs(GPU_LAYOUTS["gqa"], "alibi_float32", dtype=dtype, device="cuda", d=64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias = spec.bias.clone().requires_grad_()
    out = attnopt.attention(*leaves, bias=bias, kernel="flex")
    out.float().square().sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_bias = bias.detach().double().requires_grad_()
    ref = naive_attention(*ref_leaves, spec.with_(bias=ref_bias))
    ref.square().sum().backward()
    assert_close("out", out, ref, TOL[dtype])
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), leaves + [bias], ref_leaves + [ref_bias]):
        assert_close(name, got.grad, want.grad, TOL[dtype] * 8)


@pytest.mark.gpu
@needs_cuda
def test_gpu_planner_offers_flex():
    q = torch.empty(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    spec = AttentionSpec.from_tensors(q, q[:, :4], q[:, :4], causal=True, window=Window(511, 0))
    found = {c.kernel: c for c in plan.candidates(spec, tune=False)}
    assert found["flex"].supported, found["flex"].reasons
