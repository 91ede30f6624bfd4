"""ONNX fusers side by side: attnopt.onnx.fuse, ONNX Runtime's optimizer and onnxscript's ORT fusions.

    python benchmarks/onnx.py [--length 512] [--llama-length 2048] [--repeat 21] [--out benchmarks/results/onnx.md]

Models: small random Hugging Face configs (2 layers, d 64, 4 heads, eager attention), exported the way
users export them, with dynamic batch and sequence: ``torch.onnx.export(dynamo=True)`` at opset 18,
or the TorchScript exporter at opset 17 where torch.export cannot trace the model (T5). Each export
goes through:

* ``attnopt``: ``attnopt.onnx.fuse`` (standard ``Attention`` nodes, opset 23);
* ``attnopt+pack``: the same with ``pack_qkv=True`` (q/k/v projections of one input as one MatMul);
* ``attnopt-ort-attn``: ``target="onnxruntime", runtime_fusions=False``: ONNX Runtime's
  ``com.microsoft.MultiHeadAttention`` where it is exact, or ``com.microsoft.Attention`` with the q/k/v
  projections inside where they are projections of one input (``attnopt/onnx/contrib.py``), the standard
  operator elsewhere; the rest of the graph as it was;
* ``attnopt-ort``: ``target="onnxruntime"``: the same, then onnxscript's ONNX Runtime fusions that are
  exact and measured faster (Gelu, BiasGelu, RMS normalization: ``attnopt/onnx/runtime_fusions.py``);
* ``ort``: ``onnxruntime.transformers.optimizer.optimize_model`` with the model's ``model_type``
  (contrib ``Attention`` / ``MultiHeadAttention`` nodes); Llama has no model type there;
* ``onnxscript``: ``onnxscript.rewriter.ort_fusions.optimize_for_ort``.

Columns: fused sites out of the model's attention sites; the largest difference to the unfused graph
on batch 4 x 16 with rows unpadded, left-padded, right-padded and fully padded, over every output
and over real tokens only (``inf``: NaN where the unfused graph has none, or the other way); the
median time of one forward pass (batch 1, ``--length`` tokens, ONNX Runtime CPU, one thread),
measured in interleaved rounds (one call of each graph in turn), and its ratio to the unfused graph.
Times are CPU time of the calling thread (with one intra-op thread ONNX Runtime runs every kernel on
it), so that time the process spends descheduled on a loaded machine does not count.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

# run as a script, this file's folder leads sys.path and this file would shadow the onnx package
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIDDEN, HEADS, LAYERS = 64, 4, 2
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"}


# ----------------------------------------------------------------- models
def _eager(model, kind):
    model.config._attn_implementation = "eager"
    model.config.use_cache = False
    return Wrapped(model, kind).eval()


class Wrapped(torch.nn.Module):
    """The model's first output tensor from plain tensor inputs."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, first, attention_mask=None, decoder_input_ids=None):
        if self.kind == "image":
            return self.model(pixel_values=first)[0]
        extra = {"decoder_input_ids": decoder_input_ids} if self.kind == "seq2seq" else {}
        return self.model(input_ids=first, attention_mask=attention_mask, use_cache=False, **extra)[0]


def build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=128)
    if name == "bert":
        config = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               intermediate_size=4 * HIDDEN, max_position_embeddings=2048, **common)
        return _eager(tf.BertModel(config, add_pooling_layer=False), "text")
    if name == "gpt2":
        config = tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2048, **common)
        return _eager(tf.GPT2Model(config), "text")
    if name == "llama":
        config = tf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                num_key_value_heads=2, intermediate_size=4 * HIDDEN, max_position_embeddings=4096,
                                **common)
        return _eager(tf.LlamaModel(config), "text")
    if name == "bart":
        config = tf.BartConfig(d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                               decoder_attention_heads=HEADS, encoder_ffn_dim=4 * HIDDEN, decoder_ffn_dim=4 * HIDDEN,
                               max_position_embeddings=2048, **common)
        return _eager(tf.BartModel(config), "seq2seq")
    if name == "t5":
        config = tf.T5Config(d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=4 * HIDDEN, num_layers=1,
                             num_decoder_layers=1, num_heads=HEADS, **common)
        return _eager(tf.T5Model(config), "seq2seq")
    if name == "vit":  # 88 x 88 pixels in 4 x 4 patches: 484 tokens and the class token
        config = tf.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=4 * HIDDEN, image_size=88, patch_size=4, num_channels=3)
        return _eager(tf.ViTModel(config, add_pooling_layer=False), "image")
    raise ValueError(name)


#: name -> (ORT optimizer model_type or None, exporter)
MODELS = {"bert": ("bert", "dynamo"), "gpt2": ("gpt2", "dynamo"), "llama": (None, "dynamo"),
          "bart": ("bart", "dynamo"), "t5": ("t5", "torchscript"), "vit": ("vit", "dynamo")}


