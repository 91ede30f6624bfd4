"""fuse(..., target="onnxruntime"): com.microsoft.MultiHeadAttention where exact (com.microsoft.Attention
when q/k/v are projections of one input), the standard op elsewhere.

Fused graphs must equal the unfused ones in ONNX Runtime at two shapes, on rows that are unpadded,
left-padded, right-padded and fully padded (a fully padded row averages the values in the original);
sites the contrib operator cannot compute exactly keep the standard operator, with the reason.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt.onnx as aonnx
from attnopt.onnx.verify import max_difference, session

import hf_dynamic as hd

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")

TOL, SHAPES = hd.TOL, hd.SHAPES  # (batch, seq)
MHA = "onnx:com.microsoft.MultiHeadAttention"
PACKED = "onnx:com.microsoft.Attention"  # the q/k/v projections inside
STANDARD = "onnx:Attention"

#: (model, exporter) -> ({kernel: sites}, why the standard op's sites keep it)
CASES = {
    ("bert", "dynamo"): ({PACKED: 2}, None),
    ("gpt2", "dynamo"): ({PACKED: 2}, None),  # one Gemm split in three (c_attn)
    ("bart", "dynamo"): ({PACKED: 2, MHA: 1}, None),  # cross attention: q and k/v read different inputs
    ("vit", "dynamo"): ({PACKED: 2}, None),
    ("llama", "dynamo"): ({STANDARD: 2}, "grouped-query"),
    ("t5", "torchscript"): ({STANDARD: 3}, "not [B, N, H * D] projections"),
}


def ops(proto, op_type, domain=""):
    return [n for n in proto.graph.node if n.op_type == op_type and n.domain == domain]


@pytest.mark.parametrize("name,exporter", list(CASES))
def test_target_fuses_exactly_and_names_the_op(name, exporter):
    kernels, why = CASES[name, exporter]
    source = hd.export_dynamic(name, exporter)
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, target="onnxruntime", runtime_fusions=False)
    assert {k: [s.kernel for s in report.sites].count(k) for k in kernels} == kernels, str(report)
    assert len(ops(fused, "Attention", "com.microsoft")) == kernels.get(PACKED, 0)
    assert len(ops(fused, "MultiHeadAttention", "com.microsoft")) == kernels.get(MHA, 0)
    assert len(ops(fused, "Attention")) == kernels.get(STANDARD, 0)
    assert report.attention_nodes == sum(kernels.values()) == len(report.replaced)
    assert not ops(fused, "Softmax") and not report.runtime_fusions
    for site in report.sites:
        assert (site.kernel == STANDARD) == ("ONNX Attention node" in site.reason), site.reason
        if site.kernel == STANDARD:
            assert why in site.reason, site.reason
    if PACKED in kernels:  # the projections run inside the operator
        assert len(ops(fused, "MatMul") + ops(fused, "Gemm")) < len(ops(source, "MatMul") + ops(source, "Gemm"))
    if set(kernels) - {STANDARD}:
        assert any(o.domain == "com.microsoft" for o in fused.opset_import)
    original, changed = session(source), session(fused)
    kind = hd.MODELS[name][1]
    for batch, seq in SHAPES:
        feeds = hd.padded_feeds(kind, batch, seq)
        expected = original.run(None, feeds)
        assert not np.isnan(expected[0]).any()
        diff = max_difference(changed.run(None, feeds), expected)
        assert diff <= TOL, (batch, seq, diff)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 5), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_causal_padding_on_random_masks(batch, seq, seed):
    """GPT-2 (causal over key padding, unidirectional + a [B, Nk] mask): any padding pattern, holes too."""
    source = hd.export_dynamic("gpt2", "dynamo")
    fused = aonnx.fuse(source, target="onnxruntime", runtime_fusions=False)
    rng = np.random.default_rng(seed)
    mask = (rng.random((batch, seq)) < rng.random()).astype(np.int64)
    feeds = {"input_ids": rng.integers(0, 64, (batch, seq)), "attention_mask": mask}
    expected = session(source).run(None, feeds)
    assert max_difference(session(fused).run(None, feeds), expected) <= TOL


class SeparateProjections(torch.nn.Module):
    """Key padding by masked_fill with ``fill``, q/k/v from three projections (as in BERT)."""

    def __init__(self, fill, dim=32, heads=4):
        super().__init__()
        self.fill, self.heads = fill, heads
        self.q, self.k, self.v, self.out = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, keep):
        b, n, dim = x.shape
        q, k, v = (p(x).view(b, n, self.heads, dim // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep[:, None, None, :], self.fill)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim))


def _export(model, args):
    return torch.onnx.export(model.eval(), args, dynamo=True, opset_version=18).model_proto


def _padded(batch=4, n=7):
    torch.manual_seed(0)
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[1, :3], keep[2, -2:], keep[3] = False, False, False  # left, right, fully padded
    return torch.randn(batch, n, 32), keep


@pytest.mark.parametrize("fill,contrib", [(torch.finfo(torch.float32).min, True), (float("-inf"), False)])
def test_fill_decides(fill, contrib):
    """A finite fill averages the values on a fully padded row, as the contrib operator does; -inf gives
    NaN there, which it does not: that site keeps the standard operator."""
    x, keep = _padded()
    source = _export(SeparateProjections(fill), (x, keep))
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, target="onnxruntime")
    assert (report.sites[0].kernel == PACKED) == contrib, str(report)
    if not contrib:
        assert "NaN in the original" in report.sites[0].reason
    feeds = {i.name: t.numpy() for i, t in zip(session(source).get_inputs(), (x, keep))}
    expected = session(source).run(None, feeds)
    assert np.isnan(expected[0]).any() == (not contrib)  # the fully padded row
    assert max_difference(session(fused).run(None, feeds), expected) <= TOL


@pytest.mark.parametrize("name,why", [("sdpa_window", "would not be exact"), ("cross_bias_padding", "additive")])
def test_masks_it_cannot_express_keep_the_standard_op(name, why):
    from test_onnx_export import cases

    model, args, _ = cases()[name]
    source = _export(model, args)
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, target="onnxruntime")
    assert [s.kernel for s in report.sites] == [STANDARD] and why in report.sites[0].reason, str(report)
    assert not ops(fused, "MultiHeadAttention", "com.microsoft") and not ops(fused, "Attention", "com.microsoft")
    feeds = {i.name: t.numpy() for i, t in zip(session(source).get_inputs(), args)}
    assert max_difference(session(fused).run(None, feeds), session(source).run(None, feeds)) <= TOL


def test_default_target_is_the_standard_op():
    x, keep = _padded()
    fused = aonnx.fuse(_export(SeparateProjections(torch.finfo(torch.float32).min), (x, keep)))
    assert len(ops(fused, "Attention")) == 1 and not ops(fused, "Attention", "com.microsoft")
    assert all(o.domain != "com.microsoft" for o in fused.opset_import)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="target='ort'.*onnxruntime"):
        aonnx.fuse(hd.export_dynamic("vit", "dynamo"), target="ort")
