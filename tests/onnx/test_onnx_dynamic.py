"""fuse on dynamic-shape exports of tiny Hugging Face models, from both exporters.

Each export has dynamic batch and sequence. The fused graph must load in ONNX Runtime and equal the
unfused one at two shapes (batch 1 and batch 4), on rows that are unpadded, left-padded,
right-padded and fully padded; causal and padding structure must be recognised with the lengths
symbolic.
"""

import functools
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt.onnx as aonnx
from attnopt.onnx.fuse import default_opset
from attnopt.onnx.verify import max_difference, session

import hf_dynamic as hd
import onnx_models as om

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")

TOL, SHAPES = hd.TOL, hd.SHAPES  # (batch, seq)

#: (model, exporter) -> (sites, mask terms every site shows)
CASES = {
    ("gpt2", "dynamo"): (2, {"causal", "key_padding"}),
    ("bart", "dynamo"): (3, None),
    ("vit", "dynamo"): (2, set()),
    ("bert", "dynamo"): (2, {"key_padding"}),
    ("llama", "dynamo"): (2, {"causal", "key_padding"}),
    ("bert", "torchscript"): (2, {"key_padding"}),
    ("gpt2", "torchscript"): (2, {"causal", "key_padding"}),
    ("llama", "torchscript"): (2, {"causal", "key_padding"}),
    ("bart", "torchscript"): (3, None),
    ("t5", "torchscript"): (3, None),
    ("vit", "torchscript"): (2, set()),
}
#: BART: encoder self (padding), decoder self (causal), cross (encoder padding)
BART_TERMS = [("key_padding",), ("causal",), ("key_padding",)]


@pytest.mark.parametrize("name,exporter", list(CASES))
def test_fused_equals_unfused_at_two_shapes(name, exporter):
    sites, terms = CASES[name, exporter]
    source = hd.export_dynamic(name, exporter)
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report)
    assert report.attention_nodes == sites == len(report.replaced) == len(report.sites), str(report)
    assert not [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert default_opset(fused) == aonnx.MIN_OPSET
    if terms is not None:
        assert all(set(s.mask_terms) == terms for s in report.sites), str(report)
    if name == "bart" and exporter == "dynamo":
        assert [s.mask_terms for s in report.sites] == BART_TERMS, str(report)
    causal = {"gpt2": True, "llama": True}.get(name)
    if causal is not None:
        assert all(s.causal for s in report.sites), str(report)
    original, changed = session(source), session(fused)
    kind = hd.MODELS[name][1]
    for batch, seq in SHAPES:
        feeds = hd.padded_feeds(kind, batch, seq)
        expected = original.run(None, feeds)
        diff = max_difference(changed.run(None, feeds), expected)
        assert diff <= TOL, (batch, seq, diff)


def test_opset_17_source_is_converted_whole():
    """A TorchScript opset-17 graph fused at opset 23: every standard op is at 23 (ReduceMean's axes input)."""
    fused = aonnx.fuse(hd.export_dynamic("llama", "torchscript"))
    reduce_means = [n for n in fused.graph.node if n.op_type == "ReduceMean" and "attnopt" not in n.name]
    assert reduce_means and all(len(n.input) == 2 and "axes" not in [a.name for a in n.attribute] for n in reduce_means)
    onnx.checker.check_model(fused)


class CausalOfAnotherLength(om.Block):
    """A causal mask built from the length of another input: equal to the sequence, or 1 (broadcast)."""

    def forward(self, x, ref):
        q, k, v = self.qkv(x)
        i = torch.arange(ref.shape[1])
        keep = i[None, :] <= i[:, None]
        scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return self.merge(scores.softmax(-1) @ v)


def test_band_from_a_range_of_another_length_is_not_causal():
    f = io.BytesIO()
    x = torch.randn(2, 5, 32)
    torch.onnx.export(CausalOfAnotherLength().eval(), (x, torch.zeros(1, 5)), f, dynamo=False, opset_version=17,
                      input_names=["x", "ref"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "ref": {1: "ref_len"}})
    source = onnx.load_from_string(f.getvalue())
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, dims={"seq": 7, "ref_len": 7})  # the lengths it runs at
    assert not report.replaced and "index ranges" in report.sites[0].reason, str(report)
    original, changed = session(source), session(fused)
    for ref_len in (1, 5):  # 1: the mask broadcasts and hides nothing
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32),
                 "ref": np.zeros((1, ref_len), dtype=np.float32)}
        assert max_difference(changed.run(None, feeds), original.run(None, feeds)) <= TOL


def test_mask_work_is_built_once_per_graph():
    """BERT's two layers share one padding mask: its row-alive bits are reduced once, not once per site."""
    fused = aonnx.fuse(hd.export_dynamic("bert", "torchscript"))
    emitted = [n.op_type for n in fused.graph.node if n.name.startswith("attnopt/")]
    assert emitted.count("Attention") == 2 and emitted.count("ReduceMax") == 1, emitted


