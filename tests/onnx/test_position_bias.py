"""rewrite_position_biases: T5's relative position bias computed once per offset, bit for bit.

The bias is exported the ways users export it (Hugging Face's ``T5Attention.compute_bias``, the
TorchScript exporter at opset 17 and torch.export at opset 18, encoder and decoder buckets, dynamic
lengths); the rewritten graph must give the same bytes as the original in ONNX Runtime and as PyTorch,
at query and key lengths from 0 up, equal or not. Whole T5 models, fused by ``attnopt.onnx.fuse``, must
give the same outputs with the rewrite as without it. Look-alikes whose bias is not a function of
``j - i`` alone (positions from an input, ranges of different steps, a per-key term, absolute
positions) are left as they were, with the reason.
"""

import copy
import functools
import io
import logging
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt.onnx as aonnx
from attnopt.onnx.position_bias import BucketBias, find_position_biases, rewrite_position_biases
from attnopt.onnx.verify import max_difference, session

import hf_dynamic as hd

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")


class Bias(torch.nn.Module):
    """T5's relative position bias ``[1, H, Nq, Nk]`` for the lengths of two inputs, as Hugging Face computes it.

    ``variant`` changes how the offsets are built: ``"query_minus_key"`` subtracts the other way (still a
    function of ``j - i``); the rest are look-alikes that are not.
    """

    def __init__(self, decoder: bool, variant: str = "t5", buckets: int = 32, max_distance: int = 128):
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Attention

        config = T5Config(d_model=32, d_kv=8, num_heads=3, relative_attention_num_buckets=buckets,
                          relative_attention_max_distance=max_distance, is_decoder=decoder)
        logging.disable(logging.WARNING)  # a decoder attention without a layer index warns
        self.attention = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
        logging.disable(logging.NOTSET)
        torch.manual_seed(0)
        torch.nn.init.normal_(self.attention.relative_attention_bias.weight)
        self.decoder, self.variant = decoder, variant

    def forward(self, q, k, key_ids):
        nq, nk = q.shape[1], k.shape[1]
        if self.variant == "t5":
            return self.attention.compute_bias(nq, nk)
        rows, cols = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        if self.variant == "positions_from_input":
            rows, cols = q[0, :, 0].long()[:, None], k[0, :, 0].long()[None, :]
        elif self.variant == "strided_keys":
            cols = torch.arange(0, 2 * nk, 2)[None, :]
        if self.variant == "absolute":  # [1, H, 1, Nk]
            return self.attention.relative_attention_bias(torch.arange(nk) % 8).t()[None, :, None, :]
        offsets = rows - cols if self.variant == "query_minus_key" else cols - rows
        buckets = self.attention._relative_position_bucket(offsets, bidirectional=not self.decoder)
        if self.variant == "per_key_term":
            buckets = (buckets + key_ids) % 32
        return self.attention.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


def inputs(nq: int, nk: int):
    return (torch.zeros(1, nq, 2), torch.zeros(1, nk, 2), torch.zeros(1, nk, dtype=torch.long))


@functools.lru_cache(maxsize=None)
def exported(decoder: bool, exporter: str, variant: str = "t5", dynamic: bool = True) -> onnx.ModelProto:
    model, args = Bias(decoder, variant).eval(), inputs(5, 7)
    names = ["q", "k", "key_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            nq, nk = Dim("nq"), Dim("nk")
            shapes = ({1: nq}, {1: nk}, {1: nk}) if dynamic else None
            return torch.onnx.export(model, args, dynamo=True, opset_version=18, dynamic_shapes=shapes,
                                     verbose=False).model_proto
        f = io.BytesIO()
        axes = {"q": {1: "nq"}, "k": {1: "nk"}, "key_ids": {1: "nk"}} if dynamic else None
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=names, dynamic_axes=axes)
        return onnx.load_from_string(f.getvalue())


@functools.lru_cache(maxsize=None)
def sessions(decoder: bool, exporter: str, variant: str):
    source = exported(decoder, exporter, variant)
    rewritten = copy.deepcopy(source)
    assert len(rewrite_position_biases(rewritten)) == 1
    logs = [{n.output[0] for n in m.graph.node if n.op_type == "Log"} for m in (source, rewritten)]
    assert logs[0] and logs[1] and not logs[0] & logs[1]  # the grid-sized bucket math is gone, a copy runs
    return session(source), session(rewritten), Bias(decoder, variant).eval()


def feeds(nq: int, nk: int, names) -> dict:
    return {name: t.numpy() for name, t in zip(names, inputs(nq, nk))}


CASES = [(False, "torchscript", "t5"), (True, "torchscript", "t5"), (False, "dynamo", "t5"),
         (True, "dynamo", "t5"), (False, "torchscript", "query_minus_key"), (True, "torchscript", "query_minus_key")]


