"""OnnxReport: the sites of an export or fuse, plus the opset and the verified difference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from attnopt.report import Report


@dataclass
class OnnxReport(Report):
    opset: int | None = None
    attention_nodes: int = 0  # Attention nodes in the resulting model
    max_diff: float | None = None  # ONNX Runtime vs the source, when verified
    packed: int = 0  # q/k/v projection groups merged into one MatMul (fuse's pack_qkv)
    #: relative position biases computed once per offset, by the value each gives (fuse's position_bias.py)
    position_biases: list[str] = dataclasses.field(default_factory=list)
    #: nodes fused by each of onnxscript's ONNX Runtime rule sets (fuse's target="onnxruntime")
    runtime_fusions: dict[str, int] = dataclasses.field(default_factory=dict)

    def sanitize(self) -> None:
        """Concrete ints where a dynamic-shape capture left symbolic sizes in the sites."""
        self.sites = [
            dataclasses.replace(s, **{
                f.name: _concrete(getattr(s, f.name))
                for f in dataclasses.fields(s) if isinstance(getattr(s, f.name), (torch.SymInt, torch.SymFloat))
            })
            for s in self.sites
        ]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "opset": self.opset, "attention_nodes": self.attention_nodes,
                "max_diff": self.max_diff, "packed": self.packed, "runtime_fusions": dict(self.runtime_fusions),
                "position_biases": list(self.position_biases)}

    def __str__(self) -> str:
        lines = [super().__str__(), f"ONNX opset {self.opset}: {self.attention_nodes} Attention node(s)"]
        if self.packed:
            lines.append(f"{self.packed} group(s) of q/k/v projections packed into one MatMul")
        if self.position_biases:
            lines.append(f"{len(self.position_biases)} relative position bias(es) computed once per offset "
                         "(Nq + Nk - 1 buckets gathered, not Nq * Nk)")
        if self.runtime_fusions:
            done = ", ".join(f"{name} x{count}" for name, count in self.runtime_fusions.items() if count)
            lines.append(f"ONNX Runtime fusions: {done or 'none matched'}")
        if self.max_diff is not None:
            lines.append(f"ONNX Runtime vs source: max |difference| = {self.max_diff:.3g}")
        return "\n".join(lines)


def _concrete(value):
    node = value.node
    return type(node.hint)(node.hint) if node.has_hint() else None
