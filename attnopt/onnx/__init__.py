"""ONNX pipelines: export with the standard ``Attention`` operator, fuse attention in existing graphs.

    attnopt.onnx.export(model, (x,), "model.onnx", opset=23)
    fused = attnopt.onnx.fuse("bert_opset18.onnx")
"""

from . import verify
from .emit import MIN_OPSET, WINDOW_OPSET
from .export import export
from .fuse import fuse
from .report import OnnxReport

__all__ = ["MIN_OPSET", "WINDOW_OPSET", "OnnxReport", "export", "fuse", "verify"]