@pytest.mark.parametrize("decoder,exporter,variant", CASES)
@settings(max_examples=25, deadline=None)
@given(nq=st.integers(0, 300), nk=st.integers(0, 300))
def test_bias_is_bit_exact(decoder, exporter, variant, nq, nk):
    original, rewritten, model = sessions(decoder, exporter, variant)
    run = feeds(nq, nk, [i.name for i in original.get_inputs()])
    expected, = original.run(None, run)
    got, = rewritten.run(None, run)
    assert got.shape == expected.shape == (1, 3, nq, nk)
    assert got.tobytes() == expected.tobytes()
    reference = model(*inputs(nq, nk)).detach().numpy()
    assert np.array_equal(got, reference)
    if nq > 1 and nk > 1:
        assert np.unique(got).size > 3  # buckets differ along the offsets: the comparison is not of constants


@pytest.mark.parametrize("nq,nk", [(1, 1), (512, 512), (1, 700), (700, 1), (260, 1030)])
def test_bias_is_bit_exact_at_long_offsets(nq, nk):
    """Offsets past max_distance share the last buckets; both exporters, both directions."""
    for decoder, exporter, variant in CASES[:4]:
        original, rewritten, _ = sessions(decoder, exporter, variant)
        run = feeds(nq, nk, [i.name for i in original.get_inputs()])
        assert rewritten.run(None, run)[0].tobytes() == original.run(None, run)[0].tobytes()


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
def test_t5_fused_with_the_rewrite(target, monkeypatch):
    """The fused T5 (encoder and decoder self-attention biases) gives the same outputs with the rewrite,
    bit for bit, at batch 1 and batch > 1 and two lengths, on padded rows too."""
    fuse_module = sys.modules["attnopt.onnx.fuse"]  # the module: the package exports its function by that name
    source = hd.export_dynamic("t5", "torchscript")
    report = aonnx.OnnxReport()
    rewritten = aonnx.fuse(source, target=target, report=report)
    done = report.position_biases
    monkeypatch.setattr(fuse_module, "rewrite_position_biases", lambda model: [])
    fused = aonnx.fuse(source, target=target)  # the same fusion without the rewrite
    assert len(done) == 2, done
    assert all("relative_attention_bias" in name for name in done)
    assert rewrite_position_biases(copy.deepcopy(rewritten)) == []  # what is left has no grid-sized bias
    original, fast, plain = session(source), session(rewritten), session(fused)
    for batch, seq in [*hd.SHAPES, (2, 40)]:
        run = hd.padded_feeds("seq2seq", batch, seq)
        got = fast.run(None, run)
        assert all(np.array_equal(a, b) for a, b in zip(got, plain.run(None, run)))
        assert max_difference(got, original.run(None, run)) <= hd.TOL


def test_t5_bias_values_are_bit_exact_in_the_whole_model():
    """In the unfused T5, the two biases themselves (not only what they feed) are the same bytes."""
    source = copy.deepcopy(hd.export_dynamic("t5", "torchscript"))
    rewritten = copy.deepcopy(source)
    done = rewrite_position_biases(rewritten)
    for model in (source, rewritten):
        model.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in done)
    original, fast = session(source), session(rewritten)
    for batch, seq in [(3, 11), (2, 70)]:
        run = hd.padded_feeds("seq2seq", batch, seq)
        for a, b in zip(fast.run(None, run)[-2:], original.run(None, run)[-2:]):
            assert a.shape[:2] in ((seq, seq), (seq - 2, seq - 2)) and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("variant,reason", [
    ("positions_from_input", "not computed by Range"),
    ("strided_keys", "steps differ (2 and 1)"),
    ("per_key_term", "'key_ids' is a graph input"),
    ("absolute", "Range"),
])
def test_look_alikes_are_left_alone(variant, reason):
    source = exported(False, "torchscript", variant)
    before = source.SerializeToString()
    rewritten = copy.deepcopy(source)
    assert rewrite_position_biases(rewritten) == []
    assert rewritten.SerializeToString() == before
    found = find_position_biases(source.graph)
    tables = [n.output[0] for n in source.graph.node if n.op_type == "Gather" and "relative_attention" in n.input[0]]
    assert len(tables) == 1 and not isinstance(found[tables[0]], BucketBias) and reason in found[tables[0]], found


def test_static_exports_are_left_to_onnx_runtime():
    """A static-length export holds the offsets as a folded constant (ONNX Runtime folds the rest when
    it loads the graph): there is no Range to prove the offsets by, and nothing changes."""
    source = exported(False, "torchscript", dynamic=False)
    assert not [n for n in source.graph.node if n.op_type == "Range"]
    rewritten = copy.deepcopy(source)
    assert rewrite_position_biases(rewritten) == []
    assert rewritten.SerializeToString() == source.SerializeToString()


def test_a_path_is_not_a_model():
    with pytest.raises(TypeError, match="onnx.load"):
        rewrite_position_biases("model.onnx")


def test_fuse_reports_the_rewrite():
    report = aonnx.OnnxReport()
    fused = aonnx.fuse(hd.export_dynamic("t5", "torchscript"), report=report)
    assert len(report.position_biases) == 2 and "relative position bias" in str(report)
    assert report.to_dict()["position_biases"] == report.position_biases
    assert rewrite_position_biases(fused) == []  # fuse already rewrote them: nothing left
