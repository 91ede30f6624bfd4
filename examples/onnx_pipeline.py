"""ONNX both ways: export with standard ``Attention`` nodes, and fuse the attention of an ordinary export.

    python examples/onnx_pipeline.py                      # tiny random Llama, CPU, a few seconds
    python examples/onnx_pipeline.py --size small --length 256 --keep out/   # keep the .onnx files

1. ``attnopt.onnx.export``: attnopt captures the model, replaces each attention site
   with its op, and torch.onnx (dynamo) writes one ONNX ``Attention`` node per site
   (opset 23; sliding windows need 25). ONNX Runtime runs the file and is compared
   with PyTorch.
2. ``attnopt onnx fuse`` (``attnopt.onnx.fuse``): a model exported the ordinary way
   (``torch.onnx.export``, opset 18) holds each attention as MatMul / Softmax / MatMul
   with the mask, ``repeat_kv`` and scaling around them. ``fuse`` finds them in the
   ONNX graph with the same detection as the PyTorch pass and replaces each with one
   ``Attention`` node; ONNX Runtime runs both files on the same inputs. The command
   line does the same: ``attnopt onnx fuse plain.onnx -o fused.onnx --verify``.

The model is a Hugging Face Llama with eager attention and random weights (nothing
downloaded), called with a left-padded ``attention_mask``: causal + key padding +
grouped-query attention, whose padded rows (no visible key) the Attention node is
patched to reproduce. Files go to a temporary directory (``--keep DIR`` keeps them).
At opset 23 torch.onnx itself fuses Llama's rotary embedding into a ``RotaryEmbedding``
node that ONNX Runtime 1.23 rejects for 64-dim heads from 512 tokens (an ordinary
``torch.onnx.export`` at opset 23 fails the same way); the ordinary export here uses
opset 18.

Both comparisons are run here with ONNX Runtime on the same inputs (``verify=True``
does the same inside ``export`` and ``fuse``). Times are ONNX Runtime's on CPU; its
memory is not measured here.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch

import attnopt.onnx as aonnx
from attnopt.measure import compare

SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
}


class Logits(torch.nn.Module):
    """The model's logits only (no cache objects), for export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class Result:
    export_sites: int  # attention sites attnopt found when exporting
    export_attention_nodes: int  # Attention nodes in the exported file
    export_max_diff: float  # ONNX Runtime (exported file) vs PyTorch
    plain_softmax_nodes: int  # Softmax nodes in the ordinary export
    fuse_sites: int
    fuse_replaced: int
    fused_attention_nodes: int
    fused_softmax_nodes: int
    fuse_max_diff: float  # ONNX Runtime: fused file vs ordinary file, same inputs
    fuse_vs_torch: float  # ONNX Runtime (fused file) vs PyTorch


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--opset", type=int, default=23)
    parser.add_argument("--repeat", type=int, default=5, help="timed ONNX Runtime runs (medians)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="write the .onnx files here and keep them")
    args = parser.parse_args(argv)

    import transformers

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and progress lines
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SIZES[args.size], max_position_embeddings=max(64, args.length),
                                      attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Logits(transformers.LlamaForCausalLM(config)).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length))
    mask = torch.ones_like(ids)
    mask[1:, : args.length // 4] = 0  # left padding: the first rows of sequence 1 see no key
    with torch.no_grad():
        expected = model(ids, mask).numpy()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or scratch
        os.makedirs(folder, exist_ok=True)
        exported, plain, fused = (os.path.join(folder, f) for f in ("attnopt.onnx", "plain.onnx", "fused.onnx"))

        # 1. export with one Attention node per site
        print(f"== attnopt.onnx.export(model, (input_ids, attention_mask), {exported!r}, opset={args.opset})")
        export_report = aonnx.OnnxReport()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aonnx.export(model, (ids, mask), exported, opset=args.opset, report=export_report)
        print(export_report)
        sess_exported = session(exported)
        names = [i.name for i in sess_exported.get_inputs()]
        feeds = dict(zip(names, (ids.numpy(), mask.numpy())))
        export_diff = max_abs(sess_exported.run(None, feeds)[0], expected)
        print(f"ONNX Runtime vs PyTorch, logits: max |difference| = {export_diff:.2e}")

        # 2. an ordinary export, then fuse
        print(f"\n== torch.onnx.export(model, ..., {plain!r}, opset_version=18), then attnopt onnx fuse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, mask), plain, dynamo=True, opset_version=18, verbose=False)
        source = onnx.load(plain)
        fuse_report = aonnx.OnnxReport()
        fused_model = aonnx.fuse(source, opset=args.opset, report=fuse_report)
        onnx.save(fused_model, fused)
        print(fuse_report)
        print(f"same as: attnopt onnx fuse {plain} -o {fused} --verify")
        sess_plain, sess_fused = session(plain), session(fused)
        plain_feeds = dict(zip([i.name for i in sess_plain.get_inputs()], (ids.numpy(), mask.numpy())))
        fused_feeds = dict(zip([i.name for i in sess_fused.get_inputs()], (ids.numpy(), mask.numpy())))
        out_plain, out_fused = sess_plain.run(None, plain_feeds)[0], sess_fused.run(None, fused_feeds)[0]
        fuse_diff, fuse_vs_torch = max_abs(out_fused, out_plain), max_abs(out_fused, expected)
        nodes = {name: (count(m, "Softmax"), count(m, "Attention"), len(m.graph.node))
                 for name, m in (("ordinary export", source), ("fused", fused_model))}
        for name, (softmax, attention, total) in nodes.items():
            print(f"  {name:<16} {total:4d} nodes: {softmax} Softmax, {attention} Attention")
        print(f"ONNX Runtime, fused vs ordinary file: max |difference| = {fuse_diff:.2e}; "
              f"fused vs PyTorch: {fuse_vs_torch:.2e}")

        runs = compare({"ordinary export": lambda: sess_plain.run(None, plain_feeds),
                        "fused": lambda: sess_fused.run(None, fused_feeds),
                        "attnopt export": lambda: sess_exported.run(None, feeds)}, repeat=args.repeat, peak=False)
        print(f"ONNX Runtime CPU, {args.batch} x {args.length} tokens (median of {args.repeat}): "
              + ", ".join(f"{name} {m.seconds * 1e3:.2f} ms" for name, m in runs.items()))
        if args.keep:
            print(f"files kept in {folder}: {', '.join(sorted(os.listdir(folder)))}")

    return Result(
        export_sites=len(export_report.sites), export_attention_nodes=export_report.attention_nodes,
        export_max_diff=export_diff, plain_softmax_nodes=nodes["ordinary export"][0],
        fuse_sites=len(fuse_report.sites), fuse_replaced=len(fuse_report.replaced),
        fused_attention_nodes=nodes["fused"][1], fused_softmax_nodes=nodes["fused"][0],
        fuse_max_diff=fuse_diff, fuse_vs_torch=fuse_vs_torch,
    )


if __name__ == "__main__":
    main()
