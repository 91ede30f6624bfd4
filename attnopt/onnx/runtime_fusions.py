"""``fuse(..., target="onnxruntime")``, the rest of the graph: onnxscript's ONNX Runtime fusions that are
exact and measured faster.

Attention sites are attnopt's own (``fuse.py``, ``contrib.py``); after them, onnxscript folds the graph's
constants and applies the rule sets below from ``onnxscript.rewriter.ort_fusions``. Each computes the
function of the nodes it replaces with one ONNX Runtime kernel, up to floating-point rounding:

* ``gelu``: ``0.5 * x * (1 + erf(x / sqrt(2)))`` as ``com.microsoft.Gelu``, the tanh form as
  ``FastGelu`` (the same formula);
* ``bias_gelu``: the bias ``Add`` before a ``Gelu`` folded into ``com.microsoft.BiasGelu``;
* ``rms_normalization``: ``x / sqrt(mean(x^2) + eps) * w`` as ``SimplifiedLayerNormalization``,
  in the precision the graph computes it in.

Measured with ``benchmarks/onnx.py``'s models (ONNX Runtime 1.32 CPU, one thread, 512 tokens, medians
of 60 interleaved rounds, ms without -> with them): BERT 4.62 -> 4.47, ViT 3.81 -> 3.61, BART
6.56 -> 6.44 (Gelu, BiasGelu), Llama 5.01 -> 4.83 (RMS normalization). Left out, each for a measured or
stated reason:

* ``SkipLayerNormalization`` (residual ``Add`` + ``LayerNormalization``): ONNX Runtime's CPU kernel is
  about 4.5 times slower than the two nodes it replaces (170 against 35 us at ``[1, 512, 64]``, 1.97
  against 0.44 ms at ``[1, 512, 768]``); GPT-2 went 4.46 -> 4.87 ms, ViT 3.73 -> 4.04.
  ``SkipSimplifiedLayerNormalization`` measured no faster on Llama (4.67 against 4.68 ms);
* onnxscript's SDPA, MultiHeadAttention, GroupQueryAttention and Attention rules: attention is
  attnopt's, and those rules do not keep a row with no visible key as the original computes it;
* the optimizer's other rewrites (``onnxscript.optimizer.optimize``): measured no faster, and its
  ``Flatten`` to ``Reshape`` rule left a TorchScript T5 export reading a value it no longer computes;
* rotary embeddings (``RotaryEmbedding``): the rules did not match the Hugging Face Llama exports
  measured, and ONNX Runtime 1.32 rejects that operator at batch > 1 in attnopt's own export;
* the float16 softmax up-cast removal: the softmax then rounds in float16, which the original does not.

onnxscript's pattern constants match within a relative 1e-5 (``sqrt(2)``, ``0.044715``); exporters write
them as the exact float32 values.
"""

from __future__ import annotations

import importlib
import warnings

import onnx

#: the rule sets applied, by name, as (module in onnxscript.rewriter.ort_fusions, attribute)
RULE_SETS = {
    "gelu": (("erfgelu", "rules"), ("gelu", "gelu_rules")),
    "bias_gelu": (("bias_gelu", "bias_gelu_rules"),),
    "rms_normalization": (("rms_normalization", "rms_normalization_ruleset"),),
}


def fuse_for_onnxruntime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` with the rule sets of ``RULE_SETS`` applied, and how many nodes each fused."""
    try:
        from onnxscript import ir, optimizer
    except ImportError as err:
        raise ImportError(f"fuse(..., target=\"onnxruntime\") needs onnxscript ({err}): pip install "
                          "'attnopt[onnx]', or pass runtime_fusions=False for attention alone") from None

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # deserializing may take over the proto's tensors
    graph = ir.serde.deserialize_model(copy)
    ir.passes.common.ShapeInferencePass()(graph)  # the rules check ranks and element types
    optimizer.fold_constants_ir(graph)  # the rules read constants, folded from Constant nodes
    counts = {}
    for name, sources in RULE_SETS.items():
        counts[name] = 0
        for module, attribute in sources:
            rules = getattr(importlib.import_module(f"onnxscript.rewriter.ort_fusions.{module}"), attribute)
            counts[name] += rules.apply_to_model(graph)
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    fused = ir.serde.serialize_model(graph)
    problem = _unordered_input(fused.graph)
    if problem is not None:  # a rewrite that lost a value: keep the graph as it came
        warnings.warn(f"onnxscript's ONNX Runtime fusions left {problem}; the graph keeps attention fusion "
                      "alone", RuntimeWarning, stacklevel=3)
        return model, {}
    return fused, counts


def _unordered_input(graph: onnx.GraphProto) -> str | None:
    """The first node input that nothing before it defines, described; None when every input is defined."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        missing = next((i for i in node.input if i not in defined), None)
        if missing is not None:
            return f"node {node.name!r} reading {missing!r}, which no earlier node computes"
        defined.update(node.output)
    return None
