"""attnopt.onnx.fuse: decomposed attention in plain opset-18 exports becomes Attention, outputs unchanged."""

import warnings

import onnx
import pytest
import torch
from torch.export import Dim

import attnopt.onnx as aonnx
from attnopt.onnx.verify import compare_onnx

import onnx_models as om
from test_onnx_export import TOL, cases

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", category=UserWarning)


def plain_export(model, args, dynamic_shapes=None, opset=18):
    return torch.onnx.export(model.eval(), args, dynamo=True, opset_version=opset,
                             dynamic_shapes=dynamic_shapes).model_proto


def ops(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


FUSABLE = [("causal_padded_gqa", False), ("cross_bias_padding", False), ("sdpa_causal", False),
           ("sdpa_gqa", False), ("softcap", False), ("cross_bias_padding", True), ("softcap", True)]


@pytest.mark.parametrize("name,dynamic", FUSABLE)
def test_every_site_fused_output_unchanged(name, dynamic):
    model, args, dynamic_shapes = cases()[name]
    source = plain_export(model, args, dynamic_shapes if dynamic else None)
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, verify=True)
    assert len(ops(fused, "Attention")) == 1 == len(report.replaced) == len(report.sites), str(report)
    assert not ops(fused, "Softmax")
    assert report.max_diff <= TOL, str(report)
    onnx.checker.check_model(fused)


def test_gqa_repeat_is_folded():
    model, args, _ = cases()["causal_padded_gqa"]
    fused = aonnx.fuse(plain_export(model, args))
    assert not ops(fused, "Expand") or all("attnopt" in n.name for n in ops(fused, "Expand"))
    attention = ops(fused, "Attention")[0]
    shapes = {vi.name: vi.type.tensor_type.shape.dim for vi in onnx.shape_inference.infer_shapes(fused).graph.value_info}
    assert shapes[attention.input[1]][1].dim_value == 2  # K keeps its 2 kv heads


def test_dynamic_fused_model_runs_at_two_lengths():
    model, args, dynamic_shapes = cases()["causal_padded_gqa"]
    source = plain_export(model, args, dynamic_shapes)
    fused = aonnx.fuse(source)
    for n in (5, 13):
        assert compare_onnx(source, fused, dims={"s0": 3, "s1": n, "B": 3, "N": n}) <= TOL


def test_sdpa_bool_mask_safe_softmax():
    """torchlib's SDPA with a bool mask adds ``where(isnan(p), 0, p)`` after the softmax."""
    model, args, _ = cases()["sdpa_window"]
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(plain_export(model, args), report=report, verify=True)
    assert report.max_diff <= TOL
    assert report.replaced, report.sites[0].reason
    assert len(ops(fused, "Attention")) == 1


def test_not_attention_is_left_alone():
    class Classifier(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-2, -1) @ x, dim=1)

    source = plain_export(Classifier(), (torch.randn(2, 3, 5, 4),))
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report)
    assert not ops(fused, "Attention") and len(report.sites) == 1 and not report.sites[0].replaced
    assert report.sites[0].reason


def test_opset_below_23_is_refused(tmp_path):
    model, args, _ = cases()["sdpa_causal"]
    path = tmp_path / "m.onnx"
    onnx.save(plain_export(model, args), path)
    with pytest.raises(ValueError, match="opset 23"):
        aonnx.fuse(path, opset=22)


def test_bfloat16_load_error_names_node_and_dtype():
    bf16 = onnx.TensorProto.BFLOAT16
    inputs = [onnx.helper.make_tensor_value_info(n, bf16, [1, 2, 4, 8]) for n in "qkv"]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")], "g",
                                   inputs, [onnx.helper.make_tensor_value_info("y", bf16, None)])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])
    with pytest.raises(ValueError, match=r"no .* kernel for bfloat16"):
        aonnx.verify.session(proto)


def test_dims_of_a_model_with_unnamed_inputs():
    model, args, _ = cases()["sdpa_causal"]
    assert aonnx.fuse(plain_export(om.SDPABlock("causal"), args, {"x": {0: Dim("B"), 1: Dim("N")}}),
                      dims={"B": 1, "N": 4}, verify=True) is not None


def test_a_band_replaced_then_padding_added_is_left_alone_with_the_reason():
    """GPT-2's masks (``where(causal, s, finfo.min) + (1 - keep) * finfo.min``): a row whose causal keys are
    all padded averages the keys masked once, which the Attention operator's mask cannot express. The site
    stays as exported, says why, and the graph still computes the original."""
    torch.manual_seed(0)
    model = om.CausalFillThenPadding().eval()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, :5] = False  # left padding: the first rows of batch 1 see only padded keys
    source = plain_export(model, (torch.randn(2, 12, 32), keep))
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, verify=True)
    assert len(report.sites) == 1 and not report.replaced, str(report)
    assert "masked once" in report.sites[0].reason
    assert not ops(fused, "Attention") and ops(fused, "Softmax")


def test_a_value_read_only_inside_an_if_body_is_kept():
    """``If`` / ``Loop`` bodies read outer values by name: the clean-up after fusing keeps their producers
    (and initializers), or the graph would not load."""
    import sys

    import numpy as np
    from onnx import TensorProto, helper

    from attnopt.onnx.verify import session

    remove_dead = sys.modules["attnopt.onnx.fuse"]._remove_dead
    then_body = helper.make_graph([helper.make_node("Add", ["r", "w"], ["t"])], "then", [],
                                  [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_body = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["unused"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_body, else_branch=else_body)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    remove_dead(model.graph)
    assert [n.op_type for n in model.graph.node] == ["Relu", "If"]  # the unread Neg goes, Relu stays
    assert [t.name for t in model.graph.initializer] == ["w"]
    onnx.checker.check_model(model, full_check=True)
    x = np.array([-1.0, 3.0], dtype=np.float32)
    y, = session(model).run(None, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(y, np.maximum(x, 0) + [1.0, 2.0])
