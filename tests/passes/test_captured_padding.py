"""A training site whose rows without a key take the fills' row-wise gradients is timed on the key padding of the
batch it was captured on (``plan.captured_padding``): those rows' cost is part of what its kernels run."""

import copy

import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.kernels import fills
from attnopt.passes import tuning

B, N, HEADS, DIM = 3, 24, 2, 16


class PaddedAttention(nn.Module):
    """HF-style training attention: an optional Gemma-2 softcap, then the additive causal + padding mask
    (``finfo.min`` where a key is hidden)."""

    def __init__(self, softcap: float | None, hide: bool = False):
        super().__init__()
        self.softcap, self.hide = softcap, hide
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        low = torch.finfo(s.dtype).min
        if self.hide:  # the keys hidden (``mask == 0``) rather than those kept
            later = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            hidden = later[None, None] | (attention_mask[:, None, None, :] == 0)
            mask = torch.zeros(b, 1, n, n, dtype=s.dtype, device=x.device).masked_fill(hidden, low)
        else:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            keep = causal[None, None] & attention_mask[:, None, None, :].bool()
            mask = torch.zeros(b, 1, n, n, dtype=s.dtype, device=x.device).masked_fill(~keep, low)
        p = (s + mask).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(b, n, -1)


class GPT2Attention(nn.Module):
    """GPT-2's training attention (transformers 4.x): the causal band replaced by ``finfo.min``, the padding added,
    attention dropout."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.register_buffer("bias", torch.ones(64, 64, dtype=torch.bool).tril()[None, None], persistent=False)

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5
        low = torch.finfo(s.dtype).min
        s = torch.where(self.bias[:, :, :n, :n], s, torch.full([], low, dtype=s.dtype))
        s = s + (1.0 - attention_mask[:, None, None, :].bool().to(s.dtype)) * low
        p = nn.functional.dropout(s.softmax(-1), 0.1, training=self.training)
        return (p @ v).transpose(1, 2).reshape(b, n, -1)


def padded(left: bool) -> torch.Tensor:
    mask = torch.ones(B, N, dtype=torch.long)
    for row, pad in enumerate((0, 5, 11)):
        if pad:
            mask[row, :pad] = 0 if left else 1
            if not left:
                mask[row, N - pad:] = 0
    return mask


def timed_paddings(monkeypatch) -> list:
    """Record the key padding each timed candidate's inputs are made with (None: a neutral one), the CPU's warm-up
    runs too (on 128 keys at most, ``tuning.shrunk``: here all of them)."""
    seen = []
    make = tuning.example_tensors

    def recording(spec, requires_grad, padding=None):
        seen.append(None if padding is None else padding.clone())
        q, k, v, real = make(spec, requires_grad, padding)
        if padding is not None:
            assert torch.equal(real.key_padding, padding)
        return q, k, v, real

    monkeypatch.setattr(tuning, "example_tensors", recording)
    return seen


def run(model, mask, tmp_path, train=True):
    torch.manual_seed(1)
    x = torch.randn(B, N, DIM, requires_grad=train)
    model.train(train)
    original = copy.deepcopy(model)  # optimize rewrites the model in place: the original runs from its copy
    optimized = attnopt.optimize(model, tune=True, cache_dir=str(tmp_path), keep_original=True)
    with torch.set_grad_enabled(train):
        out = optimized(x, mask)
        want = original(x, mask)
    if isinstance(model, GPT2Attention):  # its dropout draws differ: the planner's path is what is checked here
        return attnopt.report_of(optimized)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if train:
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *model.parameters()], grad)
        expected = torch.autograd.grad(want, [x, *original.parameters()], grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    return attnopt.report_of(optimized)


@pytest.mark.parametrize("form", ["keep", "hide", "gpt2"])
def test_a_training_site_with_row_wise_fills_is_timed_on_its_captured_left_padding(monkeypatch, tmp_path, form):
    """A softcap (the padding as the keys kept, or as those hidden), GPT-2's replaced band with dropout."""
    seen = timed_paddings(monkeypatch)
    mask = padded(left=True)
    model = GPT2Attention() if form == "gpt2" else PaddedAttention(softcap=30.0, hide=form == "hide")
    report = run(model, mask, tmp_path)
    (site,) = report.sites
    assert site.found.startswith("causal+key_padding"), site.found
    assert seen, "no candidate was timed"
    want = mask.bool()
    for padding in seen:
        assert padding is not None, "a candidate timed on a neutral padding"
        assert torch.equal(padding, tuning.spread_rows(want, padding.shape[0]))
    share = float(fills.rows_without_keys(_spec_with(want)).float().mean())
    assert f"leaves {share:.0%} of the rows without a key" in site.reason, site.reason


