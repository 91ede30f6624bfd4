"""The fills of rows with no visible key (``kernels/fills.py``): under dropout, and found once per padding tensor.

Finite fills under dropout: a row with no visible key is the original's uniform softmax, dropped out.

The original computes ``dropout(softmax(s + m)) @ v`` with a finite minimum ``m``: on a row where every
key is masked the softmax is uniform over the keys ``m`` reached, and dropout drops it out like any other
row. The kernels that take dropout (``reference``, ``triton_flash``) give such rows that function with
the multipliers ``fills._dropout_keep`` draws: these tests check the output and every gradient against
autograd through the original's arithmetic in float64 with the same multipliers, that the draws depend
on the seed only (not on the kernel's row chunks), and that forward and backward agree (gradcheck).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import fills, reference, registry
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

#: the kernels with dropout; triton_flash runs in Triton's interpreter on CPU (tests/conftest.py)
KERNELS = ["reference", "triton_flash"]
P = 0.3
SEED = 987654321


def _keep_all_rows(spec: AttentionSpec, seed: int) -> torch.Tensor:
    """``[B, Hq, Nq, Nk]`` dropout multipliers of every row, as the fills draw them."""
    heads = torch.arange(spec.q_heads, device=spec.device).repeat_interleave(spec.q_len)
    rows = torch.arange(spec.q_len, device=spec.device).repeat(spec.q_heads)
    return torch.stack([fills._dropout_keep(spec, seed, b, heads, rows, torch.float64)
                        .reshape(spec.q_heads, spec.q_len, spec.kv_len) for b in range(spec.batch)])


def _original(q, k, v, keep, band, fill: Fill, multipliers, scale):
    """The written model in float64: scores, the fill as the model wrote it, softmax, dropout (given
    multipliers), values. ``keep [B, Nk]``: key padding; ``band [Nq, Nk]`` or None."""
    low = torch.finfo(torch.float32).min
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    padding = ~keep[:, None, None, :]
    if fill == Fill.FINITE:
        s = s.masked_fill(padding, low)
    elif fill == Fill.FINITE_ADDED:
        s = s + padding.to(s.dtype) * low
    else:  # FINITE_REPLACED_ADDED: the band replaced, the padding added
        s = torch.where(band, s, torch.tensor(low, dtype=s.dtype)) + padding.to(s.dtype) * low
    return (s.softmax(-1) * multipliers) @ v.repeat_interleave(group, 1)


CASES = [(Fill.FINITE, False), (Fill.FINITE_ADDED, False), (Fill.FINITE_REPLACED_ADDED, True)]
#: ``fills.BATCH_ROWS_PER_BLOCK``'s rules, taken on the CPU: one batch row per block (the CPU's) and every batch
#: row with empty rows in one block (a GPU's), each batch row's empty rows padded to the block's count
BATCH_RULES = {"one_batch_row": 1, "all_batch_rows": None}


@pytest.fixture(params=list(BATCH_RULES))
def batch_rule(request, monkeypatch):
    """Runs a test under each of ``BATCH_RULES`` on the CPU."""
    monkeypatch.setattr(fills, "BATCH_ROWS_PER_BLOCK", {"cpu": BATCH_RULES[request.param]})
    return request.param


@pytest.mark.usefixtures("batch_rule")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fill,causal", CASES, ids=[f.value for f, _ in CASES])
def test_rows_without_keys_are_the_originals_dropped_out_uniform_row(kernel, fill, causal):
    """Every row empty (batch rows whose keys are all padded, or a causal band with left padding past it):
    the whole output is the fill, so it and all gradients equal the original's with the same dropout."""
    _check_rows_without_keys(kernel, fill, causal, "cpu", torch.float64 if kernel == "reference" else torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fill,causal", CASES, ids=[f.value for f, _ in CASES])
def test_rows_without_keys_on_cuda(kernel, fill, causal):
    _check_rows_without_keys(kernel, fill, causal, "cuda", torch.float32)


def _check_rows_without_keys(kernel: str, fill: Fill, causal: bool, device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 20 if device == "cpu" else 300, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype).to(device) for h in (hq, hkv, hkv))
    grad = torch.randn(b, hq, n, d, generator=g, dtype=dtype).to(device)
    # left padding past every row (causal): each row's band holds padded keys only
    keep = torch.zeros(b, n, dtype=torch.bool, device=device)
    band = torch.ones(n, n, dtype=torch.bool, device=device).tril() if causal else None
    spec = AttentionSpec.from_tensors(q, k, v, scale=0.25, causal=causal, key_padding=keep, dropout_p=P, fill=fill)
    chosen = registry.get(kernel)
    out, lse = chosen.forward(q, k, v, spec, SEED)
    got = chosen.backward(grad, q, k, v, out, lse, spec, SEED, False, False)[:3]

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _original(*leaves, keep, band, fill, _keep_all_rows(spec, SEED), spec.scale)
    expected = torch.autograd.grad(want, leaves, grad.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-5 if device == "cpu" else 1e-4  # TF32 products on a GPU
    torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=tol)
    for name, got_grad, want_grad in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(got_grad.double(), want_grad, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    if fill == Fill.FINITE:  # masked_fill's backward sends the replaced scores nothing
        assert got[0].abs().max() == 0 and got[1].abs().max() == 0
    else:
        assert got[0].abs().max() > 0, "the added fill passes a gradient to q"
    dropped = _keep_all_rows(spec, SEED) == 0
    assert 0.2 < dropped.double().mean() < 0.4, "about p of the uniform row is dropped"


@pytest.mark.usefixtures("batch_rule")
@pytest.mark.parametrize("fill", [Fill.FINITE, Fill.FINITE_ADDED])
def test_mixed_rows_pass_gradcheck_with_their_seed(fill):
    """Some batch rows see keys (the kernel's own dropout), one sees none (the fill's). With the seed fixed, the
    rows that see keys are a differentiable function whose gradient the backward gives (gradcheck); the empty
    batch row is the original's dropped-out uniform row, gradients included. (An added fill's row is constant
    in q and k up to rounding while the original's autograd, which the kernels follow, differentiates the
    addition as the identity: gradcheck cannot see that gradient, the float64 original does.)"""
    kernel = reference.ReferenceKernel()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(3, 6, generator=g) > 0.4
    keep[0, 0], keep[2, 0], keep[1] = True, True, False
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, dropout_p=P, fill=fill)

    class Fixed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = kernel.forward(q, k, v, spec, seed=SEED)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            return kernel.backward(grad_out, q, k, v, out, lse, spec, SEED, False, False)[:3]

    out = Fixed.apply(q, k, v)
    undropped = kernel.forward(q, k, v, spec.with_(dropout_p=0.0), seed=0)[0]
    assert not torch.allclose(out[1], undropped[1]), "the empty batch row is dropped out"
    seeing = [0, 2] if fill == Fill.FINITE_ADDED else [0, 1, 2]
    assert torch.autograd.gradcheck(lambda *t: Fixed.apply(*t)[seeing], (q, k, v))

    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad[[0, 2]] = 0.0  # the empty batch row's gradients only
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want = _original(*leaves, keep, None, fill, _keep_all_rows(spec, SEED), spec.scale)
    torch.testing.assert_close(out[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    for name, got_grad, want_grad in zip(("dq", "dk", "dv"), got, torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(got_grad[1], want_grad[1], atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_the_draws_depend_on_the_seed_and_index_only():
    """The forward may fill a chunk of rows at a time and the backward all rows at once: a row's multipliers
    must not depend on which rows were drawn with it. Other seeds draw other multipliers."""
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=torch.zeros(1, 10, dtype=torch.bool), dropout_p=P,
                                      fill=Fill.FINITE_ADDED)
    heads, rows = torch.tensor([0, 1, 1, 0]), torch.tensor([3, 3, 7, 9])
    together = fills._dropout_keep(spec, SEED, 0, heads, rows, torch.float32)
    one_by_one = torch.cat([fills._dropout_keep(spec, SEED, 0, heads[i:i + 1], rows[i:i + 1], torch.float32)
                            for i in range(4)])
    assert torch.equal(together, one_by_one)
    assert not torch.equal(together, fills._dropout_keep(spec, SEED + 1, 0, heads, rows, torch.float32))
    torch.testing.assert_close(together.unique(), torch.tensor([0.0, 1 / (1 - P)]))
    with pytest.raises(ValueError, match="dropout seed"):
        fills._dropout_keep(spec, 0, 0, heads, rows, torch.float32)


def _splitmix64_keep(index: int, seed: int, p: float) -> bool:
    """Whether the draw of flat (b, h, i, j) index ``index`` keeps its score: splitmix64 of ``index`` under
    ``seed``, in Python's unbounded integers (the fills compute it in wrapping int64)."""
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B97F4A7C15 + (seed & ((1 << 62) - 1))) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x & ((1 << 53) - 1)) / float(1 << 53) >= p


def test_the_draws_are_splitmix64_of_the_index_for_every_head_at_once():
    """The forward and the backward, whatever their blocks, must draw the same multipliers, and a change of the
    formula would silently change every dropped-out fill: the draws of a block of heads ``[Hkv, G, 1]`` and rows
    ``[r]`` are bit for bit splitmix64 of the flat (b, h, i, j) index of each."""
    q, k, v = torch.randn(2, 4, 5, 3), torch.randn(2, 2, 7, 3), torch.randn(2, 2, 7, 3)
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=torch.zeros(2, 7, dtype=torch.bool), dropout_p=P,
                                      fill=Fill.FINITE_ADDED)
    rows = torch.tensor([4, 0, 2])
    got = fills._dropout_keep(spec, SEED, 1, torch.arange(4).view(2, 2, 1), rows, torch.float64)  # [Hkv, G, r, Nk]
    want = torch.tensor([[[[_splitmix64_keep(((4 + 2 * kv + g) * 5 + i) * 7 + j, SEED, P) for j in range(7)]
                           for i in rows.tolist()] for g in range(2)] for kv in range(2)], dtype=torch.float64)
    assert torch.equal(got, want / (1 - P))


