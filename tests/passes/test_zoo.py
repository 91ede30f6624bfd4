"""The model zoo: every attention in each model is found, classified right, and replaced exactly.

Hand-written spellings, torch.nn modules and Hugging Face architectures built from
tiny configs with random weights (no downloads). For each model: the number of
sites equals the number of attention layers, each site's mask terms, heads and
cross flag are the expected ones, and the optimized outputs equal the original
on inputs with padding (including fully padded rows).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import attnopt

from . import models

transformers = pytest.importorskip("transformers")


@dataclass
class Case:
    build: object  # () -> nn.Module
    inputs: object  # () -> (args, kwargs)
    terms: tuple  # expected mask terms (each site), as a sorted tuple of Site.found parts
    sites: int = 1
    kv_heads: int | None = None
    per_site: list | None = None  # expected `found` strings per site, when sites differ
    tol: float = 2e-5
    notes: dict = field(default_factory=dict)


def x_only(b=2, n=12):
    return lambda: ((torch.randn(b, n, 32),), {})


def padded_tokens(left=True):
    def make():
        ids = torch.randint(0, 100, (2, 12))
        mask = torch.ones(2, 12, dtype=torch.long)
        if left:
            mask[1, :5] = 0
        else:
            mask[1, 8:] = 0
        return (), {"input_ids": ids, "attention_mask": mask}

    return make


def seq2seq_tokens():
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return (), {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :7]}


def keep_mask():
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 7:] = False
    return keep


def hf(config_cls, model_cls, **config):
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model_cls(config_cls(**config))

    return build


LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
BERT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)

CASES = {
    # hand-written
    "nanogpt_tril_buffer": Case(models.NanoGPTBlock, x_only(), ("causal",)),
    "bert_style_bool_padding": Case(models.PaddedEncoder, lambda: ((torch.randn(2, 12, 32), keep_mask()), {}),
                                    ("key_padding",)),
    # a per-key float input: named for its structure, still added exactly as written
    "float_padding_input": Case(models.PaddedEncoder, lambda: ((torch.randn(2, 12, 32), keep_mask().float()), {}),
                                ("key_padding",)),
    "finfo_masked_fill": Case(models.FinfoMaskedFill, lambda: ((torch.randn(2, 12, 32), keep_mask()), {}),
                              ("key_padding",)),
    "where_arange_causal": Case(models.WhereCausal, x_only(), ("causal",)),
    "einsum_bnhd": Case(models.EinsumAttention, x_only(), ("full",)),
    "bmm_3d_baddbmm_causal": Case(models.Bmm3D, x_only(), ("causal",)),
    "quarter_scaled_permute": Case(models.QuarterScaled, x_only(), ("full",)),
    "sliding_window": Case(models.SlidingWindow, x_only(), ("causal", "window")),
    "softcap": Case(models.Softcapped, x_only(), ("causal", "softcap")),
    "gqa_repeat_interleave": Case(lambda: models.GroupedQuery("interleave"), x_only(), ("gqa",), kv_heads=2),
    "gqa_expand_flatten": Case(lambda: models.GroupedQuery("expand"), x_only(), ("gqa",), kv_heads=2),
    "mqa_broadcast": Case(models.MultiQuery, x_only(), ("mqa",), kv_heads=1),
    "documents": Case(models.Documents,
                      lambda: ((torch.randn(2, 12, 32), torch.tensor([[0] * 5 + [1] * 7, [0] * 12])), {}),
                      ("document",)),
    "cross_attention": Case(models.CrossAttention,
                            lambda: ((torch.randn(2, 12, 32), torch.randn(2, 9, 32), keep_mask()[:, :9]), {}),
                            ("cross", "key_padding")),
    "alibi": Case(models.Alibi, x_only(), ("bias", "causal")),
    "sdpa_causal": Case(lambda: models.SDPAModel(mode="causal"), x_only(), ("causal",)),
    "sdpa_gqa": Case(lambda: models.SDPAModel(mode="gqa"), x_only(), ("gqa",), kv_heads=2),
    # torch.nn modules
    "mha_self": Case(lambda: models.Mha(), lambda: ((torch.randn(2, 12, 32), None, None), {}), ("full",)),
    "mha_cross_padding": Case(lambda: models.Mha(cross=True),
                              lambda: ((torch.randn(2, 12, 32), torch.randn(2, 9, 32), ~keep_mask()[:, :9]), {}),
                              ("cross", "key_padding")),
    "mha_sequence_first": Case(lambda: models.Mha(batch_first=False),
                               lambda: ((torch.randn(2, 12, 32), None, None), {}), ("full",)),
    "transformer_encoder_layer": Case(lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                                      x_only(), ("full",), tol=1e-4),
    "transformer_decoder_layer": Case(
        lambda: nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
        lambda: ((torch.randn(2, 12, 32), torch.randn(2, 9, 32)), {}), (), sites=2,
        per_site=["full", "cross"], tol=1e-4),
    # Hugging Face, eager attention
    "hf_llama": Case(hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA, attn_implementation="eager"),
                     padded_tokens(), ("causal", "gqa", "key_padding"), sites=2, kv_heads=2),
    "hf_mistral": Case(hf(transformers.MistralConfig, transformers.MistralForCausalLM, **LLAMA, sliding_window=4,
                          attn_implementation="eager"),
                       padded_tokens(), ("causal", "gqa", "key_padding", "window"), sites=2, kv_heads=2),
    "hf_gpt2": Case(hf(transformers.GPT2Config, transformers.GPT2LMHeadModel, vocab_size=100, n_embd=64, n_layer=2,
                       n_head=4, n_positions=64, attn_implementation="eager"),
                    padded_tokens(), ("causal", "key_padding"), sites=2),
    "hf_bert": Case(hf(transformers.BertConfig, transformers.BertModel, **BERT, attn_implementation="eager"),
                    padded_tokens(left=False), ("key_padding",), sites=2),
    "hf_t5": Case(hf(transformers.T5Config, transformers.T5ForConditionalGeneration, vocab_size=100, d_model=64,
                     d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, attn_implementation="eager"),
                  seq2seq_tokens, (), sites=6, tol=1e-4,
                  # the padding and causal masks are added into a learned position bias that could hold -inf:
                  # they stay added terms (rows masked entirely are averaged exactly as eager does), named by
                  # their structure
                  per_site=["key_padding+bias"] * 2 + ["causal+bias", "key_padding+cross"] * 2),
    "hf_bart": Case(hf(transformers.BartConfig, transformers.BartForConditionalGeneration, vocab_size=100, d_model=64,
                       encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                       attn_implementation="eager"),
                    seq2seq_tokens, (), sites=3, per_site=["key_padding", "causal", "key_padding+cross"]),
    "hf_vit": Case(hf(transformers.ViTConfig, transformers.ViTModel, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                      attn_implementation="eager"),
                   lambda: ((), {"pixel_values": torch.randn(2, 3, 32, 32)}), ("full",), sites=2),
    # Hugging Face, SDPA attention
    "hf_llama_sdpa": Case(hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA,
                             attn_implementation="sdpa"),
                          padded_tokens(), ("causal", "gqa", "key_padding"), sites=2, kv_heads=2),
    "hf_bert_sdpa": Case(hf(transformers.BertConfig, transformers.BertModel, **BERT, attn_implementation="sdpa"),
                         padded_tokens(left=False), ("key_padding",), sites=2),
}


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@pytest.mark.parametrize("name", list(CASES))
def test_zoo(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    args, kwargs = case.inputs()
    expected = first_tensor(model(*args, **kwargs)).detach()
    optimized = attnopt.optimize(model)
    got = first_tensor(optimized(*args, **kwargs)).detach()
    report = optimized.attnopt_report
    assert len(report.sites) == case.sites, str(report)
    assert all(s.replaced for s in report.sites), str(report)
    found = [s.found for s in report.sites]
    if case.per_site is not None:
        assert found == case.per_site, str(report)
    else:
        assert all(tuple(sorted(f.split("+"))) == tuple(sorted(case.terms)) for f in found), str(report)
    if case.kv_heads is not None:
        assert all(s.kv_heads == case.kv_heads for s in report.sites)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, atol=case.tol, rtol=case.tol, equal_nan=True)


MODULE_CASES = {
    "mha_self": lambda: models.Mha(),
    "mha_cross_padding": lambda: models.Mha(cross=True),
    "mha_sequence_first_cross": lambda: models.Mha(batch_first=False, cross=True),
    "transformer_encoder_layer": lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
    "transformer_decoder_layer": lambda: nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
}


@pytest.mark.parametrize("kernel", ["reference", "sdpa_cpu"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_torch_nn_modules_at_new_lengths(name, kernel):
    """The inlined nn.MultiheadAttention after dynamo's automatic-dynamic recompile: its sizes are symbolic, and
    the inlined graph must take them from the tensors (a size written from the fake value named a symbol the
    graph did not bind: NameError on the third call)."""
    torch.manual_seed(0)
    model = MODULE_CASES[name]().eval()
    optimized = attnopt.optimize(copy.deepcopy(model), kernel=kernel)
    for n, m in ((12, 9), (14, 11), (9, 7)):
        x, memory = torch.randn(2, n, 32), torch.randn(2, m, 32)
        padding = torch.zeros(2, m, dtype=torch.bool)
        padding[1, m - 3:] = True  # nn.MultiheadAttention's True: a padded key
        args = {"transformer_encoder_layer": (x,), "transformer_decoder_layer": (x, memory)}.get(name, (x, memory, padding))
        # (gradients enabled: under no_grad the encoder layer takes PyTorch's fused fast path, left alone)
        torch.testing.assert_close(first_tensor(optimized(*args)).detach(), first_tensor(model(*args)).detach(),
                                   atol=1e-4, rtol=1e-4, equal_nan=True)
    report = optimized.attnopt_report
    assert report.graphs == 2 and report.sites and all(s.replaced and s.kernel == kernel for s in report.sites), \
        str(report)


def test_alibi_is_recognized_and_named():
    model = models.Alibi().eval()
    optimized = attnopt.optimize(model)
    optimized(torch.randn(2, 12, 32))
    (site,) = optimized.attnopt_report.sites
    assert site.mask_terms == ("causal", "bias")
    assert any("ALiBi" in note for note in site.notes)
    assert "ALiBi" in str(optimized.attnopt_report)


def test_a_learned_bias_is_not_alibi():
    model = models.PaddedEncoder().eval()
    optimized = attnopt.optimize(model)
    optimized(torch.randn(2, 12, 32), torch.ones(2, 12))
    assert not any("ALiBi" in note for s in optimized.attnopt_report.sites for note in s.notes)


def test_transformer_encoder_fast_path_is_reported_not_rewritten():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        expected = layer(x)
        optimized = attnopt.optimize(layer)
        got = optimized(x)
    (site,) = optimized.attnopt_report.sites
    assert not site.replaced and "fast path" in site.reason
    torch.testing.assert_close(got, expected)


def test_llama_bfloat16_with_left_padding():
    """Fully padded query rows (left padding) average uniformly in eager; so do they here."""
    build = hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA, attn_implementation="eager")
    torch.manual_seed(0)
    model = build().to(torch.bfloat16).eval()
    _, kwargs = padded_tokens()()
    with torch.no_grad():
        expected = model(**kwargs).logits
        optimized = attnopt.optimize(model)
        got = optimized(**kwargs).logits
    assert all(s.replaced and s.dtype == "torch.bfloat16" for s in optimized.attnopt_report.sites)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.05)


def test_llama_training_gradients():
    build = hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA, attn_implementation="eager")
    torch.manual_seed(0)
    model = build().train()
    _, kwargs = padded_tokens()()
    labels = kwargs["input_ids"]
    loss = model(**kwargs, labels=labels).loss
    expected = torch.autograd.grad(loss, list(model.parameters()))
    optimized = attnopt.optimize(model)
    got = torch.autograd.grad(optimized(**kwargs, labels=labels).loss, list(model.parameters()))
    assert len(optimized.attnopt_report.replaced) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_explain_on_a_two_layer_llama_reads_at_a_glance():
    build = hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA, attn_implementation="eager")
    model = build().eval()
    _, kwargs = padded_tokens()()
    report = attnopt.explain(model, kwargs=kwargs)
    text = str(report)
    assert "2 of 2 attention site(s) would be replaced" in text
    for needle in ("model.layers.0.self_attn", "model.layers.1.self_attn", "causal+key_padding+gqa", "4/2", "12 x 12"):
        assert needle in text, text


#: zoo models whose masks are built on the CPU (``torch.arange(n)`` / ``torch.full`` with no device): eager
#: PyTorch cannot combine them with CUDA scores. test_gpu_masks.py runs these mask families with CUDA inputs.
CPU_BUILT_MASKS = ("sliding_window", "softcap", "bmm_3d_baddbmm_causal", "alibi")
#: models called with a padded ``attention_mask``: on CUDA also called without one (the model then builds its
#: own causal mask; an HF Llama called so crashed the ALiBi recognition on CUDA)
TAKES_ATTENTION_MASK = [name for name, case in CASES.items() if "attention_mask" in case.inputs()[1]]
CUDA_ZOO = [
    pytest.param(name, with_mask, id=name if with_mask else f"{name}-no_attention_mask")
    for name in CASES if name not in CPU_BUILT_MASKS
    for with_mask in ((True, False) if name in TAKES_ATTENTION_MASK else (True,))
]
#: the half dtypes the issue asks for; float32 too with ATTNOPT_GPU_FULL=1 (the masks suite covers it per family)
CUDA_DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in
               ((torch.float32,) if os.environ.get("ATTNOPT_GPU_FULL", "") == "1" else ()) + (torch.bfloat16, torch.float16)]


def on_cuda(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Inputs moved to CUDA, floating ones cast to ``dtype`` (ids and integer masks keep theirs)."""

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def assert_as_accurate_as_eager(got: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor,
                                dtype: torch.dtype) -> None:
    """The optimized output ``got`` is about as close to the float64 ``truth`` as eager's ``expected`` (same dtype).

    NaN exactly where eager has NaN (rows with no visible key under a -inf fill); elsewhere the largest error
    against float64 at most twice eager's, plus a small floor (fused kernels round differently, usually less).
    """
    got, expected, truth = got.double(), expected.double(), truth.double()
    assert torch.equal(got.isnan(), expected.isnan()), "NaN in different places than eager"
    ok = torch.isfinite(expected) & torch.isfinite(truth)
    assert torch.isfinite(got[ok]).all(), "inf or NaN where eager is finite"
    scale = truth[ok].abs().max().clamp(min=1.0)
    eager_error = (expected - truth)[ok].abs().max()
    error = (got - truth)[ok].abs().max()
    floor = (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2) * scale
    assert error <= 2 * eager_error + floor, (
        f"largest error against float64: {error:.3g} optimized vs {eager_error:.3g} eager ({dtype}, scale {scale:.3g})"
    )