def _spec_with(keep: torch.Tensor):
    q = torch.empty(B, HEADS, N, DIM // HEADS)
    return attnopt.kernels.AttentionSpec.from_tensors(q, q, q, causal=True, key_padding=keep)


def test_sites_whose_padding_leaves_every_row_a_key_or_whose_fill_is_factored_are_timed_neutrally(
        monkeypatch, tmp_path):
    seen = timed_paddings(monkeypatch)
    # right padding: every causal row sees its first key
    report = run(PaddedAttention(softcap=30.0), padded(left=False), tmp_path / "right")
    assert seen and all(padding is None for padding in seen)
    assert "captured batch's key padding" not in report.sites[0].reason
    # no softcap: an added fill's rows without a key take factored gradients, a constant few ops
    seen.clear()
    report = run(PaddedAttention(softcap=None), padded(left=True), tmp_path / "plain")
    assert seen and all(padding is None for padding in seen)
    # inference: no gradients at all
    seen.clear()
    report = run(PaddedAttention(softcap=30.0), padded(left=True), tmp_path / "eval", train=False)
    assert seen and all(padding is None for padding in seen)


def test_the_tuning_cache_tells_paddings_apart_by_their_share_of_rows_without_keys():
    keep = padded(left=True).bool()
    spec = _spec_with(keep)
    neutral = tuning.cache_key(spec)
    left = tuning.cache_key(spec, padding=keep)
    assert neutral != left
    fewer = keep.clone()
    fewer[2] = True  # one left-padded batch row less: a smaller share
    assert tuning.cache_key(spec, padding=fewer) != left
    assert tuning.cache_key(spec, padding=keep.clone()) == left


def test_timed_rows_are_spread_over_the_batch():
    keep = torch.arange(8)[:, None] < torch.arange(8)[None, :]  # row b keeps keys after b
    assert torch.equal(tuning.spread_rows(keep, 8), keep)
    assert torch.equal(tuning.spread_rows(keep, 2), keep[[0, 7]])
    assert tuning.spread_rows(None, 2) is None


def test_example_values_evaluate_small_pure_nodes_of_the_inputs_only(monkeypatch):
    """``graph.ExampleValues`` evaluates pure ops of the example inputs; not what is above ``UNCACHED_BYTES`` (a
    ``[B, 1, N, N]`` mask at a long length), nor anything computed from it, nor impure ops."""
    from attnopt.passes import graph

    def f(mask):
        square = mask[:, None, None, :].expand(-1, 1, N, -1).clone()  # [B, 1, N, N]
        return square[:, :, -1, :] == 0, mask[:, None, None, :] == 0, torch.rand_like(mask, dtype=torch.float) > 0.5

    gm = torch.fx.symbolic_trace(f)
    mask = padded(left=True)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(mask)
    for node in gm.graph.nodes:  # dynamo's record of each value, as the passes read it
        if hasattr(node.meta.get("tensor_meta"), "shape"):
            node.meta["val"] = torch.empty(node.meta["tensor_meta"].shape, dtype=node.meta["tensor_meta"].dtype,
                                           device="meta")
    through_square, direct, random = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    examples = graph.ExampleValues(gm.graph, graph.placeholder_values(gm, [mask]))
    assert torch.equal(examples.example(direct), (mask == 0)[:, None, None, :])
    assert examples.example(random) is None
    assert torch.equal(examples.example(through_square), (mask == 0)[:, None])
    monkeypatch.setattr(graph, "UNCACHED_BYTES", B * N * N - 1)  # the square mask is now too large
    examples = graph.ExampleValues(gm.graph, graph.placeholder_values(gm, [mask]))
    assert examples.example(through_square) is None
    assert torch.equal(examples.example(direct), (mask == 0)[:, None, None, :])


def test_example_values_that_cannot_be_read_give_no_hint():
    """Example inputs without data (meta tensors) leave the site timed neutrally: a hint never stops a rewrite."""
    from attnopt.passes import plan

    class Match:  # what captured_padding reads of a match
        class masks:
            key_padding = [type("Atom", (), {"node": None, "negated": False})()]

    keep = padded(left=True).bool()

    class Meta:
        def example(self, node):
            return torch.empty(keep.shape, dtype=torch.bool, device="meta")

    class Real:
        def example(self, node):
            return keep

    spec = _spec_with(keep).with_(requires_grad=True, softcap=30.0, fill=attnopt.kernels.Fill.FINITE_ADDED)
    assert plan.captured_padding(Match, spec, Meta()) is None
    assert torch.equal(plan.captured_padding(Match, spec, Real()), keep)