KINDS = {"bert": "text", "gpt2": "text", "llama": "text", "bart": "seq2seq", "t5": "seq2seq", "vit": "image"}


def names(kind):
    return {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"],
            "seq2seq": ["input_ids", "attention_mask", "decoder_input_ids"]}[kind]


def feeds(kind: str, batch: int, length: int, padded: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "image":
        return {"pixel_values": rng.standard_normal((batch, 3, 88, 88)).astype(np.float32)}
    mask = np.ones((batch, length), dtype=np.int64)
    if padded:
        for row in range(batch):
            if row % 4 == 1:
                mask[row, : length // 3] = 0  # left
            elif row % 4 == 2:
                mask[row, length - length // 3:] = 0  # right
            elif row % 4 == 3:
                mask[row] = 0  # nothing to attend to
    out = {"input_ids": rng.integers(0, 128, (batch, length)), "attention_mask": mask}
    if kind == "seq2seq":
        out["decoder_input_ids"] = rng.integers(0, 128, (batch, length))
    return out


def export(name: str) -> onnx.ModelProto:
    model = build(name)
    kind = model.kind
    args = tuple(torch.from_numpy(v) for v in feeds(kind, 2, 16, padded=True).values())
    axes = {n: ({0: "batch"} if kind == "image" else {0: "batch", 1: "dseq" if n == "decoder_input_ids" else "seq"})
            for n in names(kind)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if MODELS[name][1] == "dynamo":
            from torch.export import Dim

            dims = {}
            shapes = tuple({a: dims.setdefault(s, Dim(s)) for a, s in ax.items()} for ax in axes.values())
            program = torch.onnx.export(model, args, dynamo=True, opset_version=18, dynamic_shapes=shapes,
                                        verbose=False)
            return program.model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=names(kind),
                          dynamic_axes=axes)
        return onnx.load_from_string(f.getvalue())


# ----------------------------------------------------------------- fusers
def fuse_attnopt(source, pack_qkv=False, target="onnx", runtime_fusions=None):
    import attnopt.onnx as aonnx

    report = aonnx.OnnxReport()
    fused = aonnx.fuse(source, report=report, pack_qkv=pack_qkv, target=target, runtime_fusions=runtime_fusions)
    return fused, report.attention_nodes


def fuse_ort(source, model_type):
    from onnxruntime.transformers.optimizer import optimize_model

    if model_type is None:
        return None, "no model type"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = onnx.ModelProto()
        copy.CopyFrom(source)  # the optimizer edits the model it is given
        optimized = optimize_model(copy, model_type=model_type, num_heads=HEADS, hidden_size=HIDDEN,
                                   opt_level=0)
    return optimized.model, _fused(optimized.model)


def fuse_onnxscript(source):
    import onnxscript
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    copy = onnx.ModelProto()
    copy.CopyFrom(source)  # the IR may share the proto's tensors
    model = onnxscript.ir.serde.deserialize_model(copy)
    model, _ = optimize_for_ort(model)
    proto = onnxscript.ir.serde.serialize_model(model)
    return proto, _fused(proto)


def _fused(proto) -> int:
    return sum(n.op_type in ATTENTION_OPS for n in proto.graph.node)


# ----------------------------------------------------------------- measuring
def session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bind(sess, inputs: dict) -> dict:
    """The inputs by the session's own names, in order (exporters name them after forward's arguments)."""
    return dict(zip([i.name for i in sess.get_inputs()], inputs.values()))


def differences(sess, reference, kind) -> tuple[float, float]:
    """(all rows, real tokens): largest |difference| to the unfused outputs on padded inputs."""
    inputs = feeds(kind, 4, 16, padded=True, seed=1)
    got, expected = sess.run(None, bind(sess, inputs))[0], reference.run(None, bind(reference, inputs))[0]
    both = np.isnan(got) == np.isnan(expected)
    diff = np.where(np.isnan(got) | np.isnan(expected), 0.0, np.abs(got.astype(np.float64) - expected))
    everywhere = float(diff.max()) if both.all() else float("inf")
    if kind != "text":
        return everywhere, everywhere
    real = inputs["attention_mask"].astype(bool)
    real_ok = both[real].all()
    return everywhere, float(diff[real].max()) if real_ok else float("inf")


def timings(sessions: dict, kind: str, length: int, repeat: int) -> dict[str, float]:
    inputs = feeds(kind, 1, length, padded=False)
    bound = {name: bind(sess, inputs) for name, sess in sessions.items()}
    for name, sess in sessions.items():
        sess.run(None, bound[name])  # warm-up
    times = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, sess in sessions.items():
            start = time.thread_time()
            sess.run(None, bound[name])
            times[name].append(time.thread_time() - start)
    return {name: (statistics.median(t), _spread(t)) for name, t in times.items()}


def _spread(samples: list[float]) -> float:
    """Interquartile range over median: how far one round strays from another."""
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / statistics.median(samples)


def run(name: str, length: int, llama_length: int, repeat: int) -> list[dict]:
    model_type, exporter = MODELS[name]
    source = export(name)
    kind = KINDS[name]
    import attnopt.onnx as aonnx

    reference = session(source)
    report = aonnx.OnnxReport()
    aonnx.fuse(source, report=report)
    sites = len(report.sites)
    graphs = {"unfused": (source, None)}
    for label, fuser in (("attnopt", lambda: fuse_attnopt(source)),
                         ("attnopt+pack", lambda: fuse_attnopt(source, pack_qkv=True)),
                         ("attnopt-ort-attn", lambda: fuse_attnopt(source, target="onnxruntime",
                                                                   runtime_fusions=False)),
                         ("attnopt-ort", lambda: fuse_attnopt(source, target="onnxruntime")),
                         ("ort", lambda: fuse_ort(source, model_type)),
                         ("onnxscript", lambda: fuse_onnxscript(source))):
        start = time.perf_counter()
        try:
            proto, fused = fuser()
        except Exception as err:  # a peer that fails on a graph is a row, not a crash
            proto, fused = None, f"fails: {type(err).__name__}"
        graphs[label] = (proto, fused, time.perf_counter() - start)
    sessions, rows = {}, []
    for label, (proto, fused, *took) in graphs.items():
        row = {"model": name, "exporter": exporter, "fuser": label, "nodes": len(proto.graph.node) if proto else None}
        if proto is not None:
            try:
                sessions[label] = session(proto)
            except Exception as err:
                fused = f"does not load: {str(err).splitlines()[0][:60]}"
        if label in sessions:
            try:
                row["diff_all"], row["diff_real"] = differences(sessions[label], reference, kind)
            except Exception as err:  # ONNX Runtime rejects the graph at run time
                del sessions[label]
                fused = f"{fused}/{sites}, fails to run: {str(err).split('Status Message: ')[-1][:50]}"
        row["fused"] = "-" if label == "unfused" else (f"{fused}/{sites}" if isinstance(fused, int) else fused)
        row["fuse_s"] = took[0] if took else None
        rows.append(row)
    lengths = [length] if kind == "image" else sorted({length, *([llama_length] if name == "llama" else [])})
    for n in lengths:
        medians = timings(sessions, kind, n, repeat)
        for row in rows:
            if row["fuser"] in medians:
                row[f"t{n}"], row[f"spread{n}"] = medians[row["fuser"]]
                row[f"x{n}"] = medians["unfused"][0] / row[f"t{n}"]
    return rows


def table(rows: list[dict], length: int) -> str:
    lines = ["| model | exporter | fuser | fused | nodes | max diff, all rows | max diff, real tokens | "
             "ms (seq) | speedup vs unfused |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = [(k[1:], r[k]) for k in r if k.startswith("t") and k[1:].isdigit()]
        ms = ", ".join(f"{1000 * t:.1f} ({n})" for n, t in times) or "-"
        speed = ", ".join(f"{r['x' + n]:.2f}x" for n, _ in times) or "-"
        diff = [("-" if r.get(k) is None else f"{r[k]:.1e}") for k in ("diff_all", "diff_real")]
        lines.append(f"| {r['model']} | {r['exporter']} | {r['fuser']} | {r['fused']} | {r['nodes'] or '-'} | "
                     f"{diff[0]} | {diff[1]} | {ms} | {speed} |")
    return "\n".join(lines)


def _median_spread(rows: list[dict]) -> float:
    spreads = [r[k] for r in rows for k in r if k.startswith("spread")]
    return statistics.median(spreads) if spreads else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--llama-length", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    rows, load = [], [os.getloadavg()[0]]
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.extend(run(name, args.length, args.llama_length, args.repeat))
        load.append(os.getloadavg()[0])
    import onnxruntime
    import onnxscript

    header = (f"# ONNX fusers side by side\n\n`python benchmarks/onnx.py --length {args.length} --repeat {args.repeat}`"
              f"  \ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnxscript "
              f"{onnxscript.__version__}, {platform.processor() or platform.machine()}, ONNX Runtime CPU, one thread; "
              "times are medians of interleaved rounds, batch 1, in CPU time of the calling thread.  \n"
              f"Load average (1 min) during the run: {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} "
              f"cores; rounds of one graph spread by {_median_spread(rows):.0%} of their median (interquartile "
              "range, median over graphs).\n\n")
    text = header + table(rows, args.length) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