def assert_planned(report, sites: int) -> None:
    """``sites`` sites, each replaced or kept because the original code is no slower (never slower): on the
    GPU the planner times both, and on small shapes a fused original (an SDPA call) can win."""
    assert len(report.sites) == sites, str(report)
    assert all(s.replaced or s.reason.startswith("original") for s in report.sites), str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name, with_mask", CUDA_ZOO)
def test_zoo_on_cuda(name, with_mask, dtype):
    """The zoo on the GPU, where the planner measures Triton and SDPA kernels, in float32, bfloat16 and float16.

    Checked against a float64 copy of the model (the same rounded weights and inputs): the optimized
    output is as accurate as eager's in the same dtype.
    """
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().to("cuda", dtype).eval()
    reference = copy.deepcopy(model).double()
    args, kwargs = case.inputs()
    if not with_mask:
        del kwargs["attention_mask"]
    args, kwargs = on_cuda(args, kwargs, dtype)
    args64, kwargs64 = on_cuda(args, kwargs, torch.float64)  # from the inputs already rounded to dtype
    expected = first_tensor(model(*args, **kwargs)).detach()
    truth = first_tensor(reference(*args64, **kwargs64)).detach()
    optimized = attnopt.optimize(model)
    got = first_tensor(optimized(*args, **kwargs)).detach()
    report = optimized.attnopt_report
    assert_planned(report, case.sites)
    assert all(s.dtype == str(dtype) for s in report.sites), str(report)
    assert_as_accurate_as_eager(got, expected, truth, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "triton_flash"])