def test_reference_fills_row_chunks_like_one_chunk(monkeypatch):
    """The reference kernel fills each chunk of query rows with the chunk's offset: the same output as one chunk."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 24, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1] = False
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, dropout_p=P, fill=Fill.FINITE_ADDED)
    whole = reference.ReferenceKernel().forward(q, k, v, spec, SEED)[0]
    monkeypatch.setattr(reference, "chunk_sizes", lambda spec: (5, 8))
    chunked = reference.ReferenceKernel().forward(q, k, v, spec, SEED)[0]
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- rows without keys, found once
@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 9), lengths=st.booleans(),
       band=st.sampled_from(["none", "causal", "causal_bottom_right", "window"]), data=st.data())
def test_known_empty_rows_matches_the_materialized_terms(b, nq, nk, lengths, band, data):
    """The prefix-sum count of each row's kept keys agrees with the terms materialized, for key padding as a bool
    mask or as lengths (0 included), with or without a band."""
    if lengths:
        kp = torch.tensor(data.draw(st.lists(st.integers(0, nk), min_size=b, max_size=b)))
    else:
        kp = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=nk, max_size=nk), min_size=b,
                                             max_size=b)))
    terms = {"none": {}, "causal": {"causal": True},
             "causal_bottom_right": {"causal": True, "align": Align.BOTTOM_RIGHT},
             "window": {"window": Window(2, 1)}}[band]
    q, k = torch.randn(b, 1, nq, 4), torch.randn(b, 1, nk, 4)
    spec = AttentionSpec.from_tensors(q, k, k, key_padding=kp, **terms)
    keep, _ = spec.materialize()
    want = bool((~keep.expand(b, 1, nq, nk).any(-1)).any())
    assert fills._any_row_without_keys(spec) == want
    assert fills.known_empty_rows(spec) == want


def test_rows_without_keys_are_looked_for_once_per_padding_tensor(monkeypatch):
    """The layers of a forward and their backward share one padding tensor: one count (one host sync) for all;
    an in-place change of the padding counts again. With every row seeing a key the backward does not look at
    its rows at all (no sync per layer)."""
    counted = []
    count = fills._any_row_without_keys
    monkeypatch.setattr(fills, "_any_row_without_keys", lambda spec: counted.append(1) or count(spec))
    fills._EMPTY_ROWS.clear()
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :2] = False
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=Fill.FINITE_ADDED)
    assert fills.known_empty_rows(spec, find=False) is None  # a forward does not sync to find it
    assert not counted
    for _ in range(3):
        assert fills.known_empty_rows(spec) is False
    assert len(counted) == 1
    assert fills.known_empty_rows(spec, find=False) is False  # once found, the forwards take it too
    assert fills.empty_row_grads(q, k, v, torch.ones_like(q), None, spec) == (None,) * 5  # rows not read
    keep[1] = False  # a batch row all padding, written in place
    assert fills.known_empty_rows(spec) is True and len(counted) == 2
    causal = AttentionSpec.from_tensors(q, k, v, key_padding=torch.tensor([6, 6]), causal=True)
    assert fills.known_empty_rows(causal) is False
    # an additive term without -inf empties no row: the padding decides, found from the cached padding answer
    assert fills.known_empty_rows(spec.with_(bias=torch.full((1, 1, 6, 6), -1e4))) is True and len(counted) == 3
    holes = torch.zeros(1, 1, 6, 6).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    assert fills.known_empty_rows(spec.with_(bias=holes)) is None  # -inf in a term: its rows are looked at per call
    assert fills.known_empty_rows(spec.with_(mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))) is None
    grad_bias = torch.zeros(1, 1, 6, 6, requires_grad=True)
    assert fills.known_empty_rows(spec.with_(bias=grad_bias)) is None  # not kept: it would sync on every call


def test_an_additive_mask_without_minus_inf_leaves_every_row_a_key(monkeypatch):
    """A decode step's per-key float mask (0 / finfo.min, no padding term): no row can lose every key, found
    once per mask tensor; a mask with -inf is looked at per call; an in-place write is seen."""
    checked = []
    lowest = fills._lowest
    monkeypatch.setattr(fills, "_lowest", lambda t: checked.append(1) or lowest(t))
    fills._LOWEST.clear()
    q, k, v = (torch.randn(2, 2, 1, 4) for _ in range(3))
    k, v = (torch.randn(2, 2, 9, 4) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 9)
    mask[1, ..., :4] = torch.finfo(torch.float32).min
    spec = AttentionSpec.from_tensors(q, k, v, mask=mask, fill=Fill.FINITE_ADDED)
    for _ in range(3):
        assert fills.known_empty_rows(spec) is False
    assert len(checked) == 1
    mask[1] = float("-inf")  # written in place: looked at again, and now it may empty a row
    assert fills.known_empty_rows(spec) is None and len(checked) == 2
    causal = AttentionSpec.from_tensors(q, k, v, mask=torch.zeros(2, 1, 1, 9), causal=True, align=Align.BOTTOM_RIGHT)
    assert fills.known_empty_rows(causal) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_finite_additive_terms_that_overflow_together_may_empty_a_row(dtype):
    """A bias and a mask each of 0 / finfo.min: where both mask a key, their sum overflows to -inf, so a row whose
    every key both mask sees no key (softmax of -inf everywhere: NaN in the original), though neither term holds
    -inf. Such rows are looked at per call; terms whose lowest values add up to a finite number still prove every
    row a key."""
    low = torch.finfo(dtype).min
    q, k, v = (torch.randn(2, 2, 4, 8, dtype=dtype) for _ in range(3))
    bias = torch.zeros(4, 4, dtype=dtype)
    bias[0] = low  # query row 0 loses every key to the structure
    mask = torch.zeros(2, 1, 1, 4, dtype=dtype)
    mask[1] = low  # batch row 1 all padding
    spec = AttentionSpec.from_tensors(q, k, v, bias=bias, mask=mask, fill=Fill.NEG_INF)
    assert fills.known_empty_rows(spec) is None
    assert fills.known_empty_rows(spec.with_(mask=None)) is False  # one finite term alone empties no row
    half = torch.zeros_like(bias).fill_(low / 4)
    assert fills.known_empty_rows(spec.with_(bias=half, mask=mask / 4)) is False  # the sum stays finite
    if dtype == torch.float16:  # float32 arithmetic holds two of its minima: only the proof differs
        return
    # the kernels then fill the row the original gave NaN
    out = reference.ReferenceKernel().forward(q, k, v, spec, 0)[0]
    scores = q.float() @ k.float().transpose(-1, -2) * spec.scale + bias.float() + mask.float()
    assert bool(torch.isneginf(scores[1, :, 0]).all())
    assert out[1, :, 0].isnan().all() and not out[0].isnan().any() and not out[1, :, 1:].isnan().any()


# ----------------------------------------------------------------------------- many rows without keys, no dropout
def _written(q, k, v, keep, band, fill: Fill, scale: float, softcap: float | None, low: float):
    """The written model without dropout in float64: scores, an optional softcap, the fill as the model wrote it
    (``low``: the dtype's finite minimum), softmax, values."""
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    padding = ~keep[:, None, None, :]
    masked = padding if band is None else padding | ~band
    if fill == Fill.FINITE:
        s = s.masked_fill(masked, low)
    elif fill == Fill.FINITE_ADDED:  # one mask of the band and the padding, added (as HF builds it)
        s = s + masked.to(s.dtype) * low
    else:  # FINITE_REPLACED_ADDED: the band replaced, the padding added
        s = torch.where(band, s, torch.tensor(low, dtype=s.dtype)) + padding.to(s.dtype) * low
    return s.softmax(-1) @ v.repeat_interleave(group, 1)


@pytest.mark.parametrize("rule", list(BATCH_RULES))
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), groups=st.sampled_from([(2, 2), (4, 2), (3, 1), (4, 4)]), n=st.integers(2, 24),
       fill=st.sampled_from([Fill.FINITE, Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED]), softcap=st.booleans(),
       elements=st.sampled_from([1, 40, 100, 1 << 23]), data=st.data())
