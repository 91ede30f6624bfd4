"""What is built from a call's term tensors is built once per tensor, rebuilt when it changes, freed with it."""

import gc
import warnings

import pytest
import torch

import attnopt
from attnopt.kernels import AttentionSpec, get, sdpa
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Fill
from attnopt.kernels.term_cache import TermCache

transformers = pytest.importorskip("transformers")


def _qkv(n=16, b=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 2, n, 8, generator=g) for _ in range(3)]


def _padded(n=16):
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, : n // 2] = False  # left padding
    return keep


@pytest.fixture
def builds(monkeypatch):
    """The number of masks ``sdpa`` materializes."""
    count = []
    build = sdpa._mask_and_empty_rows
    monkeypatch.setattr(sdpa, "_mask_and_empty_rows", lambda spec: count.append(1) or build(spec))
    sdpa._MASKS.clear()
    yield count
    sdpa._MASKS.clear()


def _padded_call():
    """(q, k, v, the padding tensor, the spec) of a causal call with a left-padded batch row."""
    q, k, v = _qkv()
    keep = _padded()
    return q, k, v, keep, AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, fill=Fill.SAFE)


def test_layers_sharing_a_padding_tensor_build_one_mask(builds):
    q, k, v, _, spec = _padded_call()
    kernel = get("sdpa_cpu")
    first = kernel.forward(q, k, v, spec, 0)[0]
    for _ in range(3):  # three more "layers" of the same forward
        torch.testing.assert_close(kernel.forward(q, k, v, spec.with_(), 0)[0], first)
    assert len(builds) == 1
    torch.testing.assert_close(first.double(), naive_attention(q, k, v, spec), atol=1e-5, rtol=1e-5)


def test_an_in_place_change_of_the_padding_rebuilds_the_mask(builds):
    q, k, v, keep, spec = _padded_call()
    kernel = get("sdpa_cpu")
    before = kernel.forward(q, k, v, spec, 0)[0]
    keep[0, :3] = False  # the same tensor object, new contents
    after = kernel.forward(q, k, v, spec, 0)[0]
    assert len(builds) == 2
    torch.testing.assert_close(after.double(), naive_attention(q, k, v, spec), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_the_mask_is_freed_with_its_padding_tensor(builds):
    q, k, v = _qkv()
    keep = _padded()
    mask, _ = sdpa.mask_and_empty_rows(AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep))
    assert len(sdpa._MASKS) == 1
    alive = torch.utils.weak.WeakTensorKeyDictionary()
    alive[mask] = True
    del keep, mask
    gc.collect()
    assert len(sdpa._MASKS) == 0 and len(alive) == 0


@pytest.mark.parametrize("case", ["requires_grad", "inference_mode", "too_big", "band_only"])
def test_masks_not_kept(case, builds, monkeypatch):
    q, k, v = _qkv()
    terms = {"causal": True, "key_padding": _padded()}
    if case == "requires_grad":
        terms = {"bias": torch.randn(1, 2, 16, 16, requires_grad=True)}
    elif case == "too_big":
        monkeypatch.setattr(sdpa, "CACHED_MASK_BYTES", 16)
    elif case == "band_only":  # nothing to free a kept mask with: a band's mask is built per call
        terms = {"causal": True, "window": attnopt.kernels.Window(4, 0)}
    if case == "inference_mode":
        with torch.inference_mode():
            terms["key_padding"] = _padded()
            q, k, v = _qkv()
            spec = AttentionSpec.from_tensors(q, k, v, **terms)
            first, second = sdpa.mask_and_empty_rows(spec)[0], sdpa.mask_and_empty_rows(spec)[0]
    else:
        spec = AttentionSpec.from_tensors(q, k, v, **terms)
        first, second = sdpa.mask_and_empty_rows(spec)[0], sdpa.mask_and_empty_rows(spec)[0]
    assert first is not second and len(builds) == 2 and len(sdpa._MASKS) == 0
    torch.testing.assert_close(first, second)


def test_nothing_is_kept_or_looked_up_while_a_cuda_graph_is_captured(monkeypatch):
    """A captured call must compute its terms' results from the inputs (every replay then does, on their current
    values): it neither takes a result kept before the capture nor keeps one made in it (the graph's own memory)."""
    from attnopt.kernels import term_cache

    cache = TermCache(4, without_terms=True)
    term = torch.ones(3)
    kept = cache.get([term], "s", lambda: term.clone())
    band = cache.get([], "band", lambda: torch.zeros(2))
    monkeypatch.setattr(term_cache, "capturing", lambda: True)
    made = cache.get([term], "s", lambda: term.clone())
    assert made is not kept and cache.get([], "band", lambda: torch.zeros(2)) is not band
    assert cache.peek([term], "s") is None and not cache.keeps([term])
    cache.get([torch.ones(2)], "new", lambda: torch.ones(1))
    assert len(cache) == 2  # the two kept before the capture, nothing from inside it
    monkeypatch.setattr(term_cache, "capturing", lambda: False)
    assert cache.get([term], "s", lambda: None) is kept


def test_a_recycled_address_is_not_a_hit():
    cache = TermCache(4, without_terms=False)
    for value in range(5):  # each tensor dies before the next is made, often at the same address
        term = torch.full((3,), value)
        assert cache.get([term], "s", term.clone).tolist() == [value] * 3
        del term
    assert len(cache) == 0


