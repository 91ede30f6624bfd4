"""triton_decode against the float64 oracle: every mask term, dtype, fill and GQA layout it claims.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes;
the ``gpu`` tests run real decode shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnopt.kernels.triton_decode as td
from attnopt.kernels import get, naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: ||out - ref|| / ||ref|| bounds: float32 scores carry |s| * 6e-8 of rounding (an ALiBi bias
#: of a few thousand makes that 1e-4); half operands are rounded once per product
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
KERNEL = get("triton_decode")


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(batch, q_heads, q_len, head_dim)  # [B, Hq, Nq, D]
    k = rand(batch, kv_heads, kv_len, head_dim)  # [B, Hkv, Nk, D]
    v = rand(batch, kv_heads, kv_len, head_dim)  # [B, Hkv, Nk, D]
    return q, k, v


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error over rows the reference defines; NaN rows must match exactly."""
    nan_ref = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan_ref), "NaN rows differ from the reference"
    out, ref = out.double().masked_fill(nan_ref, 0), ref.masked_fill(nan_ref, 0)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _check(q, k, v, spec: AttentionSpec, config: td.DecodeConfig | None = None):
    assert KERNEL.not_supported_reasons(spec) == []
    if config is None:
        out, lse = KERNEL.forward(q, k, v, spec, seed=0)
    else:
        out, lse = td.decode_attention(q, k, v, spec, config)
        out = td.apply_fill(out, lse, v, spec)
    ref = naive_attention(q, k, v, spec)
    assert out.shape == ref.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    err = _rel_err(out, ref)
    assert err < TOLERANCE[q.dtype], f"relative error {err:.2e}"
    return out, lse


def _forced(spec: AttentionSpec, splits: int) -> td.DecodeConfig:
    return td.choose_config(spec, num_splits=splits)


# ----------------------------------------------------------------------------- CPU
SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D)
    (2, 4, 2, 1, 37, 16),  # GQA 4/2, one token
    (1, 4, 1, 3, 300, 80),  # MQA 4/1, speculative tokens, padded head dim
    (2, 4, 2, 3, 1, 16),  # a single key
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain(shape, dtype):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype)
    _check(q, k, v, AttentionSpec.from_tensors(q, k, v))


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_splits_merge(splits):
    q, k, v = _inputs(2, 4, 2, 3, 300, 16, torch.float32)
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT)
    _check(q, k, v, spec, _forced(spec, splits))


