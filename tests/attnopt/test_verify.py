"""``verify=True`` (issue 15): the original and the rewritten graph run once on the first inputs; a site whose
replacement changes the outputs gets its original code back, with a warning naming it."""

import warnings

import pytest
import torch
from torch import nn

import attnopt
from attnopt.kernels import registry

DIM, HEADS, N = 16, 2, 8


class TwoSites(nn.Module):
    """A causal self-attention (``tril`` buffer) followed by a full one, each in its own submodule."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.causal, self.full = Attention(causal=True, dropout=dropout), Attention(causal=False, dropout=dropout)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1  # written in place by the graph: verification must not advance it
        return self.full(self.causal(x))


class Attention(nn.Module):
    def __init__(self, causal: bool, dropout: float):
        super().__init__()
        self.qkv, self.proj, self.is_causal, self.drop = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM), causal, dropout
        self.register_buffer("tril", torch.ones(N, N, dtype=torch.bool).tril())

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        s = q @ k.transpose(-1, -2) * (c // HEADS) ** -0.5
        if self.is_causal:
            s = s.masked_fill(~self.tril[:n, :n], float("-inf"))
        p = nn.functional.dropout(torch.softmax(s, dim=-1), self.drop, self.training)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))


def _x():
    return torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def causal_ignored(monkeypatch):
    """The reference kernel made wrong: it drops the causal mask (a misread mask, as a detection bug would)."""
    kernel = type(registry.get("reference"))
    right = kernel.forward

    def wrong(self, q, k, v, spec, seed):
        return right(self, q, k, v, spec.with_(causal=False) if spec.causal else spec, seed)

    monkeypatch.setattr(kernel, "forward", wrong)


def _optimized(**options):
    torch.manual_seed(0)
    model = TwoSites().eval()
    reference = TwoSites().eval()
    reference.load_state_dict(model.state_dict())
    return attnopt.optimize(model, kernel="reference", **options), reference


def test_a_site_whose_replacement_differs_gets_its_original_code_back(causal_ignored):
    optimized, reference = _optimized(verify=True)
    with pytest.warns(attnopt.AttnoptWarning, match=r"verify: replacing the attention at causal .*reference"):
        got = optimized(_x())
    torch.testing.assert_close(got, reference(_x()))
    causal, full = optimized.attnopt_report.sites
    assert causal.where == "causal" and not causal.replaced and causal.reason.startswith("verify:"), causal
    assert full.where == "full" and full.replaced and "verified on the first inputs" in full.notes, full
    assert optimized.calls.item() == 1  # the graph ran once for the caller, its copies for verification
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        torch.testing.assert_close(optimized(_x() * 2), reference(_x() * 2))
    assert not [w for w in later if issubclass(w.category, attnopt.AttnoptWarning)]


def test_without_verify_the_wrong_kernel_goes_unnoticed(causal_ignored):
    """The control: the forced fault does change the outputs, so the test above can fail."""
    optimized, reference = _optimized()
    got = optimized(_x())
    assert all(s.replaced for s in optimized.attnopt_report.sites)
    assert not torch.allclose(got, reference(_x()), atol=1e-3)


def test_right_kernels_are_verified_and_kept():
    optimized, reference = _optimized(verify=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.testing.assert_close(optimized(_x()), reference(_x()))
    assert not [w for w in record if issubclass(w.category, attnopt.AttnoptWarning)]
    assert all(s.replaced and "verified on the first inputs" in s.notes for s in optimized.attnopt_report.sites)
    assert optimized.calls.item() == 1


def test_a_random_graph_is_not_verified_and_says_so():
    torch.manual_seed(0)
    model = attnopt.optimize(TwoSites(dropout=0.5).train(), kernel="reference", verify=True)
    model(_x())
    sites = model.attnopt_report.sites
    assert sites and all(any(note.startswith("not verified") for note in s.notes) for s in sites if s.replaced)


def test_the_backend_verifies_too(causal_ignored):
    torch.manual_seed(0)
    model = TwoSites().eval()
    compiled = torch.compile(model, backend=attnopt.Backend(compiler="eager", kernel="reference", verify=True))
    with pytest.warns(attnopt.AttnoptWarning, match="causal"):
        torch.testing.assert_close(compiled(_x()), model.full(model.causal(_x())))
    assert [s.replaced for s in attnopt.report_of(compiled).sites] == [False, True]


@pytest.fixture
def backward_wrong(monkeypatch):
    """The reference kernel's backward made wrong (dq doubled) while its forward stays right."""
    kernel = type(registry.get("reference"))
    right = kernel.backward

    def wrong(self, *args, **kwargs):
        dq, *rest = right(self, *args, **kwargs)
        return (dq * 2, *rest)

    monkeypatch.setattr(kernel, "backward", wrong)


def test_a_training_graph_is_verified_by_its_gradients_too(backward_wrong):
    """A replacement whose forward is right but backward wrong is found by the gradients and restored: the
    model trains as the original does."""
    torch.manual_seed(0)
    model = TwoSites().train()
    reference = TwoSites().train()
    reference.load_state_dict(model.state_dict())
    optimized = attnopt.optimize(model, kernel="reference", verify=True)
    x = _x().requires_grad_(True)
    with pytest.warns(attnopt.AttnoptWarning, match=r"verify: replacing the attention at (causal|full)"):
        got = optimized(x)
    want = reference(x)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [x, *model.parameters()], g),
                    torch.autograd.grad(want, [x, *reference.parameters()], g)):
        torch.testing.assert_close(a, b)
    assert not any(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)


def test_right_training_graphs_are_verified_and_kept():
    torch.manual_seed(0)
    model = TwoSites().train()
    optimized = attnopt.optimize(model, kernel="reference", verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnopt.AttnoptWarning)
        optimized(_x().requires_grad_(True)).sum().backward()
    sites = optimized.attnopt_report.sites
    assert sites and all(s.replaced and "verified on the first inputs" in s.notes for s in sites), str(sites)
