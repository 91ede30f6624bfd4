"""``fuse(..., pack_qkv=True)``: projections of one input merged into one ``MatMul`` and a ``Split``.

Attention's q, k and v are usually three ``MatMul``s of the same activations
by constant weights, each maybe followed by a constant bias ``Add``. Packed,
they are one ``MatMul`` by the weights concatenated along the output axis, one
``Add`` of the concatenated biases and a ``Split``: each output element is the
same dot product as before, so the result is the same up to the GEMM's
rounding, and the activations are read once instead of three times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: how far back from an attention operand the projection that produced it is looked for
SEARCH_DEPTH = 40


@dataclass(frozen=True)
class Projection:
    """``x @ weight (+ bias)``: the nodes computing it and the value they produce."""

    matmul: onnx.NodeProto
    bias_add: onnx.NodeProto | None
    weight: np.ndarray  # [K, N]
    bias: np.ndarray | None  # [N]

    @property
    def output(self) -> str:
        return (self.bias_add or self.matmul).output[0]


def pack_projections(graph: onnx.GraphProto, operands: list[tuple[str, ...]], taken: set[str]) -> int:
    """Merge, for each attention site's ``(q, k, v)`` operand values, the projections of a shared input.

    Returns the number of packed groups. Projections of one input that no site shares (cross
    attention's q) stay alone; a group needs two or more.
    """
    producer, consumers, inits, outputs = graph_index(graph)
    groups: list[list[Projection]] = []
    done: set[str] = set()
    for values in operands:
        found = [projection(_nearest_matmul(v, producer), consumers, inits, outputs) for v in values]
        by_input: dict[str, list[Projection]] = {}
        for p in found:
            if p is not None and p.matmul.output[0] not in done:
                group = by_input.setdefault(p.matmul.input[0], [])
                if all(q.matmul.output[0] != p.matmul.output[0] for q in group):
                    group.append(p)
        for group in by_input.values():
            if len(group) > 1 and _compatible(group):
                groups.append(group)
                done.update(p.matmul.output[0] for p in group)

    for group in groups:
        _pack(graph, group, taken)
    return len(groups)


def graph_index(graph: onnx.GraphProto):
    """``(producer, consumers, initializers, graph outputs)``, each by value name."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers, {t.name: t for t in graph.initializer}, {o.name for o in graph.output}


def _nearest_matmul(value: str, producer: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The ``MatMul`` with a constant 2-D weight closest upstream of ``value``, along first inputs and
    through anything but another ``MatMul`` (layout ops, rotary embeddings, scaling)."""
    node = producer.get(value)
    for _ in range(SEARCH_DEPTH):
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return node if node.op_type == "MatMul" else None
        if node.op_type == "Add" and len(node.input) == 2:  # a bias may be either operand
            a, b = (producer.get(i) for i in node.input)
            node = a if a is not None and a.op_type == "MatMul" else b if b is not None and b.op_type == "MatMul" else a
            continue
        node = producer.get(node.input[0]) if node.input else None
    return None


def projection(matmul, consumers, inits, outputs) -> Projection | None:
    """``matmul`` as ``x @ weight (+ bias)`` with constant operands; None when it is not one."""
    if matmul is None or matmul.input[1] not in inits or matmul.input[0] in inits:
        return None
    weight = numpy_helper.to_array(inits[matmul.input[1]])
    if weight.ndim != 2:
        return None
    users = consumers.get(matmul.output[0], [])
    add, bias = None, None
    if len(users) == 1 and users[0].op_type == "Add" and matmul.output[0] not in outputs:
        other = [i for i in users[0].input if i != matmul.output[0]]
        if len(other) == 1 and other[0] in inits:
            candidate = numpy_helper.to_array(inits[other[0]])
            if candidate.shape == (weight.shape[1],) and candidate.dtype == weight.dtype:
                add, bias = users[0], candidate
    return Projection(matmul=matmul, bias_add=add, weight=weight, bias=bias)


def _compatible(group: list[Projection]) -> bool:
    first = group[0].weight
    return all(p.weight.dtype == first.dtype and p.weight.shape[0] == first.shape[0] for p in group) and (
        all(p.bias is None for p in group) or all(p.bias is not None for p in group)
    )


def _pack(graph: onnx.GraphProto, group: list[Projection], taken: set[str]) -> None:
    def fresh(stem: str) -> str:
        n = 0
        while f"{stem}/{n}" in taken:
            n += 1
        taken.add(f"{stem}/{n}")
        return f"{stem}/{n}"

    stem = f"attnopt/packed/{group[0].matmul.output[0]}"
    weight = fresh(f"{stem}/weight")
    graph.initializer.append(numpy_helper.from_array(np.concatenate([p.weight for p in group], axis=1), weight))
    packed = fresh(f"{stem}/matmul")
    nodes = [onnx.helper.make_node("MatMul", [group[0].matmul.input[0], weight], [packed], name=packed)]
    if group[0].bias is not None:
        bias = fresh(f"{stem}/bias")
        graph.initializer.append(numpy_helper.from_array(np.concatenate([p.bias for p in group]), bias))
        biased = fresh(f"{stem}/add")
        nodes.append(onnx.helper.make_node("Add", [packed, bias], [biased], name=biased))
        packed = biased
    sizes = fresh(f"{stem}/sizes")
    graph.initializer.append(numpy_helper.from_array(np.array([p.weight.shape[1] for p in group], np.int64), sizes))
    nodes.append(onnx.helper.make_node("Split", [packed, sizes], [p.output for p in group], axis=-1,
                                       name=fresh(f"{stem}/split")))

    replaced = {p.matmul.output[0] for p in group} | {p.bias_add.output[0] for p in group if p.bias_add}
    kept, placed = [], False
    for node in graph.node:
        if node.output[0] in replaced:
            if not placed:
                kept.extend(nodes)
                placed = True
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
