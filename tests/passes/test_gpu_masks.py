"""Every mask-algebra path with CUDA inputs, through ``attnopt.optimize``.

The mask analysis evaluates what builds a mask (aranges, buffers, constants,
the user's ``attention_mask``) where the graph's tensors live; on CUDA that
path crashed where the CPU suite was green (issue 9: an HF Llama called
without ``attention_mask`` failed in the ALiBi recognition). For each family
(ALiBi, sliding windows, softcap, additive and buffer-built causal masks,
documents, dense bool and float masks, key padding with fully padded rows,
GQA / MQA, HF Llama and Mistral with and without ``attention_mask``) on CUDA:
the analysis finds the same terms as on the CPU, and the output (and, in
training, the gradients) are as close to a float64 copy of the model as eager
PyTorch's in the same dtype. Twice: as the planner chooses (each site
replaced, or kept where the original is no slower), and with ``triton_flash``
forced, so that the CUDA kernel runs every family whatever the timings say.
"""

from __future__ import annotations

import os

import copy
import math

import pytest
import torch

import attnopt

from . import models
from .test_zoo import (
    CASES, LLAMA, Case, assert_as_accurate_as_eager, assert_planned, first_tensor, hf, on_cuda, padded_tokens,
)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu

DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in (torch.float32, torch.bfloat16, torch.float16)]
#: "auto": the planner's choice; a kernel name: forced, so every site runs it
KERNELS = ["auto", "triton_flash"]
#: ATTNOPT_GPU_FULL=1 runs every family x dtype x kernel; by default the half dtypes with the planner's
#: choice and bfloat16 with the Triton kernel forced, so the GPU suite fits one device run
FULL = os.environ.get("ATTNOPT_GPU_FULL", "") == "1"


def _in_default_run(dtype, kernel) -> bool:
    return FULL or (kernel == "auto" and dtype != torch.float32) or (kernel != "auto" and dtype == torch.bfloat16)


RUNS = [pytest.param(dt.values[0], kernel, id=f"{dt.id}-{kernel}") for dt in DTYPES for kernel in KERNELS
        if _in_default_run(dt.values[0], kernel)]


# ------------------------------------------------------------------ masks built on the input's device
# models.py builds these masks with ``torch.arange(n)`` / ``torch.full`` on the CPU, which eager PyTorch cannot
# combine with CUDA scores; the same spellings with ``device=x.device`` (and the input's dtype), as models on GPUs
# write them.
class AlibiOnDevice(models.Alibi):
    """ALiBi: per-head slope x key distance, a buffer of slopes, added to causal scores."""

    def forward(self, x):
        q, k, v = self.split(x)
        pos = torch.arange(x.shape[1], device=x.device)
        distance = (pos[None, :] - pos[:, None]).to(x.dtype)  # [Nq, Nk]: j - i
        bias = self.slopes[:, None, None] * distance  # [H, Nq, Nk]
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + bias
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


class SlidingWindowOnDevice(models.SlidingWindow):
    """A causal window of 3 keys from aranges, masked with finfo.min."""

    def forward(self, x):
        q, k, v = self.split(x)
        i = torch.arange(x.shape[1], device=x.device)[:, None]
        j = torch.arange(x.shape[1], device=x.device)[None, :]
        masked = (j > i) | (j < i - 2)
        scores = (q @ k.mT / math.sqrt(self.head_dim)).masked_fill(masked, torch.finfo(x.dtype).min)
        return self.merge(scores.softmax(-1) @ v)


class SoftcappedOnDevice(models.Softcapped):
    """Gemma-2 softcap, then an additive -inf causal mask built by triu."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        scores = torch.tanh(q @ k.transpose(-1, -2) * self.head_dim**-0.5 / 5.0) * 5.0
        scores = scores + torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        return self.merge(scores.softmax(-1) @ v)


class Bmm3DOnDevice(models.Bmm3D):
    """[B*H, N, D] bmm, baddbmm with an additive causal mask."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * self.heads, n, self.head_dim) for t in self.split(x))  # [B*H, N, D]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        scores = torch.baddbmm(causal.expand(b * self.heads, n, n), q * self.head_dim**-0.5, k.transpose(1, 2))
        y = torch.bmm(scores.softmax(-1), v).view(b, self.heads, n, self.head_dim)
        return self.merge(y)


# ------------------------------------------------------------------ inputs
def x_only():
    return (torch.randn(2, 12, 32),), {}


def fully_padded_keep():
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 9:] = False
    keep[1] = False  # every key of batch 1 padded: those rows take the fill of the model's choice
    return keep


def with_documents():
    ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [0] * 12])
    return (torch.randn(2, 12, 32), ids), {}


def with_bool_mask():
    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    keep |= torch.eye(12, dtype=torch.bool)  # every row sees a key: SDPA and eager agree there
    return (torch.randn(2, 12, 32), keep), {}


def tokens_without_mask():
    _, kwargs = padded_tokens()()
    return (), {"input_ids": kwargs["input_ids"]}


MISTRAL = hf(transformers.MistralConfig, transformers.MistralForCausalLM, **LLAMA, sliding_window=4,
             attn_implementation="eager")
LLAMA_EAGER = CASES["hf_llama"].build

