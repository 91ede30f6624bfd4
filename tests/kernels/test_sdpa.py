"""PyTorch SDPA as attnopt kernels: exact where they claim to be, honest reasons where not."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnopt.kernels import AttentionSpec, Fill, Window, get
from attnopt.kernels.spec import Align
from attnopt.kernels.approx_base import recompute_grads
from attnopt.kernels.naive import naive_attention


def _qkv(device="cpu", dtype=torch.float32, hkv=2, nq=64, nk=64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 32, generator=g).to(device, dtype)
    k, v = (torch.randn(2, hkv, nk, 32, generator=g).to(device, dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


TERMS = {
    "none": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": Window(8, 0)},
    "bias": {"bias": torch.randn(1, 4, 64, 64)},
    "key_padding_safe": {"key_padding": torch.tensor([64, 10]), "fill": Fill.SAFE},
}


@pytest.mark.parametrize("term", list(TERMS))
def test_cpu_matches_reference_forward_and_backward(term):
    q, k, v = _qkv(requires_grad=True)
    spec = AttentionSpec.from_tensors(q.detach(), k.detach(), v.detach(), **TERMS[term])
    kernel = get("sdpa_cpu")
    assert kernel.not_supported_reasons(spec) == []
    reference = get("reference")
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    ref, ref_lse = reference.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    grads = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    want = reference.backward(g, q.detach(), k.detach(), v.detach(), ref, ref_lse, spec, 0, False, False)
    for got, ref_grad in zip(grads[:3], want[:3]):
        torch.testing.assert_close(got, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("term", list(TERMS))
def test_cpu_backward_from_the_saved_forward(term, dtype, monkeypatch):
    """Boolean terms only (none, causal, a window, key padding with a batch row that sees no key): ATen's CPU
    backward runs from the forward's output and log-sum-exp, without a second forward, GQA 4/2, against
    float64 autograd of the original's math. Additive terms keep the recomputation."""
    from attnopt.kernels import sdpa

    recomputed = []
    recompute = sdpa.recompute_grads
    monkeypatch.setattr(sdpa, "recompute_grads", lambda *a, **kw: recomputed.append(1) or recompute(*a, **kw))
    q, k, v = _qkv(dtype=dtype)
    spec = AttentionSpec.from_tensors(q, k, v, **TERMS[term], requires_grad=True)
    kernel = get("sdpa_cpu")
    out, lse = kernel.forward(q, k, v, spec, 0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    assert bool(recomputed) == (term == "bias")
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    spec64 = spec.with_(dtype=torch.float64, bias=None if spec.bias is None else spec.bias.double())
    want = torch.autograd.grad(naive_attention(*leaves, spec64), leaves, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, x, ref in zip("qkv", got, want):
        assert x.shape == ref.shape and x.dtype == dtype, name
        torch.testing.assert_close(x.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@settings(max_examples=60, deadline=None)
@given(nq=st.integers(1, 40), nk=st.integers(1, 40), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([8, 16]),
       causal=st.booleans(), bottom_right=st.booleans(), window=st.none() | st.integers(0, 12),
       padding=st.sampled_from(["none", "random", "one_row_without_keys"]), documents=st.booleans(),
       bool_mask=st.booleans(), fill=st.sampled_from(list(Fill)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_cpu_backward_over_shapes_and_terms(nq, nk, group, d, causal, bottom_right, window, padding, documents,
                                            bool_mask, fill, dtype, seed):
    """Any lengths, GQA group, band, alignment, boolean term and fill: ``sdpa_cpu``'s output and gradients
    (from the saved forward) equal the float64 reference kernel's, rows without keys included."""
    g = torch.Generator().manual_seed(seed)
    b = 2
    q = torch.randn(b, 2 * group, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, 2, nk, d, generator=g).to(dtype) for _ in range(2))
    terms = {"causal": causal, "align": Align.BOTTOM_RIGHT if bottom_right else Align.TOP_LEFT}
    if window is not None:
        terms["window"] = Window(window, 0 if causal else window)
    if padding != "none":
        keep = torch.rand(b, nk, generator=g) > 0.3
        if padding == "one_row_without_keys":
            keep[1] = False
        terms["key_padding"] = keep
    if documents:
        terms["q_doc"] = torch.sort(torch.randint(0, 3, (b, nq), generator=g)).values
        terms["kv_doc"] = torch.sort(torch.randint(0, 3, (b, nk), generator=g)).values
    if bool_mask:
        terms["mask"] = torch.rand(1, 1, nq, nk, generator=g) > 0.2
    # this fill comes with a band and key padding only (fills.py): the detection never makes it otherwise
    assume(not (fill == Fill.FINITE_REPLACED_ADDED and (documents or bool_mask)))
    spec = AttentionSpec.from_tensors(q, k, v, **terms, fill=fill, requires_grad=True)
    kernel = get("sdpa_cpu")
    assume(not kernel.not_supported_reasons(spec))
    out, lse = kernel.forward(q, k, v, spec, 0)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    spec64 = spec.with_(dtype=torch.float64)
    ref, ref_lse = get("reference").forward(q64, k64, v64, spec64, 0)
    want = get("reference").backward(grad.double(), q64, k64, v64, ref, ref_lse, spec64, 0, False, False)[:3]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.isnan(out).equal(torch.isnan(ref)), "NaN rows differ"
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=0, equal_nan=True)
    for name, x, w in zip("qkv", got, want):
        assert x.shape == w.shape and x.dtype == dtype, name
        scale = max(1.0, w.nan_to_num(0).abs().max().item())
        torch.testing.assert_close(x.double(), w, atol=tol * scale, rtol=0, equal_nan=True)


def _left_padded(batch: int, n: int, device="cpu") -> torch.Tensor:
    """Bool keep ``[B, N]``: row 0 unpadded, row 1 with its first 3/4 padded, further rows random."""
    keep = torch.ones(batch, n, dtype=torch.bool, device=device)
    keep[1, : 3 * n // 4] = False
    return keep


ROWS_WITHOUT_KEYS = {
    "lengths": {"key_padding": torch.tensor([64, 0])},  # the second batch row sees no key at all
    "left_padding_causal": {"key_padding": _left_padded(2, 64), "causal": True},  # its first rows see none
    "window_padding": {"key_padding": _left_padded(2, 64), "causal": True, "window": Window(4, 0)},
}


def _check_rows_without_keys(name: str, case: str, fill: Fill, device: str, dtype: torch.dtype, tol: float,
                             train: bool = True):
    q, k, v = _qkv(device, dtype)
    terms = {t: (x.to(device) if isinstance(x, torch.Tensor) else x) for t, x in ROWS_WITHOUT_KEYS[case].items()}
    spec = AttentionSpec.from_tensors(q, k, v, **terms, fill=fill, requires_grad=train)
    kernel = get(name)
    assert kernel.not_supported_reasons(spec) == []
    # the oracle: the reference kernel in float64 (its fills are checked against eager in test_reference.py)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    spec64 = spec.with_(dtype=torch.float64)
    ref, ref_lse = get("reference").forward(q64, k64, v64, spec64, 0)
    out, lse = kernel.forward(q, k, v, spec, 0)
    assert torch.isnan(out).equal(torch.isnan(ref)), "NaN rows differ"
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, equal_nan=True)
    assert torch.isneginf(lse).equal(torch.isneginf(ref_lse))
    if not train:
        return
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = kernel.backward(g, q, k, v, out, lse, spec, 0, False, False)
    want = get("reference").backward(g.double(), q64, k64, v64, ref, ref_lse, spec64, 0, False, False)
    for got, ref_grad in zip(grads[:3], want[:3]):
        torch.testing.assert_close(got.double(), ref_grad, atol=3 * tol, rtol=3 * tol, equal_nan=True)


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("case", list(ROWS_WITHOUT_KEYS))
def test_rows_without_keys(case, fill):
    """Rows the boolean terms leave no key in: NaN, 0 or the uniform average, and their gradients."""
    _check_rows_without_keys("sdpa_cpu", case, fill, "cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("case", list(ROWS_WITHOUT_KEYS))
def test_cuda_rows_without_keys(case, fill):
    for name in ("sdpa_efficient", "sdpa_cudnn"):
        _check_rows_without_keys(name, case, fill, "cuda", torch.bfloat16, 3e-2)


def test_reasons():
    q, k, v = _qkv()
    cpu = get("sdpa_cpu")
    assert any("softcap" in r for r in cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, softcap=20.0)))
    padded = AttentionSpec.from_tensors(q, k, v, key_padding=torch.tensor([64, 0]))
    for fill in Fill:  # rows with no visible key are given the original's values (test_rows_without_keys)
        assert cpu.not_supported_reasons(padded.with_(fill=fill)) == []
    # top-left causal with Nq <= Nk never empties a row: exact under any fill
    assert cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, causal=True)) == []
    assert any("dropout" in r for r in cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, dropout_p=0.1)))
    # ATen's CPU backward differs from autograd of the original on rows an added finfo.min fills entirely
    trained = AttentionSpec.from_tensors(q, k, v, bias=torch.randn(1, 4, 64, 64), requires_grad=True)
    assert any("gradients through an additive mask" in r for r in cpu.not_supported_reasons(trained))
    assert any("cuda" in r for r in get("sdpa_flash").not_supported_reasons(AttentionSpec.from_tensors(q, k, v)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("term", ["none", "causal", "bias"])
def test_cuda_backends(name, term):
    q, k, v = _qkv("cuda", torch.bfloat16, requires_grad=True)
    terms = {t: (x.cuda().bfloat16() if isinstance(x, torch.Tensor) else x) for t, x in TERMS[term].items()}
    spec = AttentionSpec.from_tensors(q, k, v, **terms)
    kernel = get(name)
    # the kernel's backward is checked directly, also where the planner keeps cuDNN out of training
    reasons = [r for r in kernel.not_supported_reasons(spec) if not r.startswith("training: cuDNN")]
    if reasons:
        # a half bias is one the original added in half precision: SDPA adds it in float32
        assert term == "bias" and (name in ("sdpa_flash", "sdpa_cudnn") or any("precision" in r for r in reasons)), reasons
        return
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    ref, ref_lse = get("reference").forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(out)
    grads = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    want = get("reference").backward(g, q.detach(), k.detach(), v.detach(), ref, ref_lse, spec, 0, False, False)
    for got, ref_grad in zip(grads[:3], want[:3]):
        torch.testing.assert_close(got.float(), ref_grad.float(), atol=6e-2, rtol=6e-2)


def test_a_mask_broadcast_over_keys_reaches_cuda_backends_at_full_key_length():
    """A query-only term (``[.., Nq, 1]``) is handed to the CUDA backends with its key dim in memory, never as a
    broadcast dim; the CPU kernel and masks already at full length are passed as they are."""
    from attnopt.kernels.sdpa import with_key_dim

    rows = torch.zeros(2, 1, 5, 1)
    rows[:, :, 3] = float("-inf")
    full = with_key_dim(rows, 7, cuda=True)
    assert full.shape == (2, 1, 5, 7) and full.is_contiguous() and full.stride()[-1] == 1
    assert torch.equal(full, rows.expand(2, 1, 5, 7))
    assert with_key_dim(rows, 7, cuda=False) is rows
    keys = torch.zeros(2, 1, 1, 7)
    assert with_key_dim(keys, 7, cuda=True) is keys  # batch, head and query dims stay broadcast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sdpa_efficient", "sdpa_cudnn"])
def test_cuda_backends_take_a_query_only_mask(name):
    """A bool term on the query index alone, ``[1, 1, Nq, 1]`` (a row with no key among them), at BERT's
    shapes (B 32, 12 heads, 512 rows, D 64): against the reference kernel, forward and backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(32, 12, 512, 64, generator=g).cuda().bfloat16() for _ in range(3))
    rows = torch.ones(1, 1, 512, 1, dtype=torch.bool, device="cuda")
    rows[..., 5, :] = False
    spec = AttentionSpec.from_tensors(q, k, v, mask=rows, fill=Fill.FINITE)
    kernel = get(name)
    assert not kernel.not_supported_reasons(spec), kernel.not_supported_reasons(spec)
    out, lse = kernel.forward(q, k, v, spec, 0)
    ref, ref_lse = get("reference").forward(q, k, v, spec, 0)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    grad = torch.randn(out.shape, generator=g).cuda().bfloat16()
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    want = get("reference").backward(grad, q, k, v, ref, ref_lse, spec, 0, False, False)[:3]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("nq,terms,hides_nothing,masked", [
    (1, {"causal": True, "align": "bottom_right"}, True, False),  # a decode step sees the whole cache
    (1, {"causal": True, "align": "bottom_right", "window": Window(40, 0)}, False, True),  # a shorter window
    (1, {"causal": True, "align": "bottom_right", "window": Window(63, 0)}, True, False),
    (2, {"causal": True, "align": "bottom_right"}, False, True),  # the first of two rows misses the last key
    (1, {"causal": True}, False, False),  # top-left: row 0 sees key 0 only, SDPA's is_causal
])
def test_a_band_that_hides_nothing_needs_no_mask(device, nq, terms, hides_nothing, masked):
    """Bottom-right causal over one query row masks nothing: SDPA runs it with no mask and no is_causal
    (on CUDA the mask-less flash backend takes it), and the output is still the reference's."""
    from attnopt.kernels.sdpa import needs_mask
    from attnopt.kernels.spec import Align

    terms = {**terms, "align": Align(terms.get("align", "top_left"))}
    q, k, v = _qkv(device, torch.float32 if device == "cpu" else torch.float16, nq=nq)
    spec = AttentionSpec.from_tensors(q, k, v, **terms)
    assert spec.band_hides_nothing() == hides_nothing
    assert needs_mask(spec) == masked
    expected = get("reference").forward(q.double(), k.double(), v.double(), spec.with_(dtype=torch.float64), 0)[0]
    names = ["sdpa_cpu"] if device == "cpu" else ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]
    for name in names:
        kernel = get(name)
        if kernel.not_supported_reasons(spec):
            # flash takes no mask, and SDPA's is_causal only for equal lengths
            assert name == "sdpa_flash" and (masked or spec.q_len != spec.kv_len), \
                kernel.not_supported_reasons(spec)
            continue
        for out in (kernel.forward(q, k, v, spec, 0)[0], kernel.infer(q, k, v, spec)):
            torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


def test_cudnn_gets_the_output_gradient_in_the_outputs_strides():
    """cuDNN's backward gave wrong gradients for a gradient in other strides than the output (H200, torch
    2.11): its recomputation hands autograd a copy in the output's strides; the other backends take it as
    it comes. cuDNN then serves training calls too."""
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(g.stride())
            return g

    def attend(q, k, v, spec):  # an output in HF's layout: a transposed view of [B, N, H, D]
        return Spy.apply(q.transpose(1, 2).contiguous()).transpose(1, 2)

    q, k, v = _qkv()
    spec = AttentionSpec.from_tensors(q, k, v, requires_grad=True)
    grad = torch.randn(q.shape)  # contiguous: other strides than the output's
    for like_out in (False, True):
        dq = recompute_grads(attend, grad, q, k, v, spec, False, False, grad_like_out=like_out)[0]
        torch.testing.assert_close(dq, grad)
    # inside the transposed view: the gradient as given, then one in the output's (BNHD-contiguous) strides
    assert seen == [grad.transpose(1, 2).stride(), q.transpose(1, 2).contiguous().stride()]
    trained = AttentionSpec.from_tensors(*(t.bfloat16() for t in (q, k, v)), causal=True, requires_grad=True)
    assert not any(r.startswith("training") for r in get("sdpa_cudnn").not_supported_reasons(trained))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "triton_flash", "sdpa_cudnn"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 8)])
