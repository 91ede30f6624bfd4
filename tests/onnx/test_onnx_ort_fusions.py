"""fuse(..., target="onnxruntime") beyond attention: q/k/v projections inside com.microsoft.Attention, and
onnxscript's ONNX Runtime fusions that are exact (Gelu, BiasGelu, RMS normalization).

Each fused graph must equal its source in ONNX Runtime on rows that are unpadded, left-padded,
right-padded and fully padded, at batch 1 and batch > 1; a rewrite that cannot be proven leaves the
nodes as they were.
"""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import attnopt.onnx as aonnx
from attnopt.onnx.contrib import DOMAIN, LOWEST, absorb_projections
from attnopt.onnx.runtime_fusions import _unordered_input
from attnopt.onnx.verify import max_difference, session

import hf_dynamic as hd

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
warnings.filterwarnings("ignore")

TOL, SHAPES = hd.TOL, hd.SHAPES  # (batch, seq)

#: (model, exporter) -> nodes each rule set fused; the operators they leave
CASES = {
    ("bert", "dynamo"): ({"gelu": 2, "bias_gelu": 2, "rms_normalization": 0}, {(DOMAIN, "BiasGelu"): 2}),
    ("gpt2", "dynamo"): ({"gelu": 0, "bias_gelu": 0, "rms_normalization": 0}, {}),  # ORT fuses its tanh Gelu
    ("llama", "dynamo"): ({"gelu": 0, "bias_gelu": 0, "rms_normalization": 5},
                          {("", "SimplifiedLayerNormalization"): 5}),
    ("bart", "dynamo"): ({"gelu": 2, "bias_gelu": 2, "rms_normalization": 0}, {(DOMAIN, "BiasGelu"): 2}),
    ("t5", "torchscript"): ({"gelu": 0, "bias_gelu": 0, "rms_normalization": 0}, {}),
    ("vit", "dynamo"): ({"gelu": 2, "bias_gelu": 2, "rms_normalization": 0}, {(DOMAIN, "BiasGelu"): 2}),
}


def count(proto, domain, op_type):
    return sum(n.op_type == op_type and n.domain == domain for n in proto.graph.node)


@pytest.mark.parametrize("name,exporter", list(CASES))
def test_runtime_fusions_are_exact_on_padded_rows(name, exporter):
    counts, left = CASES[name, exporter]
    source = hd.export_dynamic(name, exporter)
    report, attention_only = aonnx.OnnxReport(), aonnx.OnnxReport()
    fused = aonnx.fuse(source, target="onnxruntime", report=report)
    aonnx.fuse(source, target="onnxruntime", runtime_fusions=False, report=attention_only)
    assert report.runtime_fusions == counts, str(report)
    assert [s.kernel for s in report.sites] == [s.kernel for s in attention_only.sites]
    assert report.attention_nodes == attention_only.attention_nodes == len(report.replaced) > 0
    for (domain, op_type), n in left.items():
        assert count(fused, domain, op_type) == n, (domain, op_type)
    # measured slower (or no faster) on ONNX Runtime's CPU kernels: never emitted
    assert not count(fused, DOMAIN, "SkipLayerNormalization")
    assert not count(fused, DOMAIN, "SkipSimplifiedLayerNormalization")
    original, changed = session(source), session(fused)
    kind = hd.MODELS[name][1]
    for batch, seq in SHAPES:
        feeds = hd.padded_feeds(kind, batch, seq, seed=batch)
        expected = original.run(None, feeds)
        assert not np.isnan(expected[0]).any() and np.abs(expected[0]).max() > 0
        diff = max_difference(changed.run(None, feeds), expected)
        assert diff <= TOL, (batch, seq, diff)


def test_runtime_fusions_belong_to_the_runtime_target():
    source = hd.export_dynamic("vit", "dynamo")
    with pytest.raises(ValueError, match="runtime_fusions=True.*target=\"onnxruntime\""):
        aonnx.fuse(source, runtime_fusions=True)
    with pytest.raises(TypeError, match="runtime_fusions='yes' is not a bool"):
        aonnx.fuse(source, target="onnxruntime", runtime_fusions="yes")
    standard = aonnx.fuse(source)
    assert all(n.domain != DOMAIN for n in standard.graph.node)


