"""The ``attnopt onnx`` command line."""

import json
import warnings

import onnx
import pytest
import torch

from attnopt.cli import main

import onnx_models as om

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")


def test_fuse_verify(tmp_path, capsys):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = om.CausalPaddedGQA().eval()
    x, mask = torch.randn(2, 6, 32), torch.ones(2, 6)
    onnx.save(torch.onnx.export(model, (x, mask), dynamo=True, opset_version=18).model_proto, source)
    capsys.readouterr()  # the exporter's progress lines
    assert main(["onnx", "fuse", str(source), "-o", str(out), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_nodes"] == 1 and report["max_diff"] <= 1e-5
    assert [n.op_type for n in onnx.load(out).graph.node].count("Attention") == 1


def test_export_verify(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["onnx", "export", "onnx_models:Softcapped", "--input", "2x5x32xfloat32", "-o", str(out),
                 "--verify"]) == 0
    assert "1 Attention node" in capsys.readouterr().out
    assert out.exists()


def test_errors_are_reported(tmp_path, capsys):
    assert main(["onnx", "export", "onnx_models:Softcapped", "--input", "2x5x32xfloat32", "-o",
                 str(tmp_path / "o.onnx"), "--opset", "18"]) == 2
    assert "opset 23" in capsys.readouterr().err