@pytest.mark.parametrize("grad_layout", ["bnhd", "contiguous"])
@pytest.mark.parametrize("out_layout", ["kernel", "dense"])
def test_training_gradients_of_hf_layouts(name, heads, grad_layout, out_layout):
    """The layouts of a Hugging Face attention layer: q, k, v transposed views of ``[B, N, H, D]`` projections,
    the output's gradient a transposed view too or contiguous (where cuDNN's backward, given it as it came,
    was wrong), the saved output as the kernel made it or dense (as the op saves it); D 128, N 1024, causal,
    bf16, against float64."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(1)
    b, n, d = 2, 1024, 128
    q, k, v = (torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
               for h in (hq, hkv, hkv))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, requires_grad=True)
    kernel = get(name)
    out, lse = kernel.forward(q, k, v, spec, 0)
    if out_layout == "dense":
        out = out.contiguous()
    grad = torch.randn(b, n, hq, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    if grad_layout == "contiguous":
        grad = grad.contiguous()
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(naive_attention(*leaves, spec), leaves, grad.double())
    for name_, x, ref in zip("qkv", got, want):
        err = (x.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"d{name_}: largest error {err:.3g} of the largest gradient"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_mask_probe_is_asked_on_the_gpu_whatever_the_spec(monkeypatch):
    """Whether cuDNN takes a mask is asked once per process: a CPU spec asked first (as a test or a plan for
    another device does) must not record a refusal that every later CUDA call inherits."""
    from attnopt.kernels import sdpa

    monkeypatch.setattr(sdpa, "_MASK_PROBES", {})
    cudnn = get("sdpa_cudnn")
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        q, k, v = _qkv(device, dtype)
        spec = AttentionSpec.from_tensors(q, k, v, key_padding=_left_padded(2, 64, device), fill=Fill.SAFE)
        reasons = cudnn.not_supported_reasons(spec)
    assert reasons == [], reasons
    assert sdpa._MASK_PROBES == {"sdpa_cudnn": ""}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sdpa_cudnn", "sdpa_flash"])
@pytest.mark.parametrize("heads,d,nq,nk,causal", [((8, 2), 128, 512, 512, True), ((4, 4), 64, 384, 384, True),
                                                  ((8, 2), 64, 200, 700, False), ((6, 3), 128, 1, 300, False),
                                                  ((4, 1), 128, 300, 300, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backward_reads_the_saved_forward(name, heads, d, nq, nk, causal, dtype, monkeypatch):
    """cuDNN and flash on a call without mask: the forward's log-sum-exp is the float64 one (natural log),
    and the backward runs ATen's backward from the saved output, never a second forward; outputs and
    gradients against float64."""
    from attnopt.kernels import sdpa

    def no_recompute(*args, **kwargs):
        raise AssertionError("the backward recomputed the forward")

    monkeypatch.setattr(sdpa, "recompute_grads", no_recompute)
    hq, hkv = heads
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, nq, hq, d, generator=g).to("cuda", dtype).transpose(1, 2)
    k, v = (torch.randn(2, nk, hkv, d, generator=g).to("cuda", dtype).transpose(1, 2) for _ in range(2))
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal, requires_grad=True)
    kernel = get(name)
    assert kernel.not_supported_reasons(spec) == []
    out, lse = kernel.forward(q, k, v, spec, 0)
    grad = torch.randn(out.shape, generator=g).to("cuda", dtype)
    got = kernel.backward(grad, q, k, v, out.contiguous(), lse.contiguous(), spec, 0, False, False)[:3]
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = naive_attention(*leaves, spec)
    want_grads = torch.autograd.grad(want, leaves, grad.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-2, rtol=2e-2)
    kk = leaves[1].detach().repeat_interleave(hq // hkv, dim=1)
    scores = (leaves[0].detach() @ kk.transpose(-1, -2)) * spec.scale
    if causal:
        scores = scores.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=2e-2, rtol=1e-3)
    for name_, x, ref in zip("qkv", got, want_grads):
        assert x.shape == ref.shape and x.dtype == dtype, name_
        err = (x.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"d{name_}: largest error {err:.3g} of the largest gradient"


DROPOUT_CASES = {
    "none": lambda b, nk: {},
    "causal": lambda b, nk: {"causal": True},
    "key_padding": lambda b, nk: {"key_padding": torch.tensor([nk, nk // 3], device="cuda"), "fill": Fill.FINITE_ADDED},
    "documents": lambda b, nk: {"q_doc": (torch.arange(nk, device="cuda") * 3 // nk).expand(b, nk).contiguous(),
                                "kv_doc": (torch.arange(nk, device="cuda") * 3 // nk).expand(b, nk).contiguous()},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_cuda_dropout_is_sdpas_own_and_the_backward_regenerates_it(name, case, heads, monkeypatch):
    """With dropout, a CUDA backend's forward is SDPA's own call with the same mask under the call's seed
    (``torch.cuda.manual_seed(seed)`` before ``F.scaled_dot_product_attention``), bit for bit, and its
    backward (from the saved forward, or recomputed when that state is gone) is SDPA's autograd of that
    call: the same dropout mask in both passes. The user's CUDA random state is left as it was."""
    from torch.nn.attention import sdpa_kernel

    from attnopt.kernels import sdpa

    hq, hkv = heads
    b, n, d, p = 2, 192, 64, 0.3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, n, hq, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, n, hkv, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    spec = AttentionSpec.from_tensors(q, k, v, dropout_p=p, requires_grad=True, **DROPOUT_CASES[case](b, n))
    kernel = get(name)
    if kernel.not_supported_reasons(spec):
        reasons = " ".join(kernel.not_supported_reasons(spec))
        assert name == "sdpa_flash" and case in ("key_padding", "documents"), reasons
        return
    seed = 123456789
    before = torch.cuda.get_rng_state()
    out, lse = kernel.forward(q, k, v, spec, seed)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    grad = torch.randn(out.shape, generator=g).to("cuda", torch.bfloat16)

    backend = {"sdpa_cudnn": sdpa.SDPBackend.CUDNN_ATTENTION, "sdpa_flash": sdpa.SDPBackend.FLASH_ATTENTION,
               "sdpa_efficient": sdpa.SDPBackend.EFFICIENT_ATTENTION}[name]
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    kk, vv = leaves[1:]
    if hq != hkv:  # flash and memory-efficient are handed K/V repeated per query head (no enable_gqa)
        kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (kk, vv))
    torch.cuda.manual_seed(seed)
    with sdpa_kernel([backend]):
        want = torch.nn.functional.scaled_dot_product_attention(
            leaves[0], kk, vv, attn_mask=sdpa.sdpa_mask(spec), is_causal=sdpa._is_causal(spec), dropout_p=p,
            scale=spec.scale)
    want_grads = torch.autograd.grad(want, leaves, grad)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    without = kernel.forward(q, k, v, spec.with_(dropout_p=0.0), 0)[0]
    assert (out.float() - without.float()).abs().max() > 0.1  # the dropout took effect
    # the output's gradient contiguous (as SDPA's reference had it) and in the queries' layout (what an HF
    # layer's transpose hands back: the layout SDPA's own cuDNN dropout backward gets wrong on torch 2.11)
    grad_in_q_layout = grad.transpose(1, 2).contiguous().transpose(1, 2)
    for state, grad_ in (("saved", grad), ("recomputed", grad), ("saved", grad_in_q_layout),
                         ("recomputed", grad_in_q_layout)):
        msg = f"{state}, output gradient strides {grad_.stride()}"
        if state == "saved":
            kernel.forward(q, k, v, spec, seed)  # the state a recomputation dropped comes back with the forward
        else:
            sdpa._PHILOX.clear()
        got = kernel.backward(grad_, q, k, v, out, lse, spec, seed, False, False)[:3]
        for name_, x, ref in zip("qkv", got, want_grads):
            err = (x.float() - ref.float()).abs().max() / ref.float().abs().max()
            assert err < 1e-2, f"{msg}: d{name_} off by {err:.3g} of the largest gradient"
        # whatever SDPA's own autograd does: out is linear in v (out = P_dropped v), so sum(out * dO) equals
        # sum(v * dV) per batch row and head exactly when the backward dropped out what the forward did
        dv = got[2].float()
        lhs = (out.float() * grad.float()).sum((-1, -2)).unflatten(1, (hkv, hq // hkv)).sum(2)
        rhs = (v.float() * dv).sum((-1, -2))
        torch.testing.assert_close(lhs, rhs, atol=0.05 * lhs.abs().max().item(), rtol=0, msg=msg)

    # a training call through SDPA's own autograd (``autograd_forward``, what a site's training call with dropout
    # runs where the kernel has it): the same output bit for bit, the same gradients in both layouts, a backward of
    # torch's own nodes only
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    before = torch.cuda.get_rng_state()
    native = kernel.autograd_forward(*leaves, spec, seed)
    if native is None:
        assert case == "documents", "every backend takes its own autograd for a call without rows to fill"
        return
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert not isinstance(native.grad_fn, torch.autograd.function.BackwardCFunction), type(native.grad_fn)
    torch.testing.assert_close(native, out, atol=0, rtol=0)
    for grad_ in (grad, grad_in_q_layout):
        got = torch.autograd.grad(native, leaves, grad_, retain_graph=True)
        for name_, x, ref in zip("qkv", got, want_grads):
            err = (x.float() - ref.float()).abs().max() / ref.float().abs().max()
            assert err < 1e-2, f"own autograd, gradient strides {grad_.stride()}: d{name_} off by {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("case", ["key_padding", "documents", "window", "bool_mask"])
def test_cudnn_backward_from_the_saved_forward_with_a_mask(case, fill, monkeypatch):
    """cuDNN with a mask of boolean terms runs ATen's forward and backward pair (no recomputation): rows
    without keys (an all-padding batch row, a boolean mask row) are filled as the original fills them,
    with their gradients; outputs and gradients against float64."""
    from attnopt.kernels import sdpa

    def no_recompute(*args, **kwargs):
        raise AssertionError("the backward recomputed the forward")

    monkeypatch.setattr(sdpa, "recompute_grads", no_recompute)
    b, h, n, d = 2, 4, 256, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(2))
    ids = (torch.arange(n, device="cuda") * 4 // n).expand(b, n).contiguous()
    keep = torch.rand(1, h, n, n, generator=g).cuda() > 0.3
    keep[..., 7, :] = False
    terms = {"key_padding": {"key_padding": torch.tensor([n, 0], device="cuda")},
             "documents": {"q_doc": ids, "kv_doc": ids},
             "window": {"causal": True, "window": Window(40, 0)},
             "bool_mask": {"mask": keep}}[case]
    spec = AttentionSpec.from_tensors(q, k, v, fill=fill, requires_grad=True, **terms)
    if fill == Fill.FINITE_REPLACED_ADDED and case in ("documents", "bool_mask"):
        with pytest.raises(ValueError, match="band and key padding only"):
            spec.validate()  # GPT-2's fill is found with a band and key padding alone
        return
    kernel = get("sdpa_cudnn")
    assert kernel.not_supported_reasons(spec) == [], kernel.not_supported_reasons(spec)
    assert kernel._saves_lse(spec)
    out, lse = kernel.forward(q, k, v, spec, 0)
    grad = torch.randn(out.shape, generator=g).to("cuda", torch.bfloat16)
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = naive_attention(*leaves, spec)
    want_grads = torch.autograd.grad(want, leaves, grad.double())
    assert torch.isnan(out).equal(torch.isnan(want)), "NaN rows differ"
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-2, rtol=2e-2, equal_nan=True)
    for name_, x, ref in zip("qkv", got, want_grads):
        largest = ref.nan_to_num(0.0).abs().max()
        torch.testing.assert_close(x.double(), ref, atol=2e-2 * largest, rtol=0, equal_nan=True, msg=f"d{name_}")


def test_padding_that_leaves_every_row_a_key_costs_no_fill_per_call(monkeypatch):
    """Key padding that leaves every row a key (the usual padded batch) is found out once per padding tensor
    (on the CPU at once: it is a small computation there): the forward and the backward then fill, open and add
    nothing per call. A padding tensor changed in place is looked at again, and an all-padding row is filled."""
    from attnopt.kernels import sdpa

    q, k, v = _qkv()
    kernel = get("sdpa_cpu")
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[1, 40:] = False
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=Fill.FINITE_ADDED, requires_grad=True)
    ref, ref_lse = get("reference").forward(q, k, v, spec, 0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    want = get("reference").backward(grad, q, k, v, ref, ref_lse, spec, 0, False, False)[:3]

    def no_fill(*args, **kwargs):
        raise AssertionError("rows were filled although every row sees a key")

    with monkeypatch.context() as patched:
        patched.setattr(sdpa, "fill_empty_rows", no_fill)
        patched.setattr(sdpa, "empty_row_grads", no_fill)
        for _ in range(2):
            out, lse = kernel.forward(q, k, v, spec, 0)
            got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    keep[1] = False  # in place: the second batch row now sees no key, and gets the uniform average of v
    out, _ = kernel.forward(q, k, v, spec, 0)
    mean = v[1].mean(1, keepdim=True).repeat_interleave(2, dim=0)  # each kv head read by two query heads
    torch.testing.assert_close(out[1], mean.expand_as(out[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("term", ["none", "causal", "window", "key_padding", "a_row_without_keys", "bias_with_grad"])
def test_cpu_own_autograd_equals_the_kernels_forward_and_backward(term):
    """``autograd_forward`` on the CPU kernel: SDPA's own autograd, with the output and gradients of the kernel's
    forward and backward, GQA included; None where the call has rows to fill or a gradient into a term."""
    q, k, v = _qkv(dtype=torch.float64)
    terms = dict(TERMS.get(term, {}))
    if term in ("key_padding", "a_row_without_keys"):
        terms = {"key_padding": torch.tensor([64, 10]), "causal": True, "fill": Fill.FINITE_ADDED}
        if term == "a_row_without_keys":
            terms["window"] = Window(0, 0)
            terms["key_padding"] = torch.tensor([64, 0])
    if term == "bias_with_grad":
        terms = {"bias": torch.randn(1, 4, 64, 64, dtype=torch.float64, requires_grad=True)}
    spec = AttentionSpec.from_tensors(q, k, v, requires_grad=True, **terms)
    kernel = get("sdpa_cpu")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = kernel.autograd_forward(*leaves, spec, 0)
    if term in ("a_row_without_keys", "bias_with_grad"):
        assert out is None
        return
    assert not isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)
    want, lse = kernel.forward(q, k, v, spec, 0)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad)
    want_grads = kernel.backward(grad, q, k, v, want, lse, spec, 0, False, False)[:3]
    for name_, x, ref in zip("qkv", got, want_grads):
        torch.testing.assert_close(x, ref, atol=1e-10, rtol=1e-10, msg=name_)


_CUDA_PREPARED = [pytest.param(name, dtype, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")]) for name in ("sdpa_efficient", "sdpa_cudnn", "sdpa_flash")
    for dtype in (torch.bfloat16,)]


@pytest.mark.parametrize("name, dtype", [("sdpa_cpu", torch.float32), ("sdpa_cpu", torch.float64), *_CUDA_PREPARED])
@pytest.mark.parametrize("term", [*TERMS, "key_padding_filled", "documents"])
def test_prepared_call_is_the_kernels_inference_for_every_call_of_its_plan(name, dtype, term):
    """``prepare`` takes the spec's decisions once; each call of the plan (same shapes and terms, new term values)
    gives ``infer``'s output bit for bit (on the CPU ``forward``'s): its own mask (never the previous call's),
    rows without keys filled."""
    kernel = get(name)
    device = "cpu" if name == "sdpa_cpu" else "cuda"
    q, k, v = _qkv(device=device, dtype=dtype)

    def terms(call: int) -> dict:
        if term == "key_padding_filled":
            return {"key_padding": torch.tensor([64, [0, 5][call]]), "fill": Fill.FINITE_ADDED}
        if term == "documents":
            ids = torch.arange(64).expand(2, 64) * (call + 2) // 64
            return {"q_doc": ids, "kv_doc": ids.flip(-1).contiguous(), "fill": Fill.FINITE_ADDED}
        found = dict(TERMS[term])
        if "key_padding" in found:
            found["key_padding"] = torch.tensor([64, [10, 40][call]])
        if "bias" in found:
            found["bias"] = found["bias"].to(dtype) * (call + 1)
        return found

    def spec_of(call: int) -> AttentionSpec:
        found = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in terms(call).items()}
        return AttentionSpec.from_tensors(q, k, v, **found)

    first = spec_of(0)
    if kernel.not_supported_reasons(first):
        pytest.skip(f"{name} does not take this spec: {kernel.not_supported_reasons(first)}")
    run = kernel.prepare(first)
    for call in range(2):
        spec = spec_of(call)
        want = kernel.forward(q, k, v, spec, 0)[0] if device == "cpu" else kernel.infer(q, k, v, spec)
        torch.testing.assert_close(run(q, k, v, spec), want, atol=0, rtol=0, equal_nan=True, msg=f"call {call}")
        if device == "cuda":  # against float64 too: the prepared call is right, not only the same as infer
            spec64 = spec.with_(dtype=torch.float64, bias=None if spec.bias is None else spec.bias.double())
            ref = naive_attention(q.double(), k.double(), v.double(), spec64)
            torch.testing.assert_close(run(q, k, v, spec).double(), ref, atol=2e-2, rtol=2e-2, equal_nan=True)


def test_cudnn_training_with_dropout_counts_its_contiguous_output_copy():
    """A cuDNN training call with dropout returns a contiguous copy of its output beside the one SDPA's autograd
    keeps (``autograd_forward``): the memory model counts one output more, and only there."""
    q = torch.empty(2, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True, requires_grad=True).with_(device=torch.device("cuda"))
    lse = 4 * 2 * 4 * 64
    output = 2 * 4 * 64 * 64 * 2
    cudnn, efficient = get("sdpa_cudnn"), get("sdpa_efficient")
    assert cudnn.saved_bytes(spec) == lse == efficient.saved_bytes(spec)
    dropped = spec.with_(dropout_p=0.1)
    assert cudnn.saved_bytes(dropped) == lse + output
    assert efficient.saved_bytes(dropped) == lse


@pytest.mark.parametrize("order", ["padding_first", "mask_first"])
def test_one_tensor_as_padding_then_as_a_mask_gets_each_roles_mask(order):
    """One boolean tensor handed to two calls of equal shapes, as key padding ``[B, Nk]`` in one and as a mask
    ``[Nq, Nk]`` (Nq = B) in the other, at the same version: the term cache keys its masks by which terms are
    present too, so neither call gets the mask built for the other role (their additive masks differ: ``[B, 1, 1,
    Nk]`` against ``[1, 1, Nq, Nk]``). The prepared call and the forward, each right against float64."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (2, 40, 40))
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1, 5:30] = False
    as_padding = AttentionSpec.from_tensors(q, k, v, key_padding=keep)
    as_mask = AttentionSpec.from_tensors(q, k, v, mask=keep)
    calls = [as_padding, as_mask] if order == "padding_first" else [as_mask, as_padding]
    kernel = get("sdpa_cpu")
    for spec in calls + calls:
        want = naive_attention(q, k, v, spec)
        torch.testing.assert_close(kernel.prepare(spec)(q, k, v, spec).double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernel.forward(q, k, v, spec, 0)[0].double(), want, atol=1e-5, rtol=1e-5)
