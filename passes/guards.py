"""Guards: the buffer values a rewrite's proofs read at capture, checked on every call.

The mask algebra may evaluate a module buffer (GPT-2's ``tril`` ``bias``, a window size, a scale)
to prove a site causal or windowed. That value is a fact about one moment: ``load_state_dict``,
``buffer.fill_()`` or ``buffer[i] = x`` change it afterwards. So every buffer a replaced site's
proof read is guarded:

* each call compares the buffer's storage and version counter with those seen at capture, a few
  attribute reads per buffer and no device work (every in-place write through autograd bumps the version);
* a write that bypasses the version counter (through ``.data``, ``.numpy()``, ``torch.from_numpy`` or
  DLPack views) is seen on small CPU buffers only (``VALUE_CHECKED``: a scale, a window size, ALiBi's
  slopes), whose values each call also compares with a copy taken at capture (a few microseconds); larger
  buffers and CUDA ones (a comparison there would wait for the device) are checked by version;
* when one changed, the graph is rewritten again from its original form with the buffers' new
  values (a recompile, as dynamo recompiles on a failed guard). A buffer that changes a second
  time is *volatile*: from then on no proof reads it, and masks built from it are runtime inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node


#: CPU tensors of at most this many elements are also compared by value on each call (``torch.equal``: about
#: 4 us at 4096 float32 elements, 1.2 ms at a million, on one core of a 2-core CPU)
VALUE_CHECKED = 4096


@dataclass
class _Seen:
    """What one guarded tensor looked like when the proof read it."""

    index: int | None  # placeholder position, or None for a get_attr tensor held in ``tensor``
    tensor: torch.Tensor | None
    ptr: int
    version: int | None  # None: an inference tensor (no version counter): compared by value
    snapshot: torch.Tensor | None = None

    @staticmethod
    def of(index: int | None, value: torch.Tensor) -> _Seen:
        try:
            version = value._version
        except RuntimeError:  # inference tensors track no version: keep the value to compare
            version = None
        small = value.device.type == "cpu" and value.numel() <= VALUE_CHECKED
        snapshot = value.detach().clone() if version is None or small else None
        return _Seen(index, value if index is None else None, value.data_ptr(), version, snapshot)

    def holds(self, args) -> bool:
        value = self.tensor if self.index is None else args[self.index]
        if not isinstance(value, torch.Tensor) or value.data_ptr() != self.ptr:
            return False
        if self.version is not None and value._version != self.version:
            return False
        return self.snapshot is None or (value.shape == self.snapshot.shape and bool(torch.equal(value, self.snapshot)))


def guarded_inputs(gm: GraphModule, reads: list[Node], example_inputs) -> list[_Seen]:
    """Guards for the buffer nodes ``reads`` (placeholders or get_attr) of ``gm``."""
    positions = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    seen = []
    for node in dict.fromkeys(reads):
        if node.op == "placeholder" and node in positions:
            value = example_inputs[positions[node]]
            if isinstance(value, torch.Tensor):
                seen.append(_Seen.of(positions[node], value))
        elif node.op == "get_attr":
            target = gm
            for part in node.target.split("."):
                target = getattr(target, part)
            if isinstance(target, torch.Tensor):
                seen.append(_Seen.of(None, target))
    return seen


def clone(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` with its own graph (nodes' metadata shared shallowly), to rewrite again later."""
    graph = Graph()
    value, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    new_output = graph.output(value, type_expr=output.type)
    new_output.meta = dict(output.meta)
    graph._codegen = gm.graph._codegen
    copy = GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


@dataclass
class GuardedGraph:
    """Runs a rewritten graph while its guards hold; rewrites the original again when one fails.

    ``build(gm, example_inputs, volatile)`` rewrites a fresh copy of the original graph and returns
    ``(callable, guards)``; ``volatile`` are placeholder positions no proof may read.
    """

    original: GraphModule
    build: object
    run: object
    guards: list[_Seen]
    volatile: set[int] = field(default_factory=set)
    changed: dict[int, int] = field(default_factory=dict)  # placeholder position -> times it changed

    def __call__(self, *args):
        for guard in self.guards:
            if not guard.holds(args):
                self._rebuild(args)
                break
        return self.run(*args)

    def _rebuild(self, args) -> None:
        for guard in self.guards:
            if guard.index is not None and not guard.holds(args):
                self.changed[guard.index] = self.changed.get(guard.index, 0) + 1
                if self.changed[guard.index] > 1:
                    self.volatile.add(guard.index)
        self.run, self.guards = self.build(clone(self.original), list(args), frozenset(self.volatile))
