"""Training through the op: layouts that inductor checks, and gradients of gradients (issue 10, item 16)."""

import pytest
import torch
from torch import nn

import attnopt

DIM, HEADS = 16, 2


class PackedQKV(nn.Module):
    """The standard packed projection: q, k, v are strided views of one ``qkv`` tensor."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        a = torch.softmax(q @ k.transpose(-1, -2) * (c // HEADS) ** -0.5, dim=-1) @ v  # [B, H, N, D]
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


def _packed(b=2, n=8, d=8):
    """q, k, v ``[B, H, N, D]`` as the permute above leaves them: not contiguous, not dense."""
    return torch.randn(b, n, 3, HEADS, d, dtype=torch.float64).permute(2, 0, 3, 1, 4)


def _op_args(q, k, v, kernel, bias=None):
    return (q, k, v, None, None, None, bias, None, q.shape[-1] ** -0.5, False, "top_left", None, None, None, 0.0,
            "safe", kernel)


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
def test_forward_fake_matches_real_layout(kernel):
    q, k, v = _packed()
    torch.library.opcheck(torch.ops.attnopt.attention.default, _op_args(q, k, v, kernel),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])  # sdpa_cpu's backward recomputes under autograd
def test_backward_fake_matches_real_layout(kernel, bias):
    q, k, v = _packed()
    b = torch.randn(1, HEADS, 1, 8, dtype=torch.float64).expand(2, HEADS, 8, 8) if bias else None  # stride 0
    args = _op_args(q, k, v, kernel, b)
    out, lse, seed = torch.ops.attnopt.attention(*args)
    grad_out = torch.randn(2, 8, HEADS, 8, dtype=torch.float64).transpose(1, 2)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default,
                          (grad_out, q, k, v, out, lse, seed, *args[3:], bias, False),  # needs bias/mask grad
                          test_utils=("test_faketensor",))


@pytest.fixture
def fresh_inductor():
    """Compile for real: a warm on-disk cache may hold code compiled against an older fake implementation."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _grads(model, x):
    return torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])


@pytest.mark.parametrize("route", ["backend", "optimize"])
def test_backward_through_inductor_with_the_packed_layout(route, fresh_inductor):
    torch.manual_seed(0)
    model = PackedQKV()
    x = torch.randn(2, 8, DIM, requires_grad=True)
    expected = _grads(model, x)
    if route == "backend":
        report = attnopt.Report()
        compiled = torch.compile(model, backend="attnopt", options={"report": report, "kernel": "reference"})
    else:
        compiled = attnopt.optimize(model, compiler="inductor", kernel="reference")
        report = compiled.attnopt_report
    got = _grads(compiled, x)
    assert [s.replaced for s in report.sites] == [True], str(report)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _penalty_grads(model, x):
    """A gradient penalty (WGAN-GP, R1): the norm of d out / d x, differentiated again."""
    (dx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(dx.square().sum(), [x, *model.parameters()])


@pytest.mark.parametrize("route", ["optimize", "backend"])
def test_double_backward_matches_eager(route):
    torch.manual_seed(0)
    model = PackedQKV().double()
    x = torch.randn(2, 8, DIM, dtype=torch.float64, requires_grad=True)
    expected = _penalty_grads(model, x)
    options = {"kernel": "reference"}  # the planner's choice follows timings; the test is about the op
    if route == "optimize":
        compiled = attnopt.optimize(model, **options)
        report = compiled.attnopt_report
    else:  # inductor's compiled backward cannot be differentiated again (torch.compile's limit): run the graph
        report = attnopt.Report()
        compiled = torch.compile(model, backend="attnopt", options={"report": report, "compiler": "eager", **options})
    got = _penalty_grads(compiled, x)
    assert [s.replaced for s in report.sites] == [True], str(report)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


def _eager(q, k, v, bias, keep):
    """GQA attention with a bias and an additive ``finfo.min`` key-padding mask, as older HF models write it."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    padding = torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, torch.finfo(s.dtype).min)  # [B, Nk]
    return torch.softmax(s + padding[:, None, None, :], dim=-1) @ v


def test_double_backward_of_the_op_with_terms_and_empty_rows():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 6, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)
    bias = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    keep = torch.tensor([[False] * 6, [True] * 4 + [False] * 2])  # batch 0 sees no key: uniform rows
    weight = torch.randn(2, 4, 6, 8, dtype=torch.float64)

    def second(function):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        first = torch.autograd.grad((function(*leaves) * weight).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), leaves)

    expected = second(lambda q, k, v, b: _eager(q, k, v, b, keep))
    got = second(lambda q, k, v, b: attnopt.attention(q, k, v, bias=b, key_padding_mask=keep, fill="finite_added",
                                                      kernel="reference"))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


def test_double_backward_with_dropout_says_what_to_do():
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    out = attnopt.attention(q, k, v, dropout_p=0.5, kernel="reference")
    with pytest.raises(NotImplementedError, match="dropout.*model.eval"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
