"""Activation checkpointing: attention inside ``torch.utils.checkpoint`` regions is found and replaced.

Dynamo captures a non-reentrant checkpoint as a higher-order op whose body is a subgraph; the pass
rewrites the body, so the recomputation in the backward runs the kernel too. Reentrant checkpoints
run their function eagerly inside dynamo's graph and are rewritten as ordinary code.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnopt
from attnopt.passes import plan

from .test_zoo import CASES

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_llama_trains_as_the_original(reentrant, monkeypatch):
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: rows that see no key
    for _ in range(2):
        expected = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        got = optimized(input_ids=ids, attention_mask=mask, labels=ids).loss
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for a, b in zip(model.parameters(), optimized.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)
    sites = optimized.attnopt_report.sites
    assert len(sites) == 2 and all(s.replaced for s in sites), str(optimized.attnopt_report)


def _capture(model, *args, keep: bool = False, **kwargs):
    """The model's graph as dynamo captures it, after the pass, and the report; the model runs once through it.
    Every site is replaced, or (``keep``) every site is left as written: the original measures faster."""
    from attnopt.config import Options
    from attnopt.passes import pipeline
    from attnopt.report import Report

    captured = {}

    def backend(gm, example_inputs):
        report = Report()
        saved = plan.versus_original
        plan.versus_original = lambda best, original, n=1: (not keep, "decided by the test")
        try:
            pipeline.optimize_graph(gm, Options.build(tune=False, keep_original=keep), report)
        finally:
            plan.versus_original = saved
        captured.update(gm=gm, report=report)
        return gm

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return captured["gm"], captured["report"], out


def _regions(gm):
    hop = torch.ops.higher_order.tag_activation_checkpoint
    return [(n, getattr(gm, n.args[0].target)) for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]


def _placeholders(body):
    return [n for n in body.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_layers_read_the_mask_built_outside(reentrant):
    """HF builds one 4D mask per forward and hands it to every checkpointed layer: each layer's attention is read
    as causal + key padding from the 2D attention_mask, and the 4D mask is no longer built."""
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    # use_cache=False: with the config's default, HF warns through a logger, which dynamo cannot capture
    gm, report, out = _capture(twin, input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    assert [s.found for s in report.sites] == ["causal+key_padding+gqa"] * 2, str(report)
    assert all(s.replaced for s in report.sites), str(report)
    assert not any(n.target is torch.where for n in gm.graph.nodes), "the outer 4D mask is still built"
    for node, body in _regions(gm):
        placeholders = _placeholders(body)
        assert len(placeholders) == len(node.args) - 1
        shapes = [tuple(p.meta["example_value"].shape) for p in placeholders if "example_value" in p.meta]
        assert (2, 1, 12, 12) not in shapes and (2, 12) in shapes  # the 2D attention_mask, not the 4D one
    expected = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)


def test_a_site_left_alone_keeps_its_region_as_it_was():
    """Nothing copied into a region stays when its attention is left as written: same inputs, same body."""
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    plain, report, _ = _capture(copy.deepcopy(model), keep=True, input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(report.sites) == 2 and not any(s.replaced for s in report.sites), str(report)
    bodies = [(len(node.args), [n.format_node() for n in body.graph.nodes]) for node, body in _regions(plain)]
    assert len(bodies) == 2

    def as_written(gm, example_inputs):
        captured["gm"] = gm
        return gm

    captured = {}
    torch._dynamo.reset()
    torch.compile(copy.deepcopy(model), backend=as_written, fullgraph=True)(input_ids=ids, attention_mask=mask,
                                                                           use_cache=False)
    original = [(len(node.args), [n.format_node() for n in body.graph.nodes]) for node, body in _regions(captured["gm"])]
    assert bodies == original
    assert any(n.target is torch.where for n in plain.graph.nodes)  # the 4D mask is built, as it was


class _Layer(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask
        return torch.softmax(scores, dim=-1) @ v


class _Model(torch.nn.Module):
    """One checkpointed layer; the causal mask is built outside it, in place or not."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.layer, self.in_place = _Layer(), in_place

    def forward(self, x):
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        if self.in_place:
            mask = torch.zeros(n, n)
            mask.masked_fill_(future, float("-inf"))
        else:
            mask = torch.zeros(n, n).masked_fill(future, float("-inf"))
        return torch.utils.checkpoint.checkpoint(self.layer, x, mask, use_reentrant=False)