MASKS = {
    "alibi": Case(AlibiOnDevice, x_only, ("bias", "causal")),
    "sliding_window": Case(SlidingWindowOnDevice, x_only, ("causal", "window")),
    "softcap_additive_causal": Case(SoftcappedOnDevice, x_only, ("causal", "softcap")),
    "baddbmm_additive_causal": Case(Bmm3DOnDevice, x_only, ("causal",)),
    "tril_buffer": CASES["nanogpt_tril_buffer"],
    "arange_where": CASES["where_arange_causal"],
    "documents": Case(models.Documents, with_documents, ("document",)),
    "dense_bool": Case(lambda: models.SDPAModel(mode="mask"), with_bool_mask, ("dense",)),
    "dense_float": CASES["float_padding_input"],
    "key_padding_additive": CASES["bert_style_bool_padding"],
    "key_padding_finfo_fully_padded": Case(models.FinfoMaskedFill,
                                           lambda: ((torch.randn(2, 12, 32), fully_padded_keep()), {}),
                                           ("key_padding",)),
    "key_padding_neg_inf_fully_padded": Case(
        models.CrossAttention, lambda: ((torch.randn(2, 12, 32), torch.randn(2, 12, 32), fully_padded_keep()), {}),
        ("cross", "key_padding")),
    "gqa_repeat_interleave": CASES["gqa_repeat_interleave"],
    "gqa_expand_flatten": CASES["gqa_expand_flatten"],
    "mqa_broadcast": CASES["mqa_broadcast"],
    "sdpa_gqa": CASES["sdpa_gqa"],
    "hf_llama_no_attention_mask": Case(LLAMA_EAGER, tokens_without_mask, ("causal", "gqa"), sites=2, kv_heads=2),
    "hf_llama_left_padding": CASES["hf_llama"],
    "hf_mistral_no_attention_mask": Case(MISTRAL, tokens_without_mask, ("causal", "gqa", "window"), sites=2,
                                         kv_heads=2),
    "hf_mistral_left_padding": CASES["hf_mistral"],
}

#: families whose backward runs in training (fp32): every row sees a key or takes a finite fill
TRAINED = ["alibi", "sliding_window", "softcap_additive_causal", "documents", "dense_bool",
           "key_padding_finfo_fully_padded", "gqa_expand_flatten", "hf_llama_no_attention_mask",
           "hf_mistral_left_padding"]


def _models(case: Case, dtype: torch.dtype):
    torch.manual_seed(0)
    model = case.build().to("cuda", dtype)
    return model, copy.deepcopy(model).double()  # float64: the same rounded weights


def _found(report) -> list[tuple[str, ...]]:
    return [tuple(sorted(s.found.split("+"))) for s in report.sites]


def _expected(name: str, dtype: torch.dtype) -> list[tuple[str, ...]]:
    """The terms the CPU suite finds, per site. A mask adding ``finfo.min`` in float16 (where the sum does
    not absorb the scores exactly) is still named for its structure; the term is added as written."""
    case = MASKS[name]
    return [tuple(sorted(case.terms))] * case.sites


def _optimize(model, kernel: str):
    return attnopt.optimize(model) if kernel == "auto" else attnopt.optimize(model, kernel=kernel)


def _check_sites(report, name: str, dtype: torch.dtype, kernel: str) -> None:
    case = MASKS[name]
    assert_planned(report, case.sites)
    if kernel != "auto":
        assert all(s.replaced and s.kernel == kernel for s in report.sites), str(report)
    assert _found(report) == _expected(name, dtype), str(report)
    if case.kv_heads is not None:
        assert all(s.kv_heads == case.kv_heads for s in report.sites), str(report)


@pytest.mark.parametrize("dtype, kernel", RUNS)
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_family_on_cuda(name, dtype, kernel):
    """Inference: the terms found on the CPU, each site planned, as accurate as eager against float64."""
    case = MASKS[name]
    model, reference = _models(case, dtype)
    model.eval()
    reference.eval()
    args, kwargs = case.inputs()
    args, kwargs = on_cuda(args, kwargs, dtype)
    args64, kwargs64 = on_cuda(args, kwargs, torch.float64)
    with torch.no_grad():
        expected = first_tensor(model(*args, **kwargs))
        truth = first_tensor(reference(*args64, **kwargs64))
        optimized = _optimize(model, kernel)
        got = first_tensor(optimized(*args, **kwargs))
    report = optimized.attnopt_report
    _check_sites(report, name, dtype, kernel)
    if name == "alibi" and dtype == torch.float32:  # half-precision slopes x distance are not exactly linear
        assert any("ALiBi" in note for note in report.sites[0].notes), str(report)
    assert_as_accurate_as_eager(got, expected, truth, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", TRAINED)
def test_mask_family_gradients_on_cuda(name, kernel):
    """Training in float32: the parameters' gradients are as accurate as eager's against float64."""
    case = MASKS[name]
    model, reference = _models(case, torch.float32)
    model.train()
    reference.train()
    args, kwargs = case.inputs()
    args, kwargs = on_cuda(args, kwargs, torch.float32)
    args64, kwargs64 = on_cuda(args, kwargs, torch.float64)
    weights = torch.randn(first_tensor(model(*args, **kwargs)).shape, device="cuda",
                          generator=torch.Generator("cuda").manual_seed(2))

    def grads(module, a, kw):
        out = first_tensor(module(*a, **kw))
        return torch.cat([g.flatten() for g in torch.autograd.grad((out * weights.to(out.dtype)).sum(),
                                                                   list(module.parameters()))])

    expected = grads(model, args, kwargs)
    truth = grads(reference, args64, kwargs64)
    optimized = _optimize(model, kernel)
    got = grads(optimized, args, kwargs)
    _check_sites(optimized.attnopt_report, name, torch.float32, kernel)
    assert_as_accurate_as_eager(got, expected, truth, torch.float32)