def test_an_unordered_graph_is_named():
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="second"), helper.make_node("Relu", ["x"], ["a"], name="first")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    assert "'second' reading 'a'" in _unordered_input(graph)
    graph = helper.make_graph(nodes[::-1], "g", [x], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    assert _unordered_input(graph) is None


# ----------------------------------------------------------------- q/k/v projections into one Attention
E, HEADS = 16, 2


def _projections_graph(layout: str, *, alpha: float = 1.0, sizes=(E, E, E), extra_output: bool = False,
                       cross: bool = False, causal: bool = False) -> onnx.ModelProto:
    """x [B, N, E] -> q, k, v -> MultiHeadAttention with key padding; ``layout``: "matmul" (three
    MatMul + bias Add) or "gemm" (x viewed as [B * N, E], one Gemm with transB, three parts)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def constant(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    source_kv = "memory" if cross else "x"
    if layout == "matmul":
        for part, source in (("q", "x"), ("k", source_kv), ("v", source_kv)):
            w = constant(f"w_{part}", rng.standard_normal((E, E)).astype(np.float32) / 4)
            b = constant(f"b_{part}", rng.standard_normal(E).astype(np.float32))
            nodes += [helper.make_node("MatMul", [source, w], [f"{part}_mm"]),
                      helper.make_node("Add", [f"{part}_mm", b], [part])]
    else:
        w = constant("w", rng.standard_normal((sum(sizes), E)).astype(np.float32) / 4)  # transB: [3 E, E]
        b = constant("b", rng.standard_normal(sum(sizes)).astype(np.float32))
        nodes += [
            helper.make_node("Reshape", ["x", constant("rows", np.array([-1, E], np.int64))], ["x2"]),
            helper.make_node("Gemm", ["x2", w, b], ["qkv2"], transB=1, alpha=alpha),
            helper.make_node("Concat", ["batch", "length", constant("width", np.array([sum(sizes)], np.int64))],
                             ["qkv_shape"], axis=0),
            helper.make_node("Reshape", ["qkv2", "qkv_shape"], ["qkv"]),
            helper.make_node("Split", ["qkv", constant("sizes", np.array(sizes, np.int64))], ["q", "k", "v"], axis=2),
        ]
    nodes += [
        helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["length"], start=1, end=2),
        helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "pad"], ["y"], name="attnopt/site/1",
                         domain=DOMAIN, num_heads=HEADS, scale=0.3, mask_filter_value=LOWEST,
                         **({"unidirectional": 1} if causal else {})),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", E]),
              helper.make_tensor_value_info("pad", TensorProto.INT32, ["B", "N"])]
    if cross:
        inputs.append(helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["B", "N", E]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "projections", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])


def _feeds(batch=4, n=7, seed=0):
    rng = np.random.default_rng(seed)
    pad = np.ones((batch, n), np.int32)
    pad[1, :3], pad[2, -2:], pad[3] = 0, 0, 0  # left, right, fully padded
    return {"x": rng.standard_normal((batch, n, E)).astype(np.float32), "pad": pad,
            "memory": rng.standard_normal((batch, n, E)).astype(np.float32)}


def _absorbed(model):
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    names = absorb_projections(changed.graph, set(), lambda x, q, width: True)
    return changed, names


@pytest.mark.parametrize("layout,causal", [("matmul", False), ("matmul", True), ("gemm", False), ("gemm", True)])
def test_projections_move_into_one_attention(layout, causal):
    source = _projections_graph(layout, causal=causal)
    changed, names = _absorbed(source)
    assert names == ["attnopt/site/1"]
    merged = [n for n in changed.graph.node if n.op_type == "Attention"]
    assert len(merged) == 1 and merged[0].domain == DOMAIN and merged[0].input[0] == "x"
    assert not [n for n in changed.graph.node if n.op_type == "MultiHeadAttention"]
    for batch in (1, 4):
        feeds = {k: v[:batch] for k, v in _feeds().items()}
        expected, got = (s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
                         for s in (session(source), session(changed)))
        assert np.abs(expected[0]).max() > 0
        assert max_difference(got, expected) <= TOL


@pytest.mark.parametrize("case", [
    dict(layout="gemm", alpha=2.0),  # Gemm scales its product: not x @ W + b
    dict(layout="gemm", sizes=(E, E + 2, E - 2)),  # parts of different sizes
    dict(layout="matmul", extra_output=True),  # k is also a graph output: its projection stays
    dict(layout="matmul", cross=True),  # k/v read another input than q
])
def test_projections_that_cannot_move_stay(case):
    source = _projections_graph(**case)
    changed, names = _absorbed(source)
    assert names == [] and changed == source


def test_projections_stay_where_rows_are_not_proven():
    source = _projections_graph("gemm")
    changed = onnx.ModelProto()
    changed.CopyFrom(source)
    assert absorb_projections(changed.graph, set(), lambda x, q, width: False) == [] and changed == source
