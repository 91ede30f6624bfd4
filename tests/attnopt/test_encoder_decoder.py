"""Encoder-decoder models: HF ``generate()`` calls the encoder on its own, outside the model's forward.

``optimize`` gives the encoder an optimized forward of its own (same options, same report), so the
encoder's attention is replaced in ``generate()`` too, and stays part of the model's one graph when
the model's forward is called as a whole.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import attnopt

transformers = pytest.importorskip("transformers")


def _t5():
    config = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.T5ForConditionalGeneration(config).eval()


def _inputs():
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _replaced(report, prefix):
    return [s for s in report.sites if s.where.startswith(prefix) and s.replaced]


@pytest.mark.parametrize("copied", [False, True])
def test_generate_optimizes_the_encoder(copied):
    model = _t5()
    optimized = attnopt.optimize(copy.deepcopy(model))
    if copied:  # a copy is optimized afresh, its encoder too
        optimized = copy.deepcopy(optimized)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        got = optimized.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    report = optimized.attnopt_report
    encoder = {s.where for s in _replaced(report, "encoder.")}
    assert encoder == {"encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention"}, str(report)
    assert len({s.where for s in _replaced(report, "decoder.")}) == 4, str(report)


def test_whole_forward_stays_one_graph():
    """Called through the model's forward, the encoder is traced as plain code inside the model's graph: attnopt
    adds no graph to those dynamo makes of the forward itself (one on torch 2.13; torch 2.11 breaks at T5's
    ``copy.deepcopy`` of its config, which it cannot trace)."""
    model = _t5()
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids, mask = _inputs()
    decoder_ids = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        got = optimized(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        dynamos = torch._dynamo.explain(copy.deepcopy(model))(input_ids=ids, attention_mask=mask,
                                                              decoder_input_ids=decoder_ids).graph_count
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    report = optimized.attnopt_report
    assert report.graphs == dynamos and not report.fallbacks, str(report)
    assert len(report.sites) == 6 and all(s.replaced for s in report.sites), str(report)
    if torch.__version__ >= "2.13":  # one graph, its sites named from the model's root
        assert report.graphs == 1, str(report)
        assert {s.where.split(".")[0] for s in report.sites} == {"encoder", "decoder"}


def test_models_without_an_encoder_are_untouched():
    """Only a submodule that ``get_encoder()`` names is optimized apart; a decoder-only model has none."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    attnopt.optimize(model)
    assert [name for name, sub in model.named_modules() if "forward" in sub.__dict__] == [""]