def test_a_padded_hf_model_builds_one_mask_per_forward(builds):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        optimized = attnopt.optimize(model, kernel="sdpa_cpu")
        optimized(input_ids=ids, attention_mask=mask)  # capture and rewrite
        assert len(attnopt.report_of(optimized).replaced) == 4
        builds.clear()
        for _ in range(2):
            got = optimized(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(builds) == 2  # one per forward, for its four layers
    keep = mask.bool()
    torch.testing.assert_close(got[keep[:, :, None].expand_as(got)], want[keep[:, :, None].expand_as(want)],
                               atol=1e-5, rtol=1e-5)


def _prepared(kernel_name="sdpa_cpu", fill=Fill.FINITE_ADDED):
    """A causal call with a left-padded batch row (its first rows see no key), and the kernel's prepared call."""
    q, k, v = _qkv()
    keep = _padded()
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, fill=fill)
    return q, k, v, keep, spec, get(kernel_name).prepare(spec)


def _expected(q, k, v, keep, fill=Fill.FINITE_ADDED):
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep.clone(), fill=fill)
    return naive_attention(q.double(), k.double(), v.double(), spec.with_(dtype=torch.float64)).float()


@pytest.mark.parametrize("fill", [Fill.FINITE_ADDED, Fill.NEG_INF])
def test_a_prepared_call_hands_the_last_answer_on_while_its_terms_are_unchanged(builds, fill):
    """The layers of a forward call the same prepared call on one padding tensor: the mask, its NaN rows and its
    rows to fill are made once (one build, one answer object), and every layer's output is still the original's;
    an in-place write to the padding, or a new padding tensor, gives a new answer."""
    q, k, v, keep, spec, run = _prepared(fill=fill)
    source = run.__closure__ and next(c.cell_contents for c in run.__closure__
                                      if isinstance(c.cell_contents, sdpa.MaskSource))
    answers = []
    for _ in range(3):
        torch.testing.assert_close(run(q, k, v, spec), _expected(q, k, v, keep, fill), equal_nan=True)
        answers.append(source.for_call(spec))
    assert len(builds) == 1 and all(a is answers[0] for a in answers)
    keep[0, :3] = False  # written in place: batch row 0's first rows lose their keys
    torch.testing.assert_close(run(q, k, v, spec), _expected(q, k, v, keep, fill), equal_nan=True)
    assert source.for_call(spec) is not answers[0] and len(builds) == 2
    fresh = _padded()  # a new tensor, another padding
    fresh[1] = True
    new_spec = spec.with_(key_padding=fresh)
    torch.testing.assert_close(run(q, k, v, new_spec), _expected(q, k, v, fresh, fill), equal_nan=True)
    assert len(builds) == 3


def test_the_layers_prepared_calls_share_one_answer_per_forward(builds):
    """Two sites of one forward (two prepared calls, each with its own q, k and v) on one padding tensor: the
    first builds the mask and finds its rows, the second is handed that answer, and each output is its own
    layer's. The next forward (a new generation) builds again; a site with another fill has its own source."""
    from attnopt.kernels.term_cache import new_generation

    q, k, v, keep, spec, first = _prepared()
    second = get("sdpa_cpu").prepare(spec.with_(key_padding=keep))
    q2, k2, v2 = (t.flip(2) for t in (q, k, v))
    new_generation()
    for _ in range(2):
        torch.testing.assert_close(first(q, k, v, spec), _expected(q, k, v, keep))
        torch.testing.assert_close(second(q2, k2, v2, spec), _expected(q2, k2, v2, keep))
    assert len(builds) == 1
    new_generation()
    first(q, k, v, spec)
    assert len(builds) == 2
    other = get("sdpa_cpu").prepare(spec.with_(fill=Fill.NEG_INF))
    sources = [next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, sdpa.MaskSource))
               for run in (first, second, other)]
    assert sources[0] is sources[1] and sources[2] is not sources[0]


def test_a_prepared_calls_answer_dies_with_its_terms_and_is_never_handed_on_under_capture(builds, monkeypatch):
    q, k, v, keep, spec, run = _prepared()
    source = next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, sdpa.MaskSource))
    from attnopt.kernels import term_cache

    first = source.for_call(spec)
    monkeypatch.setattr(term_cache, "capturing", lambda: True)
    captured = source.for_call(spec)
    assert captured is not first, "a captured call took an eager call's answer"
    assert source.for_call(spec) is not captured, "a captured call's answer was kept"
    monkeypatch.setattr(term_cache, "capturing", lambda: False)
    assert source.for_call(spec) is first
    del spec, keep, first, captured
    gc.collect()
    assert source._last.answer is None, "the answer outlived its padding tensor"


def test_a_prepared_call_keeps_nothing_for_inference_mode_terms(builds):
    with torch.inference_mode():
        q, k, v, keep, spec, run = _prepared()
        source = next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, sdpa.MaskSource))
        for _ in range(2):
            torch.testing.assert_close(run(q, k, v, spec), _expected(q, k, v, keep))
    assert source._last.answer is None and len(builds) == 2