def _emitted(fused, op_type):
    return [n for n in fused.graph.node if n.name.startswith("attnopt/") and n.op_type == op_type]


@pytest.mark.parametrize("name,exporter", [("gpt2", "dynamo"), ("llama", "torchscript")])
def test_causal_with_padding_keeps_the_band_an_attribute(name, exporter):
    """Causal + padding at a finite fill: ``is_causal`` stays an attribute, the mask is the padding alone
    (built once, as floats), and a row's "any key visible" bit is a running count over the padding."""
    source = hd.export_dynamic(name, exporter)
    fused = aonnx.fuse(source)
    attention = _emitted(fused, "Attention")
    assert len(attention) == 2 and all(onnx.helper.get_node_attr_value(n, "is_causal") == 1 for n in attention)
    assert len({n.input[3] for n in attention}) == 1  # one mask for both layers
    assert len(_emitted(fused, "CumSum")) == 1
    assert not _emitted(fused, "Range") and not _emitted(fused, "ReduceMax")  # no [Nq, Nk] band, no row reduction
    original, changed = session(source), session(fused)
    feeds = hd.padded_feeds("text", 4, 9)  # left padding: the first rows of row 1 see no key
    assert max_difference(changed.run(None, feeds), original.run(None, feeds)) <= TOL


def test_projections_feed_the_operator_without_transposes():
    """BERT's q, k and v are reshapes and transposes of [B, N, H * D] projections: those are the inputs."""
    fused = aonnx.fuse(hd.export_dynamic("bert", "dynamo"))
    attention = _emitted(fused, "Attention")
    assert len(attention) == 2
    assert all(onnx.helper.get_node_attr_value(n, "q_num_heads") == 4 for n in attention)
    producers = {o: n for n in fused.graph.node for o in n.output}
    assert all(producers[i].op_type == "Add" for n in attention for i in n.input[:3])  # the projections' bias adds


def test_padding_only_rows_without_keys_need_no_patch():
    """Padding empties whole sequences: the shared float mask makes the operator average their values, so
    no site reduces v or selects rows after the operator; fully padded sequences still match."""
    source = hd.export_dynamic("bert", "dynamo")
    fused = aonnx.fuse(source)
    assert not _emitted(fused, "ReduceMean") and len(_emitted(fused, "Where")) == 2  # both in the one mask
    original, changed = session(source), session(fused)
    feeds = hd.padded_feeds("text", 4, 9)
    assert not feeds["attention_mask"][3].any()
    assert max_difference(changed.run(None, feeds), original.run(None, feeds)) <= TOL


#: (model, exporter) -> (groups packed, MatMuls removed)
PACKED = {("bert", "dynamo"): (2, 4), ("bart", "dynamo"): (3, 5), ("llama", "torchscript"): (2, 4)}


@pytest.mark.parametrize("name,exporter", list(PACKED))
def test_pack_qkv_merges_projections_of_one_input(name, exporter):
    """Self-attention packs q, k and v; BART's cross attention packs k and v only (q reads the decoder)."""
    groups, removed = PACKED[name, exporter]
    source = hd.export_dynamic(name, exporter)
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, pack_qkv=True, report=report)
    plain = aonnx.fuse(source)
    count = lambda proto, op: sum(n.op_type == op for n in proto.graph.node)  # noqa: E731
    assert report.packed == groups == count(fused, "Split") - count(plain, "Split"), str(report)
    assert count(plain, "MatMul") - count(fused, "MatMul") == removed
    onnx.checker.check_model(fused)
    original, changed = session(source), session(fused)
    kind = hd.MODELS[name][1]
    for batch, seq in SHAPES:
        feeds = hd.padded_feeds(kind, batch, seq)
        assert max_difference(changed.run(None, feeds), original.run(None, feeds)) <= TOL


def test_pack_qkv_leaves_projections_of_different_inputs():
    """Cross attention with one k/v projection: q reads x, k and v read memory: nothing to pack."""
    model, args, _ = _cross_case()
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=["x", "memory", "memory_mask"])
    source = onnx.load_from_string(f.getvalue())
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, pack_qkv=True, report=report)
    assert report.packed == 0 and len(report.replaced) == 1, str(report)
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in aonnx.fuse(source).graph.node]


def _cross_case():
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    return om.CrossWithBias().eval(), (x, memory, mask), None


@functools.lru_cache(maxsize=None)
def _gpt2_sessions():
    source = hd.export_dynamic("gpt2", "dynamo")
    return session(source), session(aonnx.fuse(source))


@settings(max_examples=12, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=8, max_size=8), min_size=1, max_size=3))
def test_causal_padding_rows_without_keys_at_any_padding(rows):
    """Any padding pattern (holes, left, right, none kept): rows whose kept keys all lie ahead are patched."""
    original, changed = _gpt2_sessions()
    mask = np.array(rows, dtype=np.int64)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 64, mask.shape), "attention_mask": mask}
    assert max_difference(changed.run(None, feeds), original.run(None, feeds)) <= TOL
