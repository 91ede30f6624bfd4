"""Tiny Hugging Face models exported to ONNX the two ways users do: dynamic batch and sequence.

``export_dynamic(name, exporter)`` exports one model with ``torch.onnx.export(dynamo=True)`` at opset
18 (``"dynamo"``) or with the TorchScript exporter at opset 17 (``"torchscript"``); symbolic dims are
``batch``, ``seq`` (encoder / decoder-only) and ``dseq`` (decoder of an encoder-decoder).
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import torch
from torch.export import Dim

import onnx_models as om

#: largest |fused - unfused| allowed on ONNX Runtime, and the (batch, seq) shapes each model runs at
TOL = 1e-5
SHAPES = ((1, 6), (4, 9))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return om._eager(GPT2Model(config))


class PixelsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values)[0]


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3)
    torch.manual_seed(0)
    model = ViTModel(config, add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    return PixelsOnly(model).eval()


#: name -> (factory, kind): "text" (ids + mask), "seq2seq" (ids + mask + decoder ids), "image"
MODELS = {
    "bert": (om.tiny_bert, "text"),
    "gpt2": (tiny_gpt2, "text"),
    "llama": (om.tiny_llama, "text"),
    "bart": (om.tiny_bart, "seq2seq"),
    "t5": (om.tiny_t5, "seq2seq"),
    "vit": (tiny_vit, "image"),
}


def example(kind: str, batch: int = 2, seq: int = 7, dseq: int = 5):
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :2] = 0
    if kind == "text":
        return ids, mask
    return ids, mask, torch.randint(0, 64, (batch, dseq), generator=g)


def input_names(kind: str) -> list[str]:
    return {"text": ["input_ids", "attention_mask"], "image": ["pixel_values"],
            "seq2seq": ["input_ids", "attention_mask", "decoder_input_ids"]}[kind]


def _dims(kind: str) -> dict[str, dict[int, str]]:
    if kind == "image":
        return {"pixel_values": {0: "batch"}}
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if kind == "seq2seq":
        dims["decoder_input_ids"] = {0: "batch", 1: "dseq"}
    return dims


@functools.lru_cache(maxsize=None)
def export_dynamic(name: str, exporter: str) -> onnx.ModelProto:
    factory, kind = MODELS[name]
    model, args = factory(), example(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            symbols = {}
            shapes = {arg: {axis: symbols.setdefault(sym, Dim(sym)) for axis, sym in axes.items()}
                      for arg, axes in _dims(kind).items()}
            return torch.onnx.export(model, args, dynamo=True, opset_version=18, dynamic_shapes=shapes,
                                     verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=input_names(kind),
                          dynamic_axes=_dims(kind))
        return onnx.load_from_string(f.getvalue())


def padded_feeds(kind: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs whose rows are unpadded, left-padded, right-padded and fully padded, in turn."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(batch):
        pad = (row * 2 + 1) % max(seq - 1, 1)
        if row % 4 == 1:
            mask[row, :pad] = 0
        elif row % 4 == 2:
            mask[row, seq - pad:] = 0
        elif row % 4 == 3:
            mask[row] = 0
    feeds = {"input_ids": rng.integers(0, 64, (batch, seq)), "attention_mask": mask}
    if kind == "seq2seq":
        feeds["decoder_input_ids"] = rng.integers(0, 64, (batch, max(seq - 2, 1)))
    return feeds