def test_llama_training_gradients_on_cuda(kernel):
    """The planner's choice (a kernel, or the original where it is no slower), and the Triton kernel forced."""
    build = hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **LLAMA, attn_implementation="eager")
    torch.manual_seed(0)
    model = build().cuda().train()
    _, kwargs = padded_tokens()()
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    loss = model(**kwargs, labels=kwargs["input_ids"]).loss
    expected = torch.autograd.grad(loss, list(model.parameters()))
    optimized = attnopt.optimize(model, **({} if kernel == "auto" else {"kernel": kernel}))
    got = torch.autograd.grad(optimized(**kwargs, labels=kwargs["input_ids"]).loss, list(model.parameters()))
    report = optimized.attnopt_report
    assert_planned(report, 2)
    if kernel != "auto":
        assert all(s.replaced and s.kernel == kernel for s in report.sites), str(report)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("name, terms", [("hf_llama", "causal+key_padding+gqa"),
                                         ("hf_mistral", "causal+window+key_padding+gqa")])
def test_dynamic_shapes_keep_the_mask_structure(name, terms):
    """After a second length dynamo captures symbolic shapes; the masks are still read as bands."""
    torch.manual_seed(0)
    model = CASES[name].build().eval()
    optimized = attnopt.optimize(copy.deepcopy(model))
    for n in (10, 13, 17):
        ids = torch.randint(0, 100, (2, n))
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, :3] = 0
        with torch.no_grad():
            torch.testing.assert_close(optimized(input_ids=ids, attention_mask=mask).logits,
                                       model(input_ids=ids, attention_mask=mask).logits, atol=2e-5, rtol=2e-5)
    report = optimized.attnopt_report
    assert report.graphs == 2
    assert [s.found for s in report.sites if s.graph == 1] == [terms, terms]


def test_generate_with_a_kv_cache_is_unchanged():
    torch.manual_seed(0)
    model = CASES["hf_llama"].build().eval()
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = optimized.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert all(s.replaced for s in optimized.attnopt_report.sites)
