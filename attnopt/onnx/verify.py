"""Run ONNX Runtime on a model and measure it against its source (a torch model or another ONNX graph)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import torch

#: sizes given to symbolic input dims when nothing else is known: batch, then every other dim
DEFAULT_DIMS = (2, 8)


def session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session; a model it cannot load raises ValueError naming the node and dtype."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(_explain_load_error(model, str(err))) from err


def _explain_load_error(model: onnx.ModelProto, message: str) -> str:
    found = re.search(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'", message)
    if not found:
        return f"ONNX Runtime cannot load the model: {message.strip().splitlines()[0]}"
    op_type, version, name = found.groups()
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.input, *model.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is not None and node.input and node.input[0] in types:
        found_types = {types[node.input[0]]}
    else:  # a node ONNX Runtime created by fusing: name the unusual types the model computes in
        found_types = set(types.values()) & {onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    dtype = " / ".join(sorted(onnx.TensorProto.DataType.Name(t).lower() for t in found_types)) or "its input type"
    return (
        f"ONNX Runtime's CPU provider has no {op_type} (opset {version}) kernel for {dtype} "
        f"(node {name!r}); on CPU, Attention runs in float32 and float16: export or convert the model "
        "to one of those"
    )


def random_feeds(sess, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of ``sess``; symbolic dims from ``dims`` or DEFAULT_DIMS."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = {}
    for arg in sess.get_inputs():
        shape = []
        for axis, d in enumerate(arg.shape):
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(dims.setdefault(str(d), DEFAULT_DIMS[0] if axis == 0 else DEFAULT_DIMS[1]))
        dtype = _NUMPY.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type}: random inputs are float, int or bool")
        if dtype == np.bool_:
            feeds[arg.name] = rng.random(shape) > 0.3
        elif np.issubdtype(dtype, np.integer):  # ids and 0/1 masks: small values index any vocabulary
            feeds[arg.name] = (rng.random(shape) > 0.3).astype(dtype)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def max_difference(got, expected) -> float:
    """Largest |difference| over paired outputs; NaN in exactly the same places counts as equal."""
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        g, e = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        if g.shape != e.shape:
            raise AssertionError(f"output shapes differ: {g.shape} vs {e.shape}")
        if not np.array_equal(np.isnan(g), np.isnan(e)):
            return float("inf")
        both = ~np.isnan(g)
        if both.any():
            worst = max(worst, float(np.abs(g[both] - e[both]).max()))
    return worst


def compare_onnx(original: onnx.ModelProto, changed: onnx.ModelProto, feeds: dict | None = None,
                 dims: dict[str, int] | None = None) -> float:
    """Max difference between two ONNX models' outputs on the same (random) inputs."""
    sess_a, sess_b = session(original), session(changed)
    feeds = random_feeds(sess_a, dims) if feeds is None else feeds
    return max_difference(sess_b.run(None, feeds), sess_a.run(None, feeds))


def compare_torch(model, proto: onnx.ModelProto, args: tuple, kwargs: dict | None = None) -> float:
    """Max difference between ``model(*args, **kwargs)`` and the exported ``proto`` on those inputs."""
    sess = session(proto)
    with torch.no_grad():
        expected = model(*args, **(kwargs or {}))
    flat_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(flat_in):
        raise ValueError(f"the ONNX model has inputs {names}, but {len(flat_in)} tensors were given")
    feeds = {name: _numpy(t) for name, t in zip(names, flat_in)}
    flat_out = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = sess.run(None, feeds)
    return max_difference(got[: len(flat_out)], [_numpy(t) for t in flat_out])


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