@pytest.mark.parametrize("in_place", [False, True], ids=["built", "written_in_place"])
def test_a_mask_written_in_place_outside_is_not_copied_in(in_place):
    """A mask built by pure ops outside the region is read as causal; one written in place there is passed in as
    it is (copying its construction would drop the write) and read as a dense mask: the output is the original's
    either way."""
    torch.manual_seed(0)
    model = _Model(in_place)
    x = torch.randn(2, 10, 16, requires_grad=True)
    gm, report, out = _capture(copy.deepcopy(model), x)
    assert [s.found for s in report.sites] == (["dense"] if in_place else ["causal"]), str(report)
    assert all(s.replaced for s in report.sites), str(report)
    expected = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (grad_out,) = torch.autograd.grad(out.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_out, grad_expected, atol=1e-5, rtol=1e-5)


class _DropoutLayer(_Layer):
    def __init__(self, d=16):
        super().__init__(d)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, mask):
        return self.drop(super().forward(x, mask))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_dropout_in_a_checkpointed_region_is_recomputed_with_the_same_masks(compiler, request):
    """The backward recomputes a checkpointed region with the random state of its forward, as the original
    does: the gradients through a dropout inside it are the original's. (torch's eager implementation of the
    region's op does not restore that state; a graph run as Python runs ``torch.utils.checkpoint`` instead.)
    Inductor draws its own random numbers unless told to fall back to eager's, as here."""
    if compiler == "inductor":
        import torch._inductor.config as inductor_config

        patch = inductor_config.patch(fallback_random=True)  # the config module's own patch: undone exactly
        patch.__enter__()
        request.addfinalizer(lambda: patch.__exit__(None, None, None))
    torch.manual_seed(0)
    model = _Model(in_place=False)
    model.layer = _DropoutLayer()
    model.train()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False, compiler=compiler)
    x = torch.randn(2, 10, 16)
    for _ in range(2):
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        got = optimized(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(got)
        want = torch.autograd.grad(expected, list(model.parameters()), g)
        have = torch.autograd.grad(got, list(optimized.parameters()), g)
        for a, b in zip(have, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sites = optimized.attnopt_report.sites
    assert sites and all(s.replaced and s.found == "causal" for s in sites), str(optimized.attnopt_report)


class _Router(torch.nn.Module):
    """A mixture-of-experts router: a softmax over gate logits plus a penalty built outside, not attention."""

    def __init__(self, d=16, experts=4):
        super().__init__()
        self.gate, self.experts = torch.nn.Linear(d, experts), torch.nn.Linear(d, experts * d)

    def forward(self, x, penalty):
        weights = torch.softmax(self.gate(x) + penalty, dim=-1)  # [B, N, E]
        outs = self.experts(x).view(*x.shape[:2], weights.shape[-1], -1)  # [B, N, E, D]
        return (weights.unsqueeze(-1) * outs).sum(2)


class _RoutedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = _Router()

    def forward(self, x):
        penalty = torch.zeros(4).masked_fill(torch.arange(4) > 2, float("-inf"))  # built outside, as masks are
        return torch.utils.checkpoint.checkpoint(self.router, x, penalty, use_reentrant=False)


def test_a_checkpointed_router_is_left_alone():
    """Copying a region's inputs into it finds no attention where there is none: a router's softmax over a
    penalty built outside stays as written, and the region computes what it did."""
    torch.manual_seed(0)
    model = _RoutedModel()
    x = torch.randn(2, 10, 16, requires_grad=True)
    gm, report, out = _capture(copy.deepcopy(model), x)
    assert [(s.replaced, s.reason.split(' [at')[0].endswith('not attention')) for s in report.sites] == [(False, True)]
    ((node, body),) = _regions(gm)
    assert len(_placeholders(body)) == len(node.args) - 1
    assert not any(p.name.startswith("lifted_") for p in _placeholders(body))
    expected = model(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
