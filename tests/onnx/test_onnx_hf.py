"""Tiny Hugging Face models through both ONNX pipelines: every site becomes one Attention node."""

import io
import warnings

import onnx
import pytest
import torch

import attnopt.onnx as aonnx

import onnx_models as om

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")

TOL = 1e-5


def hf_inputs(decoder: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: query rows 0..2 of sequence 1 see no key under causal masking
    if not decoder:
        return (ids, mask)
    return (ids, mask, torch.randint(0, 64, (2, 5), generator=g))


# (factory, encoder-decoder?, attention sites: layers x attentions per layer)
MODELS = {
    "llama": (om.tiny_llama, False, 2),  # GQA, causal + padding
    "bert": (om.tiny_bert, False, 2),  # padding
    "t5": (om.tiny_t5, True, 3),  # relative position bias, cross
    "bart": (om.tiny_bart, True, 3),  # padding, causal, cross
}


@pytest.mark.parametrize("name", list(MODELS))
def test_export(name):
    factory, decoder, sites = MODELS[name]
    report = aonnx.OnnxReport()
    aonnx.export(factory(), hf_inputs(decoder), report=report, verify=True)
    assert report.attention_nodes == sites == len(report.replaced), str(report)
    assert report.max_diff <= TOL, str(report)


def plain_export_opset18(model, args) -> onnx.ModelProto:
    try:
        return torch.onnx.export(model, args, dynamo=True, opset_version=18).model_proto
    except Exception:  # torch.export cannot trace T5's attention output view: the TorchScript exporter can
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=18)
        return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse(name):
    factory, decoder, sites = MODELS[name]
    source = plain_export_opset18(factory(), hf_inputs(decoder))
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, verify=True)
    assert report.attention_nodes == sites == len(report.replaced) == len(report.sites), str(report)
    assert not [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert report.max_diff <= TOL, str(report)
