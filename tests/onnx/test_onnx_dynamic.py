"""fuse on dynamic-shape exports of tiny Hugging Face models, from both exporters.

Each export has dynamic batch and sequence. The fused graph must load in ONNX Runtime and equal the
unfused one at two shapes (batch 1 and batch 4), on rows that are unpadded, left-padded,
right-padded and fully padded; causal and padding structure must be recognised with the lengths
symbolic.
"""

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

import attnopt.onnx as aonnx
from attnopt.onnx.fuse import default_opset
from attnopt.onnx.verify import max_difference, session

import hf_dynamic as hd
import onnx_models as om

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")

TOL = 1e-5
SHAPES = ((1, 6), (4, 9))  # (batch, seq)

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