def test_rows_without_keys_give_the_written_models_gradients(rule, b, groups, n, fill, softcap, elements, data):
    """Left-padded batch rows under a causal band (or no band): the rows before their first kept key see none,
    and output and every gradient equal the written model's in float64, whichever way the fills compute them
    (the added fill's factored products, or row by row in blocks of any size: ``ROW_ELEMENTS`` of 1 takes one
    row of one key head at a time, 40 a row of some key heads, 100 a few rows of every head, 1 << 23 every
    empty row of a batch row at once), one batch row per block or several (``BATCH_RULES``)."""
    hq, hkv = groups
    causal = fill == Fill.FINITE_REPLACED_ADDED or data.draw(st.booleans(), label="causal")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    q, k, v = (torch.randn(b, h, n, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad = torch.randn(b, hq, n, 8, generator=g, dtype=torch.float64)
    pads = data.draw(st.lists(st.integers(0, n), min_size=b, max_size=b), label="left padding")
    keep = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]  # [B, Nk]
    cap = 5.0 if softcap and fill != Fill.FINITE_REPLACED_ADDED else None
    spec = AttentionSpec.from_tensors(q, k, v, scale=0.3, causal=causal, key_padding=keep, fill=fill, softcap=cap)
    kernel = reference.ReferenceKernel()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fills, "ROW_ELEMENTS", elements)
        patch.setattr(fills, "BATCH_ROWS_PER_BLOCK", {"cpu": BATCH_RULES[rule]})
        out, lse = kernel.forward(q, k, v, spec, 0)
        got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]

    band = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want = _written(*leaves, keep, band, fill, spec.scale, cap, torch.finfo(torch.float64).min)
    torch.testing.assert_close(out, want.detach(), atol=1e-10, rtol=1e-10)
    for name, got_grad, want_grad in zip(("dq", "dk", "dv"), got, torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The most elements of any tensor an op makes while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return result


@pytest.mark.usefixtures("batch_rule")
@pytest.mark.parametrize("fill,softcap", [(Fill.FINITE_ADDED, None), (Fill.FINITE_ADDED, 5.0),
                                          (Fill.FINITE_REPLACED_ADDED, None)])
def test_the_backward_of_rows_without_keys_makes_nothing_larger_than_the_inputs(fill, softcap, monkeypatch):
    """A left-padded batch row in training leaves thousands of rows without keys (at N 4096, 16 heads: 16k rows,
    whose keys gathered row by row were 32 GiB). The fills' backward makes no tensor larger than q, k, v or its
    bounded block of rows against the keys, however many rows are empty: with ``ROW_ELEMENTS`` at 4096, two rows
    of every head, where all empty rows at once would be 16x q's size."""
    b, hq, hkv, n, d = 2, 4, 2, 512, 8
    q, k, v = (torch.randn(b, h, n, d) for h in (hq, hkv, hkv))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, : n // 2] = False  # half of the second row's queries see no key under the causal band
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, fill=fill, softcap=softcap)
    empty = torch.zeros(b, hq, n, dtype=torch.bool)
    empty[1, :, : n // 2] = True
    monkeypatch.setattr(fills, "ROW_ELEMENTS", 1 << 12)
    with _Largest() as largest:
        dq, dk, dv, _, _ = fills.empty_row_grads(q, k, v, torch.randn(b, hq, n, d), empty, spec)
    assert dq.abs().amax() > 0 and dk.abs().amax() > 0
    assert largest.numel <= max(q.numel(), fills.ROW_ELEMENTS), largest.numel


# ----------------------------------------------------------------------------- the forward fill of many heads
@pytest.mark.parametrize("fill", [Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED])
def test_the_forward_fill_serves_a_key_heads_query_heads_in_the_outputs_layout(fill):
    """GQA 8/2, the output laid out as [B, N, H, D] (a kernel's output laid out like the queries): each empty row
    is its key head's mean of v (over the band and the kept keys, replaced then added), the others untouched, in
    the output's layout; the uniform fill is the mean and one ``where`` on grouped views, no copy of the mean per
    query head."""
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, n, d = 2, 8, 2, 16, 4
    q = torch.randn(b, hq, n, d, generator=g)
    k, v = (torch.randn(b, hkv, n, d, generator=g) for _ in range(2))
    keep = torch.arange(n)[None, :] >= torch.tensor([3, 7])[:, None]
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, fill=fill)
    empty = (~keep)[:, None, :].expand(b, hq, n)  # causal: the rows before the first kept key
    out = torch.randn(b, n, hq, d, generator=g).transpose(1, 2)
    fills.known_empty_rows(spec)  # found once per padding tensor, not per call: not counted
    with _Ops() as ops:
        filled = fills.fill_empty_rows(out, empty, v, spec)
    assert filled.stride() == out.stride()
    want = _written(q.double(), k.double(), v.double(), keep, torch.ones(n, n, dtype=torch.bool).tril(), fill,
                    spec.scale, None, torch.finfo(torch.float64).min)
    torch.testing.assert_close(filled, torch.where(empty[..., None], want.float(), out), atol=1e-6, rtol=0)
    if fill == Fill.FINITE_ADDED:
        assert ops.computed == ["aten.mean.dim", "aten.empty_like.default", "aten.where.self_out"]


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops dispatched while the mode is on: ``computed`` those that are not views."""

    def __init__(self):
        super().__init__()
        self.computed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.computed.append(str(func))
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- blocks of every head at once
def _rows_empty_in_some_heads(fill: Fill, dropout_p: float, softcap: float | None, bias_shape: tuple | None):
    """``(q, k, v, grad_out, empty, spec)`` in float64 where ``empty`` differs between heads: a boolean mask with a
    head dim hides every key of some (head, row) pairs (the replaced-then-added fill, made of a band and key
    padding, empties whole rows: there ``empty`` marks a different subset of them in each head)."""
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, n, d, dv = 2, 6, 3, 10, 4, 5
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv))
    v = torch.randn(b, hkv, n, dv, generator=g, dtype=torch.float64)
    grad_out = torch.randn(b, hq, n, dv, generator=g, dtype=torch.float64)
    some = torch.rand(b, hq, n, generator=g) < 0.5
    some[0, 1] = False  # a head with no empty row beside heads with some
    some[0, :, 7:], some[1, :, :2] = False, False  # batch rows with empty rows at other rows, and as many
    if fill == Fill.FINITE_REPLACED_ADDED:
        pads = torch.tensor([6, 3])
        terms = dict(causal=True, key_padding=torch.arange(n)[None, :] >= pads[:, None])
        empty = some & (torch.arange(n)[None, None, :] < pads[:, None, None])  # rows before the first kept key
    else:
        mask = torch.rand(b, hq, n, n, generator=g) > 0.3
        mask[..., 0] = True
        mask = mask & ~some[..., None]  # [B, Hq, Nq, Nk]: every key of the (head, row) pairs in ``some`` hidden
        terms = dict(mask=mask, softcap=softcap)
        if bias_shape is not None:
            terms["bias"] = torch.randn(*bias_shape, generator=g, dtype=torch.float64)
        empty = some
    assert (empty.any(1, keepdim=True) & ~empty).any(), "some row is empty in one head and not in another"
    spec = AttentionSpec.from_tensors(q, k, v, scale=0.4, dropout_p=dropout_p, fill=fill, **terms)
    return q, k, v, grad_out, empty, spec


def _uniform_rows_directly(q, k, v, bias, empty, spec: AttentionSpec, multipliers):
    """``[B, Hq, Nq, Dv]`` every row computed as the fill's uniform softmax (dropped out by ``multipliers``), with
    the gradient the original's autograd gives it: through the scores where a finite minimum was added to them,
    none where it replaced them. Only the rows ``empty`` marks are meant."""
    group = spec.group_size
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * spec.scale
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None:
        s = s + bias
    uniform = s - s.detach()  # 0 everywhere, the scores' gradient passed through
    if spec.fill == Fill.FINITE:
        uniform = uniform.detach()
    elif spec.fill == Fill.FINITE_REPLACED_ADDED:  # uniform over the band and the kept keys, the band's passing
        rel = torch.arange(spec.kv_len)[None, :] - torch.arange(spec.q_len)[:, None]
        kept = spec.key_padding[:, None, None, :]
        uniform = torch.where(rel <= 0, uniform, torch.where(kept, 0.0, float("-inf")))
    probs = uniform.softmax(-1) if multipliers is None else uniform.softmax(-1) * multipliers
    return torch.where(empty[..., None], probs @ v.repeat_interleave(group, 1), 0.0)


BLOCK_CASES = [(Fill.FINITE_ADDED, P, 5.0, (2, 6, 10, 10)), (Fill.FINITE_ADDED, 0.0, 5.0, (1, 6, 1, 10)),
               (Fill.FINITE_ADDED, 0.0, None, (10, 10)), (Fill.FINITE_ADDED, 0.0, None, None),
               (Fill.FINITE, P, None, None), (Fill.FINITE_REPLACED_ADDED, P, None, None),
               (Fill.FINITE_REPLACED_ADDED, 0.0, None, None)]


@pytest.mark.usefixtures("batch_rule")
@pytest.mark.parametrize("elements", [1, 1 << 23], ids=["one_row_of_one_key_head", "all_rows_of_every_head"])
@pytest.mark.parametrize("fill,dropout_p,softcap,bias_shape", BLOCK_CASES,
                         ids=[f"{f.value}-p{p}-cap{c}-bias{s}" for f, p, c, s in BLOCK_CASES])
def test_rows_empty_in_some_heads_only_take_their_own_gradients(fill, dropout_p, softcap, bias_shape, elements,
                                                                 monkeypatch):
    """The fills take every head of a batch row at once, in blocks of the rows empty in *any* head. A head whose
    row sees a key (``empty`` differs between heads under a mask with a head dim) must get nothing from that row:
    output and gradients (q, k, v, a bias of any broadcast shape) equal each empty (head, row)'s own uniform
    softmax differentiated by autograd in float64, the other rows untouched, in blocks of any size."""
    monkeypatch.setattr(fills, "ROW_ELEMENTS", elements)
    q, k, v, grad_out, empty, spec = _rows_empty_in_some_heads(fill, dropout_p, softcap, bias_shape)
    seed = SEED if dropout_p > 0 else 0
    multipliers = _keep_all_rows(spec, seed) if dropout_p > 0 else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias = spec.bias.clone().requires_grad_() if spec.bias is not None else None
    want = _uniform_rows_directly(*leaves, bias, empty, spec, multipliers)
    expected = torch.autograd.grad(want, leaves + ([bias] if bias is not None else []), grad_out,
                                   materialize_grads=True)  # a replaced fill's q and k: unused, 0

    got = fills.empty_row_grads(q, k, v, grad_out, empty, spec, needs_bias_grad=bias is not None, seed=seed)
    for name, got_grad, want_grad in zip(("dq", "dk", "dv", "dbias"), got, expected):
        if got_grad is None:  # a replaced fill sends the scores nothing
            assert fill == Fill.FINITE and name in ("dq", "dk") and want_grad.abs().max() == 0
            continue
        torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    assert got[2].abs().max() > 0
    if dropout_p > 0:  # the forward draws the same multipliers: each empty (head, row) its own, others kept
        out = torch.randn(grad_out.shape, dtype=torch.float64)
        filled = fills.fill_empty_rows(out, empty, v, spec, seed=seed)
        torch.testing.assert_close(filled, torch.where(empty[..., None], want.detach(), out), atol=1e-12, rtol=0)


def _ops_computed(fn) -> int:
    """The number of aten ops other than views that ``fn`` dispatches: on a GPU, about its kernel launches."""
    fn()  # known_empty_rows finds its answer once per padding tensor: not counted
    with _Ops() as ops:
        fn()
    return len(ops.computed)


ROW_WISE = [(Fill.FINITE_ADDED, 0.0, 5.0), (Fill.FINITE_ADDED, P, None), (Fill.FINITE, P, None),
            (Fill.FINITE_REPLACED_ADDED, 0.0, None), (Fill.FINITE_REPLACED_ADDED, P, None)]


def _row_wise_op_counts(fill: Fill, dropout_p: float, softcap: float | None, kv_heads: int,
                        pads: list[int]) -> tuple[int, int]:
    """Ops of the row-wise backward and of the dropped-out forward fill (0 without dropout) of a left-padded causal
    batch, batch row ``i`` padded by ``pads[i]`` keys."""
    b, group, n, d = len(pads), 2, 16, 8
    g = torch.Generator().manual_seed(3)
    q, grad_out = (torch.randn(b, kv_heads * group, n, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, kv_heads, n, d, generator=g) for _ in range(2))
    keep = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]  # left padding
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, fill=fill, softcap=softcap,
                                      dropout_p=dropout_p)
    empty = (~keep)[:, None, :].expand(b, kv_heads * group, n)  # causal: the rows before the first kept key
    assert fills.empty_row_grads(q, k, v, grad_out, empty, spec, seed=SEED)[2].abs().max() > 0
    backward = _ops_computed(lambda: fills.empty_row_grads(q, k, v, grad_out, empty, spec, seed=SEED))
    if dropout_p == 0:
        return backward, 0
    out = torch.zeros_like(q)
    filled = fills.fill_empty_rows(out, empty, v, spec, seed=SEED)
    assert filled[-1, :, :pads[-1]].abs().max() > 0 and filled[-1, :, pads[-1]:].abs().max() == 0
    return backward, _ops_computed(lambda: fills.fill_empty_rows(out, empty, v, spec, seed=SEED))


@pytest.mark.parametrize("fill,dropout_p,softcap", ROW_WISE, ids=[f"{f.value}-p{p}-cap{c}" for f, p, c in ROW_WISE])
def test_the_row_wise_fills_launch_as_many_ops_for_eight_key_heads_as_for_one(fill, dropout_p, softcap):
    """A left-padded batch in training: the row-wise gradients (a softcap, dropout, the band's union) and the
    dropped-out forward fill dispatch a number of ops that grows with the batch rows that have empty rows, not with
    the heads (they looped over each (batch row, key head), ~15 ops each: ~1500 launches per layer's backward at
    8 batch rows x 12 key heads on a GPU). Under the CPU's rule, a block per batch row with empty rows."""
    one, eight = (_row_wise_op_counts(fill, dropout_p, softcap, heads, [0, 5, 11]) for heads in (1, 8))
    assert one == eight, (one, eight)
    fewer = _row_wise_op_counts(fill, dropout_p, softcap, 8, [0, 0, 11])  # one batch row with empty rows: a block fewer
    assert fewer[0] < eight[0] and (fewer[1] < eight[1] or dropout_p == 0), (fewer, eight)


@pytest.mark.parametrize("fill,dropout_p,softcap", ROW_WISE, ids=[f"{f.value}-p{p}-cap{c}" for f, p, c in ROW_WISE])
def test_under_a_gpus_rule_the_row_wise_fills_launch_as_many_ops_for_eight_batch_rows_as_for_one(
        fill, dropout_p, softcap, monkeypatch):
    """On a GPU the ops are launches and a block takes every batch row with empty rows (``BATCH_ROWS_PER_BLOCK``):
    the row-wise gradients and the dropped-out forward fill dispatch as many ops for eight batch rows with empty
    rows, each padded by a different count, as for one (a block per batch row was 300-420 launches at 8)."""
    monkeypatch.setattr(fills, "BATCH_ROWS_PER_BLOCK", {"cpu": None})
    one = _row_wise_op_counts(fill, dropout_p, softcap, 2, [0] * 7 + [11])
    eight = _row_wise_op_counts(fill, dropout_p, softcap, 2, [3, 5, 15, 1, 7, 2, 9, 11])
    assert one == eight, (one, eight)


@pytest.mark.usefixtures("batch_rule")
@pytest.mark.parametrize("fill,dropout_p,softcap",
                         [(Fill.FINITE_ADDED, P, 5.0), (Fill.FINITE_REPLACED_ADDED, 0.0, None)],
                         ids=["finite_added-dropout-softcap", "finite_replaced_added"])
def test_a_nan_of_a_row_that_saw_a_key_reaches_nothing(fill, dropout_p, softcap):
    """A block holds every head of its rows, the (head, row) pairs that see a key included, and every key head of
    its batch row, those without an empty row included: such pairs and heads take exactly 0 (the kernel's own
    gradients are added to them), a NaN of their query, key or value notwithstanding, while the empty rows of a
    head with a NaN key take the NaN."""
    q, k, v, grad_out, empty, spec = _rows_empty_in_some_heads(fill, dropout_p, softcap, None)
    q, k, v, empty = q.clone(), k.clone(), v.clone(), empty.clone()
    empty[1, 2:4] = False  # key head 1 of batch row 1 (query heads 2 and 3): no empty row
    k[1, 1, 5], v[1, 1, 5] = float("nan"), float("nan")
    k[1, 0, 2], v[1, 0, 2] = float("nan"), float("nan")  # key head 0's empty rows see it
    seeing = (~empty[0, :2]).nonzero()[0]  # a (head, row) of batch row 0 that sees a key, in key head 0
    assert empty[0, :2].any()
    q[0, seeing[0], seeing[1]] = float("nan")
    dq, dk, dv, _, _ = fills.empty_row_grads(q, k, v, grad_out, empty, spec, seed=SEED if dropout_p > 0 else 0)
    assert torch.equal(dq[~empty], torch.zeros_like(dq[~empty]))
    assert torch.equal(dk[1, 1], torch.zeros_like(dk[1, 1])) and torch.equal(dv[1, 1], torch.zeros_like(dv[1, 1]))
    assert not any(grad[0].isnan().any() for grad in (dq, dk, dv))
    assert dq[1, :2][empty[1, :2]].isnan().any()


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
@pytest.mark.parametrize("mask_shape", [(1, 1, 6, 5), (2, 1, 1, 5), (6, 5)], ids=["rows", "batch", "2d"])
def test_an_added_neg_inf_sends_nan_to_q_k_and_the_added_terms_of_hidden_rows(kernel, mask_shape):
    """``Fill.NEG_INF_ADDED``: a row its key padding hides entirely is NaN, and its gradient NaN in dq (that row),
    dk and dv (every key of the head) and in every element of an additive mask added to it (summed over the
    mask's broadcast dims), as autograd through ``s + where(pad, -inf, 0) + mask`` gives them."""
    from attnopt.kernels.naive import naive_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, generator=g) for n in (6, 5, 5))
    mask = torch.randn(*mask_shape, dtype=torch.float64, generator=g)
    keep = torch.tensor([[False] * 5, [True] * 3 + [False] * 2])  # batch row 0: no key at all
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, mask=mask, fill=Fill.NEG_INF_ADDED)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    want = naive_attention(*leaves[:3], spec.with_(mask=leaves[3]))
    grad = torch.randn(want.shape, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(want, leaves, grad)
    chosen = registry.get(kernel)
    out, lse = chosen.forward(q, k, v, spec, 0)
    torch.testing.assert_close(out, want.detach(), equal_nan=True)
    got = chosen.backward(grad, q, k, v, out, lse, spec, 0, False, True)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), (*got[:3], got[4]), expected):
        assert a.isnan().any(), name
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
