"""attnopt.onnx.export: one Attention node per site, ONNX Runtime output equal to torch, dynamic shapes."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

import attnopt.onnx as aonnx
from attnopt.onnx.verify import compare_torch

import onnx_models as om

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", category=UserWarning)

TOL = 1e-5
B, N, M = Dim("B"), Dim("N"), Dim("M")


def inputs(batch=3, n=10, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, memory = torch.randn(batch, n, 32, generator=g), torch.randn(batch, m, 32, generator=g)
    attention_mask = torch.ones(batch, n)
    attention_mask[1, :4] = 0  # left padding
    memory_mask = torch.ones(batch, m, dtype=torch.bool)
    memory_mask[1, 5:] = False
    if batch > 2:
        attention_mask[2] = 0  # a fully padded sequence: every row fully masked
        memory_mask[2] = False
    return x, memory, attention_mask, memory_mask


def cases(batch=3, n=10, m=7):
    """(model, args, dynamic_shapes) for each hand-written model."""
    x, memory, attention_mask, memory_mask = inputs(batch, n, m)
    seq = {0: B, 1: N}
    return {
        "causal_padded_gqa": (om.CausalPaddedGQA(), (x, attention_mask), {"x": seq, "attention_mask": seq}),
        "cross_bias_padding": (om.CrossWithBias(), (x, memory, memory_mask),
                               {"x": seq, "memory": {0: B, 1: M}, "memory_mask": {0: B, 1: M}}),
        "sdpa_causal": (om.SDPABlock("causal"), (x,), {"x": seq}),
        "sdpa_gqa": (om.SDPABlock("gqa"), (x,), {"x": seq}),
        "sdpa_window": (om.SDPABlock("window"), (x,), {"x": seq}),
        "softcap": (om.Softcapped(), (x,), {"x": seq}),
    }


def attention_nodes(proto):
    return [n for n in proto.graph.node if n.op_type == "Attention"]


@pytest.mark.parametrize("name", list(cases()))
def test_one_attention_node_and_equal_output(name):
    torch.manual_seed(0)
    model, args, _ = cases()[name]
    report = aonnx.OnnxReport()
    proto = aonnx.export(model.eval(), args, report=report, verify=True)
    assert len(attention_nodes(proto)) == 1 == len(report.replaced), str(report)
    assert not [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert report.max_diff is not None and report.max_diff <= TOL, str(report)


def test_gqa_is_native():
    model, args, _ = cases()["sdpa_gqa"]
    proto = aonnx.export(model.eval(), args)
    node = attention_nodes(proto)[0]
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in proto.graph.value_info}
    assert shapes[node.input[0]][1] == 4 and shapes[node.input[1]][1] == 2  # 4 query heads, 2 kv heads
    assert not [n for n in proto.graph.node if n.op_type == "Expand"]


@pytest.mark.parametrize("opset,window_attributes", [(23, False), (25, True)])
def test_window_attributes_from_opset_25(opset, window_attributes):
    model, args, _ = cases()["sdpa_window"]
    proto = aonnx.export(model.eval(), args, opset=opset)
    attributes = {a.name: a.i for a in attention_nodes(proto)[0].attribute}
    assert ("left_window_size" in attributes and attributes["left_window_size"] == 3) == window_attributes
    assert compare_torch(model, proto, args) <= TOL


@pytest.mark.parametrize("name", ["causal_padded_gqa", "cross_bias_padding", "sdpa_window"])
def test_dynamic_shapes_run_at_two_lengths(name, tmp_path):
    model, args, dynamic = cases()[name]
    path = tmp_path / "model.onnx"
    aonnx.export(model.eval(), args, path, dynamic_shapes=dynamic)
    proto = onnx.load(path)
    assert len(attention_nodes(proto)) == 1
    for batch, n, m in ((2, 5, 4), (4, 13, 9)):
        other = cases(batch, n, m)[name][1]
        assert compare_torch(model, proto, other) <= TOL


def test_fully_masked_rows_keep_their_fill():
    """NaN rows (-inf fill) stay NaN, finfo.min rows stay the mean of the values, not ONNX's zeros."""
    x, _, _, keep = inputs(3, 7, 7)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        model = om.FillPadded(fill).eval()
        proto = aonnx.export(model, (x, keep))
        assert compare_torch(model, proto, (x, keep)) <= TOL
        sess_out = aonnx.verify.session(proto).run(None, {"x": x.numpy(), "keep": keep.numpy()})[0]
        assert np.isnan(sess_out[2]).all() == (fill == float("-inf"))


@pytest.mark.parametrize("nq,nk", [(4, 7), (7, 4)])
def test_bottom_right_causal_is_an_explicit_mask(nq, nk):
    """ONNX's is_causal is top-left: a KV-cache-aligned band must not use it."""
    model = om.BottomRightCausal().eval()
    args = (torch.randn(2, nq, 32), torch.randn(2, nk, 32))
    report = aonnx.OnnxReport()
    proto = aonnx.export(model, args, report=report, verify=True)
    assert report.sites[0].causal and report.attention_nodes == 1
    assert {a.name: a.i for a in attention_nodes(proto)[0].attribute}.get("is_causal", 0) == 0
    assert report.max_diff <= TOL  # NaN rows (Nq > Nk) in the same places


def test_opset_below_23_is_refused():
    model, args, _ = cases()["sdpa_causal"]
    with pytest.raises(ValueError, match="opset 23"):
        aonnx.export(model, args, opset=18)


def test_training_dropout_is_refused():
    model, args, _ = cases()["sdpa_causal"]
    model = om.Dropout().train()
    with pytest.raises(ValueError, match="model.eval"):
        aonnx.export(model, args)


class FeaturesOnly(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features)[0]


def test_convolution_front_end_keeps_batch_dynamic():
    """A Whisper-like encoder (conv front end): the batch dim stays unbounded (no guard from the choice of
    convolution backend, which reads the batch size while tracing), 1 and 17 rows both run."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, encoder_attention_heads=4, decoder_layers=1,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    encoder = FeaturesOnly(WhisperEncoder(config)).eval()
    report = aonnx.OnnxReport()
    proto = aonnx.export(encoder, (torch.randn(2, 8, 32),), dynamic_shapes={"input_features": {0: Dim("batch")}},
                         report=report)
    assert report.attention_nodes == 1, str(report)
    for batch in (1, 17):
        assert compare_torch(encoder, proto, (torch.randn(batch, 8, 32),)) <= TOL


def test_an_optimized_model_exports_its_code_as_written():
    """``attnopt.optimize`` sets an instance-level forward; the export captures the forward as written (and rewrites
    it itself), also for the ``nn.MultiheadAttention`` whose inference calls the optimized model runs eagerly."""
    import copy

    import torch.nn as nn

    import attnopt

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = attnopt.optimize(copy.deepcopy(Model().eval()))
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        model(x)
        report = aonnx.OnnxReport()
        proto = aonnx.export(model, (x,), verify=True, report=report)
    assert report.attention_nodes == 1 and sum(n.op_type == "Attention" for n in proto.graph.node) == 1
    assert report.max_diff is not None and report.max_diff < 1e-5
    assert isinstance(model.__dict__["forward"], type(attnopt.optimize(Model()).forward))  # put back
