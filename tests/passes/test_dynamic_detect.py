"""Detection under dynamic shapes (``dynamic=True``): sizes are symbols, and float attributes are graph inputs.

A site is replaced when every fact its proof uses about a symbolic value is proven by the shape environment
(sizes dynamo already equated) or guarded (a captured scale: dynamo recompiles when it changes); a fact that
is neither leaves the site alone with the reason. The replaced sites compute what the original does for
every length and batch size, without recompiling.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import attnopt
from attnopt.passes.detect import Match, Rejection, find_sites

transformers = pytest.importorskip("transformers")

# (batch, length): two batch sizes, three lengths, no size equal to another (dynamo would equate them)
SHAPES = [(3, 7), (5, 12), (5, 17)]


def tiny_llama(attn_implementation="eager"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaModel(config).eval()


def tokens(b, n):
    generator = torch.Generator().manual_seed(10 * b + n)
    ids = torch.randint(0, 100, (b, n), generator=generator)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def graphs_over(compiled, reference, inputs) -> int:
    """Run ``compiled`` on each input, comparing with ``reference``; the number of graphs dynamo compiled."""
    counters.clear()
    for args in inputs:
        with torch.no_grad():
            got, want = compiled(*args), reference(*args)
        got, want = (getattr(x, "last_hidden_state", x) for x in (got, want))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hf_llama_with_grouped_query_attention_is_replaced(attention):
    """Eager attention: ``matmul * self.scaling + mask``, with K/V repeated by ``repeat_kv``; SDPA attention:
    ``scale=self.scaling``. Under ``dynamic=True`` the scaling is a graph input and every size a symbol."""
    model = tiny_llama(attention)
    optimized = attnopt.optimize(copy.deepcopy(model), dynamic=True)

    def call(m):
        return lambda kwargs: m(**kwargs)

    assert graphs_over(call(optimized), call(model), [(tokens(b, n),) for b, n in SHAPES]) == 1
    report = optimized.attnopt_report
    assert report.graphs == 1 and len(report.sites) == 2, str(report)
    for site in report.sites:
        assert site.replaced, str(report)
        assert site.found == "causal+key_padding+gqa" and (site.q_heads, site.kv_heads) == (4, 2), str(report)


DIM, HEADS = 16, 2


class ScaleAttribute(nn.Module):
    """The scale a float attribute: under dynamic=True dynamo reads it as a graph input (``.item()``)."""

    def __init__(self, scale=(DIM // HEADS) ** -0.5):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.scale = scale

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        return torch.softmax(q @ k.mT * self.scale + mask, dim=-1) @ v


class WidthScale(ScaleAttribute):
    """The scale computed from the input's width, which the projection fixes (the shape environment
    replaces the width's symbol by 16)."""

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.mT / math.sqrt(c // HEADS) + mask, dim=-1) @ v


class ItemScale(ScaleAttribute):
    """The scale read from a buffer by ``.item()``: known only at run time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(0.3))

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.mT * self.temperature.item() + mask, dim=-1) @ v


def x_and_mask(b, n):
    generator = torch.Generator().manual_seed(10 * b + n)
    x = torch.randn(b, n, DIM, generator=generator)
    mask = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))  # causal
    return x, mask


def compiled(model):
    return torch.compile(model, backend="attnopt", dynamic=True, options={"compiler": "eager"})


@pytest.mark.parametrize("module", [ScaleAttribute, WidthScale])
def test_a_scale_read_from_an_attribute_or_the_width_is_replaced(module):
    torch.manual_seed(0)
    model = module()
    optimized = compiled(copy.deepcopy(model))
    assert graphs_over(optimized, model, [x_and_mask(b, n) for b, n in SHAPES]) == 1
    sites = attnopt.report_of(optimized).sites
    assert [s.replaced for s in sites] == [True], str(attnopt.report_of(optimized))


def test_a_changed_scale_attribute_is_guarded():
    """The captured scale is guarded: a new value recompiles once, and the output follows it."""
    torch.manual_seed(0)
    model = ScaleAttribute()
    optimized = compiled(copy.deepcopy(model))
    assert graphs_over(optimized, model, [x_and_mask(b, n) for b, n in SHAPES[:2]]) == 1
    for m in (model, optimized):
        m.scale = 0.7
    assert graphs_over(optimized, model, [x_and_mask(b, n) for b, n in SHAPES]) == 1
    assert all(s.replaced for s in attnopt.report_of(optimized).sites), str(attnopt.report_of(optimized))


def test_a_scale_known_only_at_run_time_is_left_alone():
    """``.item()`` of a buffer captured as a symbol (capture_scalar_outputs): the op takes a constant scale,
    and nothing proves or guards the value; the reason names the scale, not the mask added after it."""
    torch.manual_seed(0)
    model = ItemScale()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        optimized = compiled(copy.deepcopy(model))
        assert graphs_over(optimized, model, [x_and_mask(b, n) for b, n in SHAPES]) == 1
    report = attnopt.report_of(optimized)
    assert [s.replaced for s in report.sites] == [False], str(report)
    assert "known only at run time" in report.sites[0].reason and "broadcast" not in report.sites[0].reason


def attend(q, k, v):
    """Attention on graph inputs: under dynamic=True the head dim and head counts are symbols too."""
    return torch.softmax(q @ k.mT / math.sqrt(q.size(-1)), dim=-1) @ v


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def qkv(b, n, d, q_heads=2, kv_heads=2):
    generator = torch.Generator().manual_seed(b * 100 + n * 10 + d)
    return tuple(torch.randn(b, h, n, d, generator=generator) for h in (q_heads, kv_heads, kv_heads))


@pytest.mark.parametrize("function", [attend, sdpa_gqa])
def test_a_symbolic_head_dim_is_guarded(function):
    """The scale 1/sqrt(D) over a symbolic head dim: D is guarded (a new D recompiles), lengths and batch sizes
    are not; SDPA's grouped heads are guarded divisible, not fixed."""
    optimized = compiled(function)
    heads = (4, 2) if function is sdpa_gqa else (2, 2)
    assert graphs_over(optimized, function, [qkv(b, n, 8, *heads) for b, n in SHAPES]) == 1
    if function is sdpa_gqa:  # another group size: the divisibility guard holds, nothing recompiles
        assert graphs_over(optimized, function, [qkv(3, 9, 8, 6, 3)]) == 0
    assert graphs_over(optimized, function, [qkv(3, 9, 11, *heads)]) == 1
    assert all(s.replaced for s in attnopt.report_of(optimized).sites), str(attnopt.report_of(optimized))


class FakeRepeat(nn.Module):
    """K/V 'repeated' by an expand whose group is a size of the input: no static group to fold."""

    def forward(self, q, k, v):
        b, hkv, n, d = k.shape
        group = q.size(1) // hkv
        k = k[:, :, None].expand(b, hkv, group, n, d).reshape(b, hkv * group, n, d)
        v = v[:, :, None].expand(b, hkv, group, n, d).reshape(b, hkv * group, n, d)
        return torch.softmax(q @ k.mT * 0.25, dim=-1) @ v


def test_a_symbolic_group_is_not_folded():
    """The group of the repeat is a symbol: K/V are read repeated (no fold), exact for every size and group."""
    model = FakeRepeat()
    optimized = compiled(model)
    assert graphs_over(optimized, model, [qkv(b, n, 8, 4, 2) for b, n in SHAPES] + [qkv(3, 9, 8, 6, 2)]) == 1
    sites = attnopt.report_of(optimized).sites
    assert [s.replaced for s in sites] == [True] and sites[0].kv_heads == sites[0].q_heads, \
        str(attnopt.report_of(optimized))


def test_a_fact_is_guarded_only_while_dynamo_captures():
    """The same graph: matched inside a torch.compile backend (the head dim guarded there), left alone with the
    reason when analyzed afterwards, when no guard can reach dynamo any more."""
    inside, graphs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(attend, backend=backend, dynamic=True)(*qkv(3, 7, 8))
    after = find_sites(graphs[0].graph)
    assert isinstance(after[0], Rejection) and "only while torch.compile captures" in after[0].reason, after

    def matching(gm, example_inputs):
        inside.extend(find_sites(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(attend, backend=matching, dynamic=True)(*qkv(3, 7, 8))
    assert isinstance(inside[0], Match) and inside[0].scale == 1 / math.sqrt(8), inside


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertModel(config).eval()


def test_hf_encoder_padding_stays_key_padding_under_dynamic_shapes():
    """HF's bidirectional mask keeps every position with ``q_idx >= 0``. At a fixed length that is a constant
    all-ones tensor; under dynamic shapes (dynamo's second length, or dynamic=True) its size is a symbol and
    the comparison is proven from its algebra: the sites stay ``key_padding``, with no dense mask built."""
    model = tiny_bert()
    optimized = attnopt.optimize(copy.deepcopy(model), dynamic=True)

    def call(m):
        return lambda kwargs: m(**kwargs)

    assert graphs_over(call(optimized), call(model), [(tokens(b, n),) for b, n in SHAPES]) == 1
    report = optimized.attnopt_report
    assert [site.mask_terms for site in report.sites] == [("key_padding",)] * 2, str(report)


class IndexCondition(nn.Module):
    """Attention whose mask is ``cond(i) & causal`` for a condition on the query or key index alone."""

    def __init__(self, cond):
        super().__init__()
        self.cond = cond

    def forward(self, q, k, v):
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = self.cond(i, j) & (j <= i)
        return torch.softmax((q @ k.mT * 0.25).masked_fill(~keep, float("-inf")), -1) @ v


@pytest.mark.parametrize("cond, proven", [
    (lambda i, j: i >= 0, True),
    (lambda i, j: j + 1 > 0, True),
    (lambda i, j: 0 <= i, True),
    (lambda i, j: ~(i < 0), True),
    (lambda i, j: i - 2 >= -2, True),
    (lambda i, j: i >= 1, False),  # the first row keeps nothing: NaN there, as eager gives
    (lambda i, j: j <= 5, False),  # true for short rows only: a key mask read at run time
    (lambda i, j: -i <= 0, False),  # true, but negation is outside the index algebra: a term, exact
], ids=["i>=0", "j+1>0", "0<=i", "not i<0", "i-2>=-2", "i>=1", "j<=5", "-i<=0"])
def test_an_index_condition_is_dropped_only_when_it_holds_at_every_length(cond, proven):
    """A condition proven true at every position for every length is no mask term; any other stays one
    (exact either way, across lengths without recompiling)."""
    model = IndexCondition(cond)
    optimized = torch.compile(model, backend="attnopt", dynamic=True, options={"compiler": "eager"})
    for n in (6, 9, 13):
        q, k, v = (torch.randn(2, 2, n, 8, generator=torch.Generator().manual_seed(n + i)) for i in range(3))
        torch.testing.assert_close(optimized(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5, equal_nan=True)
    report = attnopt.report_of(optimized)
    assert report.sites and all(site.replaced for site in report.sites), str(report)
    terms = {t for site in report.sites for t in site.mask_terms}
    assert (terms == {"causal"}) == proven, str(report)
