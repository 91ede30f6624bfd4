"""The ``attnopt onnx`` command line."""

import json
import re
import sys
import textwrap
import warnings

import onnx
import pytest
import torch

import attnopt
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
    assert main(["onnx", "fuse", str(source), "-o", str(out), "--verify", "--pack-qkv", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_nodes"] == 1 and report["max_diff"] <= 1e-5
    assert report["packed"] == 1  # q and the k/v projection read the same x
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


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"attnopt {attnopt.__version__} ")


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder with the user's model file, as the current directory of a console-script run."""
    (tmp_path / "cli_user_model.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F


        class Causal(torch.nn.Module):
            def forward(self, x):  # [B, N, 32] as 4 heads of 8
                b, n, _ = x.shape
                q = x.view(b, n, 4, 8).transpose(1, 2)
                return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, n, 32)


        def build():
            return Causal()
    """))
    (tmp_path / "cli_broken_model.py").write_text("import no_such_dependency_of_the_model\n")
    monkeypatch.chdir(tmp_path)
    # a console script's sys.path holds its own folder, not the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    for name in ("cli_user_model", "cli_broken_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("cli_user_model", "cli_broken_model"):
        sys.modules.pop(name, None)


def test_export_imports_from_the_current_directory(user_folder, capsys):
    assert main(["onnx", "export", "cli_user_model:build", "--input", "2x5x32xfloat32", "-o", "out.onnx"]) == 0
    assert "ONNX opset 23" in capsys.readouterr().out
    assert (user_folder / "out.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["onnx", "export", "no_such_module:build"], "no module named 'no_such_module' in the current directory"),
    (["onnx", "export", "no_such_package.models:build"], "no module named 'no_such_package'"),
    (["onnx", "export", "cli_user_model:nope"],
     r"module 'cli_user_model' \(.*cli_user_model\.py\) has no attribute 'nope'"),
    (["onnx", "export", "cli_broken_model:build"],
     "importing 'cli_broken_model' failed: No module named 'no_such_dependency_of_the_model'"),
    (["onnx", "export", "cli_user_model"], "is not 'package.module:attribute'"),
    (["onnx", "fuse", "missing.onnx"], "input model 'missing.onnx' is not a file"),
    (["onnx", "export", "cli_user_model:build", "-o", "no_such_folder/out.onnx"], "folder .* does not exist"),
])
def test_missing_module_attribute_or_file_is_one_line(user_folder, capsys, argv, message):
    if "-o" not in argv:
        argv = [*argv, "-o", "out.onnx"]
    if argv[1] == "export":
        argv = [*argv, "--input", "2x5x32xfloat32"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("attnopt: error: ") and "Traceback" not in line
    assert re.search(message, line), line
    assert not (user_folder / "out.onnx").exists()


def test_initializers_are_copied_not_shared_read_only():
    """ONNX initializers are read-only numpy views: torch gets a writable copy (no "not writable" warning)."""
    import numpy as np

    from attnopt.onnx.view import _tensor

    frozen = np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32).reshape(2, 3)
    assert not frozen.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _tensor(frozen)
    assert t.data_ptr() != frozen.ctypes.data and torch.equal(t, torch.arange(6.0).view(2, 3))
    writable = np.ones(3, dtype=np.float32)
    assert _tensor(writable).data_ptr() == writable.ctypes.data  # no copy when none is needed


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("attnopt: error: ") and "Traceback" not in captured.err
    return line


def test_nothing_to_fuse_is_one_line(tmp_path, capsys):
    source, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1)).eval()
    onnx.save(torch.onnx.export(model, (torch.randn(2, 8),), dynamo=True, opset_version=18).model_proto, source)
    capsys.readouterr()
    assert main(["onnx", "fuse", str(source), "-o", str(out)]) == 2
    assert re.search(r"nothing (to fuse|fused) in .*softmax", _one_error_line(capsys))
    assert not out.exists()


def test_unsupported_opset_and_unreadable_file_are_one_line(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"not a protobuf")
    assert main(["onnx", "fuse", str(source), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "cannot read" in _one_error_line(capsys)
    model = om.SDPABlock("causal").eval()
    onnx.save(torch.onnx.export(model, (torch.randn(2, 5, 32),), dynamo=True, opset_version=18).model_proto, source)
    capsys.readouterr()
    assert main(["onnx", "fuse", str(source), "-o", str(tmp_path / "o.onnx"), "--opset", "18"]) == 2
    assert "opset 23" in _one_error_line(capsys)


@pytest.mark.parametrize("flags,expected", [([], None), (["--no-runtime-fusions"], False)])
def test_fuse_passes_the_runtime_fusions_switch(tmp_path, capsys, monkeypatch, flags, expected):
    import attnopt.onnx as aonnx

    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(torch.onnx.export(om.CausalPaddedGQA().eval(), (torch.randn(2, 6, 32), torch.ones(2, 6)),
                                dynamo=True, opset_version=18).model_proto, source)
    seen = {}
    real = aonnx.fuse

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(aonnx, "fuse", spy)
    assert main(["onnx", "fuse", str(source), "-o", str(out), "--target", "onnxruntime", *flags]) == 0
    assert seen["runtime_fusions"] is expected and seen["target"] == "onnxruntime"