def test_lse_matches_reference():
    q, k, v = _inputs(2, 4, 2, 3, 300, 16, torch.float32)
    spec = AttentionSpec.from_tensors(q, k, v, window=Window(50, 0), align=Align.BOTTOM_RIGHT, causal=True)
    _, lse = _check(q, k, v, spec, _forced(spec, 3))
    _, ref_lse = get("reference").forward(q, k, v, spec, seed=0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def _term_cases(b, hq, nq, nk, dtype):
    """(name, spec terms) for every mask term the kernel claims, alone and combined."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([nk, max(1, nk // 3)][:b])
    prefix = torch.arange(nk)[None, :] < lengths[:, None]
    holes = torch.rand(b, nk, generator=gen) > 0.3
    holes[:, 0] = True
    docs_kv = (torch.arange(nk) * 3 // max(nk, 1))[None].expand(b, nk)
    docs_q = torch.full((b, nq), 2) if nk > 1 else torch.zeros(b, nq, dtype=torch.long)
    bias_h = torch.randn(1, hq, 1, nk, generator=gen)  # ALiBi-like, broadcast over batch and rows
    add_mask = torch.randn(b, 1, nq, nk, generator=gen).to(dtype)  # half when q is half: added at half
    bool_mask = torch.rand(b, hq, nq, nk, generator=gen) > 0.4
    bool_mask[..., 0] = True
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return [
        ("causal_top_left", dict(causal=True)),
        ("causal_bottom_right", dict(causal=True, align=Align.BOTTOM_RIGHT)),
        ("window", dict(window=Window(5, 2), align=Align.BOTTOM_RIGHT)),
        ("window_causal", dict(window=Window(7, None), causal=True, align=Align.BOTTOM_RIGHT)),
        ("lengths", dict(key_padding=to(lengths))),
        ("bool_prefix", dict(key_padding=to(prefix))),
        ("bool_holes", dict(key_padding=to(holes))),
        ("documents", dict(q_doc=to(docs_q), kv_doc=to(docs_kv))),
        ("bias", dict(bias=to(bias_h))),
        ("additive_mask", dict(mask=to(add_mask))),
        ("bool_mask", dict(mask=to(bool_mask))),
        ("softcap_scale", dict(softcap=2.0, scale=0.7)),
        ("all", dict(causal=True, align=Align.BOTTOM_RIGHT, key_padding=to(lengths), bias=to(bias_h),
                     mask=to(bool_mask), softcap=5.0)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(13))
def test_mask_terms(case, dtype):
    b, hq, hkv, nq, nk, d = 2, 4, 2, 3, 300, 16
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype, seed=case)
    name, terms = _term_cases(b, hq, nq, nk, dtype)[case]
    spec = AttentionSpec.from_tensors(q, k, v, **terms)
    _check(q, k, v, spec, _forced(spec, 2))


def test_mask_term_cases_count():
    assert len(_term_cases(2, 4, 3, 300, torch.float32)) == 13


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows(fill, dtype):
    """Batch 1 has no key (length 0); query 0 of batch 0 sees none through a bool mask."""
    b, hq, hkv, nq, nk, d = 2, 4, 1, 3, 37, 80
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype)
    keep = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    keep[0, :, 0] = False
    spec = AttentionSpec.from_tensors(
        q, k, v, key_padding=torch.tensor([nk, 0], device=DEVICE), mask=keep.to(DEVICE), fill=fill
    )
    if fill == Fill.FINITE_REPLACED_ADDED:  # detection makes it of a band and key padding only
        with pytest.raises(NotImplementedError, match="band and key padding only"):
            _check(q, k, v, spec)
        return
    out, lse = _check(q, k, v, spec)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(lse[0, :, 1:]).all()


def test_key_padding_arguments_are_made_once_per_padding_tensor(monkeypatch):
    """The layers of a decode step share one padding tensor: its kernel arguments are made for the first and
    reused by the rest; an in-place change of the padding (or a new tensor) makes them again, and every call
    still equals the float64 reference."""
    made = []
    make = td._make_key_padding_args
    monkeypatch.setattr(td, "_make_key_padding_args", lambda spec: made.append(1) or make(spec))
    td._KEY_PADDING_ARGS.clear()
    q, k, v = _inputs(2, 4, 2, 1, 90, 16, torch.float32)
    keep = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    keep[1, :30] = False  # a left-padded row
    for _ in range(3):  # three layers
        _check(q, k, v, AttentionSpec.from_tensors(q, k, v, key_padding=keep))
    assert len(made) == 1
    keep[1, :60] = False  # changed in place: made again, and the new padding is the one applied
    out, _ = _check(q, k, v, AttentionSpec.from_tensors(q, k, v, key_padding=keep))
    assert len(made) == 2
    shorter = keep.clone()
    shorter[0, 45:] = False
    _check(q, k, v, AttentionSpec.from_tensors(q, k, v, key_padding=shorter))
    assert len(made) == 3


def test_padding_that_leaves_every_row_a_key_fills_nothing(monkeypatch):
    """A left-padded decode step: every row still sees a key. The first layer finds that out (one host sync per
    padding tensor, ``fills.known_empty_rows``) and no layer computes a fill; once the padding hides every key of
    a batch row (written in place), that row gets the fill, equal to the reference."""
    from attnopt.kernels import fills

    wheres = []
    where = fills._where_empty
    monkeypatch.setattr(fills, "_where_empty", lambda *a: wheres.append(1) or where(*a))
    fills._EMPTY_ROWS.clear()
    q, k, v = _inputs(2, 4, 2, 1, 70, 16, torch.float32)
    keep = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    keep[1, :25] = False
    for _ in range(3):  # three layers
        _check(q, k, v, AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=Fill.FINITE_ADDED))
    assert not wheres
    keep[1] = False
    out, lse = _check(q, k, v, AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=Fill.FINITE_ADDED))
    assert len(wheres) == 1 and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(out[1, :, 0], v[1].mean(1).repeat_interleave(2, dim=0))


def test_a_finite_additive_mask_fills_nothing(monkeypatch):
    """A decode step's per-key float mask of 0 / finfo.min: no row can lose every key, found once per mask tensor;
    the calls compute no fill and equal the reference, a row masked entirely included (uniform over v)."""
    from attnopt.kernels import fills

    wheres = []
    where = fills._where_empty
    monkeypatch.setattr(fills, "_where_empty", lambda *a: wheres.append(1) or where(*a))
    fills._LOWEST.clear()
    q, k, v = _inputs(2, 4, 2, 1, 70, 16, torch.float32)
    mask = torch.zeros(2, 1, 1, 70, device=DEVICE)
    mask[1] = torch.finfo(torch.float32).min  # batch row 1: every key masked by the finite fill
    for _ in range(3):
        _check(q, k, v, AttentionSpec.from_tensors(q, k, v, mask=mask, fill=Fill.FINITE_ADDED))
    assert not wheres


def test_finite_fill_through_additive_min():
    """An fp16 ``finfo.min`` additive mask on every key averages v uniformly, as eager does."""
    q, k, v = _inputs(1, 4, 2, 1, 37, 16, torch.float16)
    mask = torch.zeros(1, 1, 1, 37, dtype=torch.float16)
    mask[..., :] = torch.finfo(torch.float16).min
    spec = AttentionSpec.from_tensors(q, k, v, mask=mask.to(DEVICE), fill=Fill.FINITE)
    _check(q, k, v, spec)


def test_functional_route():
    import attnopt

    q, k, v = _inputs(1, 4, 2, 1, 37, 16, torch.float32)
    out = attnopt.attention(q, k, v, causal="bottom_right", kernel="triton_decode")
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT)
    assert _rel_err(out, naive_attention(q, k, v, spec)) < 1e-5


def test_not_supported_reasons():
    q, k, v = _inputs(1, 4, 2, 17, 37, 16, torch.float32)
    reasons = KERNEL.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, dropout_p=0.1))
    assert any("17" in r for r in reasons) and any("dropout" in r for r in reasons)
    q, k, v = _inputs(1, 4, 2, 1, 37, 512, torch.float32)
    assert any("head_dim" in r for r in KERNEL.not_supported_reasons(AttentionSpec.from_tensors(q, k, v)))


def test_not_supported_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 4, 2, 1, 37, 16, torch.float32, device="cpu")
    reasons = KERNEL.not_supported_reasons(AttentionSpec.from_tensors(q, k, v))
    assert any("CUDA" in r for r in reasons)
    assert KERNEL.cost(AttentionSpec.from_tensors(q, k, v)) >= td.INTERPRETER_SECONDS


def test_backward_delegates_to_reference():
    q, k, v = _inputs(1, 4, 2, 1, 37, 16, torch.float32)
    spec = AttentionSpec.from_tensors(q, k, v)
    out, lse = KERNEL.forward(q, k, v, spec, seed=0)
    grad = torch.randn_like(out)
    ours = KERNEL.backward(grad, q, k, v, out, lse, spec, 0, False, False)
    ref = get("reference").backward(grad, q, k, v, out, lse, spec, 0, False, False)
    for a, r in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a, r)


def test_split_heuristic_fills_the_machine():
    # B * Hkv = 64 programs of 32k keys: a whole number of waves on 132 SMs
    splits = td.num_splits_for(programs=64, tiles=32768 // 64, sm_count=132)
    waves = 64 * splits / (132 * td.PROGRAMS_PER_SM)
    assert waves / math.ceil(waves) > 0.9
    assert td.num_splits_for(programs=64, tiles=2, sm_count=132) == 1


# ----------------------------------------------------------------------------- GPU
GPU_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, dtype, terms)
    (8, 32, 8, 1, 32768, 128, torch.bfloat16, {}),
    (4, 32, 8, 4, 20000, 80, torch.float16, dict(causal=True, align=Align.BOTTOM_RIGHT)),
    (2, 16, 2, 1, 131072, 128, torch.bfloat16, dict(window=Window(4096, 0), causal=True, align=Align.BOTTOM_RIGHT)),
    (4, 8, 1, 2, 50000, 256, torch.bfloat16, dict(key_padding="lengths", softcap=30.0)),
    (2, 8, 8, 16, 4000, 96, torch.float32, dict(key_padding="bool", bias="alibi")),
    (2, 64, 4, 8, 9000, 64, torch.float16, dict(mask="bool")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}_H{c[1]}-{c[2]}_Nq{c[3]}_Nk{c[4]}_D{c[5]}")
def test_gpu_decode_shapes(case):
    b, hq, hkv, nq, nk, d, dtype, terms = case
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype, device="cuda")
    terms = dict(terms)
    if terms.get("key_padding") == "lengths":
        terms["key_padding"] = torch.randint(1, nk + 1, (b,), device="cuda")
    elif terms.get("key_padding") == "bool":
        terms["key_padding"] = torch.rand(b, nk, device="cuda") > 0.5
    if terms.get("bias") == "alibi":
        slopes = torch.rand(hq, device="cuda")
        terms["bias"] = (slopes[:, None, None] * torch.arange(nk, device="cuda"))[None]  # [1, Hq, 1, Nk]
    if terms.get("mask") == "bool":
        terms["mask"] = torch.rand(b, 1, nq, nk, device="cuda") > 0.2
    spec = AttentionSpec.from_tensors(q, k, v, **terms)
    _check(q, k, v, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_call_is_forward_on_every_call_of_its_plan(dtype):
    """``prepare`` takes the configuration, the grid and the launch's static arguments once; every call of the
    plan (the same terms again, the padding then written in place, then new term tensors; rows left without a
    key by the padding or the band) gives ``forward``'s output bit for bit, and the float64 oracle's."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(q_len=st.integers(1, 4), kv_len=st.integers(1, 40), group=st.sampled_from([1, 2]),
           band=st.sampled_from(["none", "causal_br", "causal_tl", "window"]),
           padding=st.sampled_from(["none", "bool", "lengths"]), term=st.sampled_from(["none", "bias", "bool", "neg_inf"]),
           docs=st.booleans(), fill=st.sampled_from([Fill.NEG_INF, Fill.FINITE_ADDED, Fill.SAFE]),
           seed=st.integers(0, 1000))
    def check(q_len, kv_len, group, band, padding, term, docs, fill, seed):
        if term == "neg_inf" and fill == Fill.FINITE_ADDED:
            # no detection makes this spec: a finfo.min padding next to a run-time additive mask stays additive
            # ("added as written"), and the kernels' finite fill does not model an added -inf
            fill = Fill.NEG_INF
        q, k, v = _inputs(2, 2 * group, 2, q_len, kv_len, 16, dtype, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        band_terms = {"none": {}, "causal_br": dict(causal=True, align=Align.BOTTOM_RIGHT),
                      "causal_tl": dict(causal=True, align=Align.TOP_LEFT),
                      "window": dict(causal=True, align=Align.BOTTOM_RIGHT, window=Window(3, 0))}[band]

        def terms(call: int) -> dict:
            found = dict(band_terms, fill=fill)
            if padding == "bool":
                found["key_padding"] = torch.rand(2, kv_len, generator=gen) > 0.3 * call
            elif padding == "lengths":
                found["key_padding"] = torch.randint(0, kv_len + 1, (2,), generator=gen)
            if term == "bias":
                found["bias"] = torch.randn(1, 2 * group, q_len, kv_len, generator=gen).to(dtype)
            elif term == "bool":
                found["mask"] = torch.rand(2, 1, q_len, kv_len, generator=gen) > 0.4
            elif term == "neg_inf":
                found["mask"] = torch.zeros(2, 1, q_len, kv_len).masked_fill(
                    torch.rand(2, 1, q_len, kv_len, generator=gen) > 0.6, float("-inf")).to(dtype)
            if docs:
                ids = torch.randint(0, 3, (2, kv_len), generator=gen).sort(-1).values
                found["q_doc"], found["kv_doc"] = ids[:, kv_len - q_len:] if kv_len >= q_len else None, ids
                if found["q_doc"] is None:
                    del found["q_doc"], found["kv_doc"]
            return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                    for key, value in found.items()}

        first = terms(0)
        spec = AttentionSpec.from_tensors(q, k, v, **first)
        if KERNEL.not_supported_reasons(spec):
            return
        run = KERNEL.prepare(spec)
        for call, found in enumerate((first, first, first, terms(1))):
            if call == 2 and padding == "bool":  # the last call's padding written in place: a new version
                found["key_padding"][1, : kv_len // 2 + 1] = False  # (rows without keys, through the band too)
            elif call == 2 and padding == "lengths":
                found["key_padding"][1] = 0  # batch row 1: no key at all
            spec = AttentionSpec.from_tensors(q, k, v, **found)
            got = run(q, k, v, spec)
            want = KERNEL.forward(q, k, v, spec, 0)[0]
            torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=f"call {call}")
            err = _rel_err(got, naive_attention(q, k, v, spec))
            assert err < TOLERANCE[dtype], f"call {call}: relative error {err:.2e}"

    check()


def test_layers_of_a_step_share_one_prepared_call(monkeypatch):
    """The layers of a decode step (same shapes and settings) share one prepared call: the first layer finds the
    padding's arguments and answer, the others take them; another fill or term set is another prepared call."""
    made = []
    build = td._key_padding_args
    monkeypatch.setattr(td, "_key_padding_args", lambda spec: made.append(1) or build(spec))
    q, k, v = _inputs(2, 4, 2, 1, 24, 16, torch.float32)
    keep = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
    keep[1, :5] = False
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT, key_padding=keep,
                                      fill=Fill.FINITE_ADDED)
    layers = [KERNEL.prepare(spec.with_()) for _ in range(4)]
    assert all(layer is layers[0] for layer in layers)
    want = naive_attention(q, k, v, spec)
    for layer in layers:
        assert _rel_err(layer(q, k, v, spec), want) < TOLERANCE[torch.float32]
    assert len(made) == 1
    assert KERNEL.prepare(spec.with_(fill=Fill.NEG_INF)) is not layers[0]
    assert KERNEL.prepare(spec.with_(key_padding=None)) is not layers[0]
