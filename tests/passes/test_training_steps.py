"""Training steps: an optimized HF Llama trains as the original does, step after step.

Three optimizer steps on the same data from the same weights, the original against the optimized
copy (SGD with momentum: its update is linear in the gradients, so rounding differences stay rounding;
AdamW divides by the gradients' own scale and turns a rounding difference on a near-zero gradient into a
whole step, which the AdamW test compares through the losses), with the switches a training script flips: gradient accumulation, ``torch.autocast``
(bfloat16; float16 with a ``GradScaler``), activation checkpointing in both modes, ``train()`` /
``eval()`` between steps, and the ``torch.compile`` backend. Losses and parameters must agree after
every step within rounding. Every site must have been replaced (the planner's choice is forced), so
the comparison is between the original code and attnopt's kernels.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnopt
from attnopt.passes import plan

from .test_zoo import CASES

transformers = pytest.importorskip("transformers")

STEPS = 3


@pytest.fixture(autouse=True)
def replace_every_site(monkeypatch):
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))


def _batches(device="cpu", n=12):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(2 * STEPS):
        ids = torch.randint(0, 100, (2, n), generator=g)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, : int(torch.randint(0, n // 2, (), generator=g))] = 0  # left padding, sometimes none
        out.append((ids.to(device), mask.to(device)))
    return out


def _train(model, batches, *, accumulate=1, autocast=None, scaler=None, eval_between=False, compile_backend=False,
           adamw=False, reports: list | None = None):
    """Losses of ``STEPS`` optimizer steps (each over ``accumulate`` micro-batches); the model's weights change.
    ``reports``: receives the attnopt report of the compiled model (``compile_backend``)."""
    model.train()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if adamw
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run = torch.compile(model, backend="attnopt") if compile_backend else model
    losses, grads, it = [], [], iter(batches)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            ids, mask = next(it)
            ctx = torch.autocast(ids.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                loss = run(input_ids=ids, attention_mask=mask, labels=ids).loss / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            losses.append(loss.detach().float())
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if eval_between:
            model.eval()
            with torch.no_grad():
                ids, mask = batches[0]
                losses.append(run(input_ids=ids, attention_mask=mask, labels=ids).loss.detach().float())
            model.train()
    if reports is not None:
        reports.append(attnopt.report_of(run))
    return torch.stack(losses), grads


CASES_TRAIN = {
    "plain": dict(),
    "adamw": dict(adamw=True),
    "accumulate": dict(accumulate=2),
    "eval_between": dict(eval_between=True),
    "bfloat16_autocast": dict(autocast=torch.bfloat16),
    "float16_autocast_scaler": dict(autocast=torch.float16, scaler=True),
    "checkpoint_non_reentrant": dict(checkpoint=False),
    "checkpoint_reentrant": dict(checkpoint=True),
}


@pytest.mark.parametrize("case", list(CASES_TRAIN))
def test_steps_match_the_original(case):
    kwargs = dict(CASES_TRAIN[case])
    torch.manual_seed(0)
    model = CASES["hf_llama"].build()
    if "checkpoint" in kwargs:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": kwargs.pop("checkpoint")})
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    half = kwargs.get("autocast") is not None
    if kwargs.pop("scaler", False):
        kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        expected_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = _batches()
    got, got_grads = _train(optimized, batches, **kwargs)
    if "scaler" in kwargs:
        kwargs["scaler"] = expected_scaler
    expected, expected_grads = _train(model, batches, **kwargs)
    # half-precision autocast: the kernels and eager round the half products differently, and three
    # optimizer steps carry those differences into the weights
    tol = 3e-2 if half else 2e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    for step, (mine, theirs) in enumerate(zip(got_grads, expected_grads)):  # every step's gradients, per tensor
        for (name, _), g, e in zip(model.named_parameters(), mine, theirs):
            error = ((g.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)).item()
            assert error < (3e-2 if half else 1e-4), f"step {step}, {name}: relative gradient error {error:.2e}"
    if not kwargs.get("adamw"):
        for (name, a), b in zip(model.named_parameters(), optimized.parameters()):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
    sites = optimized.attnopt_report.sites
    # every layer's attention, read with its causal padding mask (a checkpointed layer receives that mask built
    # outside it), replaced
    assert len({s.where for s in sites}) == 2 and all(s.replaced for s in sites), str(optimized.attnopt_report)
    assert all({"causal", "key_padding"} <= set(s.mask_terms) for s in sites), str(optimized.attnopt_report)


def test_backend_steps_match_the_original():
    """``torch.compile(backend="attnopt")`` (inductor around the rewrite) over the same three steps."""
    torch.manual_seed(0)
    model = CASES["hf_llama"].build()
    twin = copy.deepcopy(model)
    batches = _batches()
    reports = []
    got, _ = _train(twin, batches, compile_backend=True, reports=reports)
    expected, _ = _train(model, batches)
    sites = reports[0].sites  # the rewrite ran under inductor: both layers, with their causal padding mask
    assert len({s.where for s in sites}) == 2 and all(s.replaced for s in sites), str(reports[0])
    assert all({"causal", "key_padding"} <= set(s.mask_terms) for s in sites), str(reports[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["plain", "bfloat16_autocast", "checkpoint_non_reentrant"])
def test_steps_match_the_original_on_cuda(case):
    """The same steps on the GPU, where the Triton and SDPA backends run the sites."""
    kwargs = dict(CASES_TRAIN[case])
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().cuda()
    if "checkpoint" in kwargs:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": kwargs.pop("checkpoint")})
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    batches = _batches("cuda")
    got, got_grads = _train(optimized, batches, **kwargs)
    expected, expected_grads = _train(model, batches, **kwargs)
    tol = 3e-2 if "autocast" in kwargs else 1e-3  # float32 products may run as tf32 on either side
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    for mine, theirs in zip(got_grads, expected_grads):
        for g, e in zip(mine, theirs):
            assert ((g.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)).item() < tol * 3
    assert all(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)


@pytest.mark.parametrize("with_padding", [False, True])
def test_output_projection_reads_the_kernels_output_without_a_copy(with_padding):
    """A training step keeps the output projection's input for its backward. With the kernel's output laid out
    like the queries, the layer's ``transpose(1, 2).reshape`` is a view of the output attention saved anyway,
    not a copy of it (one ``[N, hidden]`` tensor per layer). The gradients stay the original's."""
    from .test_dynamic_detect import tiny_llama, tokens

    model = tiny_llama().train()
    optimized = attnopt.optimize(copy.deepcopy(model), kernel="triton_flash")
    inputs = tokens(2, 40)
    if not with_padding:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    seen = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for layer in optimized.layers]
    out = optimized(**inputs).last_hidden_state
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(optimized.layers)
    assert all(x._base is not None and x._base.transpose(1, 2).is_contiguous() for x in seen), \
        "the output projection's input is a copy of the attention output"
    want = model(**inputs).last_hidden_state
    keep = inputs["attention_mask"].bool()  # padded query rows: the original's own arbitrary values
    torch.testing.assert_close(out[keep], want[keep], atol=1e-4, rtol=1e-4)
    out[keep].square().sum().backward()
    want[keep].square().sum().backward()
    for (name, a), b in zip(optimized.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)
