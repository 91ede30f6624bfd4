"""What a call builds from its term tensors (key padding, documents, masks), kept while those tensors live.

The layers of a forward share one padding or document tensor, so what is built
from it (a tile map, SDPA's additive mask) can be built once per forward rather
than once per layer. A hit needs the very same tensor objects at the same
version counters, so an in-place change of a term, or a new tensor at a
recycled address, rebuilds. An entry is dropped as soon as one of its tensors
is freed: it never outlives the forward (and backward) that made it.

A hit also needs the same generation (``new_generation``): each call of an
optimized graph starts one, so an entry serves the layers of that call (and its
backward) and never a later call. Between calls a term may be written around its
version counter (through ``.data``, a NumPy or DLPack view), which no counter
shows. Direct calls of ``attnopt.attention`` share one generation: there a term
written that way between calls must be a new tensor or written in place.

Nothing is kept for tensors without a version counter (inference mode, where an
in-place change would go unseen), for tensors that require grad (the result
would carry one graph's autograd history into another), or while torch.compile
traces (the tensors are then fakes of the real ones).

Nothing is kept or looked up while a CUDA graph is captured. A captured call
that used a kept result would replay on its values forever (a replay looks
nothing up: a padding tensor written in place between replays would go
unseen), and on memory the cache may free. Built inside the capture, the result
is the graph's own, and every replay computes it again from the inputs' current
values.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")

#: the caches' current generation (``new_generation``)
_GENERATION = [0]


def new_generation() -> None:
    """Start a generation: nothing kept before is served from now on (an optimized graph's call starts one)."""
    _GENERATION[0] += 1


class TermCache:
    """At most ``size`` results, keyed by term tensors (by identity and version) and a hashable ``static`` part.

    ``without_terms``: whether a result built from no tensor at all (a band alone) is kept too; such an
    entry has nothing to release it, so only small results should be.
    """

    def __init__(self, size: int, *, without_terms: bool):
        self.size, self.without_terms = size, without_terms
        self._entries: OrderedDict = OrderedDict()

    def get(self, tensors: Sequence[torch.Tensor], static: Hashable, build: Callable[[], T]) -> T:
        """``build()``, or what it gave for these tensors and ``static`` before."""
        key = self._key(tensors, static)
        if key is None:
            return build()
        hit = self._hit(key, tensors)
        if hit is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # dropped meanwhile (its tensor died, or another thread's call pushed it out)
                pass
            return hit[1]
        value = build()
        entries = self._entries
        # each tensor's death drops the entry (its id may then be reused by an unrelated tensor)
        refs = [weakref.ref(t, lambda _, key=key: entries.pop(key, None)) for t in tensors]
        entries[key] = (refs, value)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return value

    def peek(self, tensors: Sequence[torch.Tensor], static: Hashable):
        """What ``get`` gave for these tensors and ``static`` before, or None: nothing is built."""
        key = self._key(tensors, static)
        hit = None if key is None else self._hit(key, tensors)
        return None if hit is None else hit[1]

    def keeps(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether a result built from these tensors would be kept (not for inference-mode tensors, tensors that
        require grad, or while torch.compile traces)."""
        return self._key(tensors, None) is not None

    def _hit(self, key, tensors: Sequence[torch.Tensor]):
        """The entry under ``key`` if it was made from these very tensors (an id may be reused once one is freed)."""
        hit = self._entries.get(key)
        return hit if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)) else None

    def _key(self, tensors: Sequence[torch.Tensor], static: Hashable):
        if not tensors and not self.without_terms:
            return None
        versions = _versions(tensors)
        return None if versions is None else (tuple(id(t) for t in tensors), versions, static, _GENERATION[0])

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


def _versions(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """The tensors' version counters, or None where nothing built from them may be kept: while torch.compile
    traces or a CUDA graph is captured, for tensors that require grad, for inference-mode tensors (no counter)."""
    if torch.compiler.is_compiling() or capturing() or any(t.requires_grad for t in tensors):
        return None
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class LastCall:
    """The last call's answer, handed to the next call on the very same term tensors at the same versions: a
    prepared call keeps one, so that the layers of a forward (or of a decode step) that share their padding
    tensor skip even the term caches' lookups. Kept under the same rules as a ``TermCache`` entry (never while
    compiling or capturing, never for tensors that require grad or have no version counter), and dropped as soon
    as one of its tensors dies.

    The answer and what it was made from are one tuple, read once per call and replaced whole: a call on another
    thread that replaces them meanwhile cannot hand this call its answer with the other call's tensors."""

    __slots__ = ("_state", "__weakref__")

    def __init__(self):
        #: (weak references to the term tensors, their versions, the generation, the answer), or None
        self._state: tuple | None = None

    @property
    def answer(self):
        """The answer kept now, or None."""
        state = self._state
        return None if state is None else state[3]

    def get(self, tensors: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        """``build()``, or the last call's answer when ``tensors`` are the very same at the same versions."""
        state = self._state
        if state is not None:
            refs, versions, generation, answer = state
            if (generation == _GENERATION[0] and len(tensors) == len(refs)
                    and all(ref() is t and t._version == version for ref, t, version in zip(refs, tensors, versions))
                    and not capturing()):
                return answer
        answer = build()
        versions = _versions(tensors) if tensors else None
        if versions is not None:  # (an answer that may not be kept leaves the last one as it was)
            this = weakref.ref(self)
            dropped = lambda _: (lambda kept: kept is not None and kept.forget())(this())  # noqa: E731
            self._state = (tuple(weakref.ref(t, dropped) for t in tensors), versions, _GENERATION[0], answer)
        return answer

    def forget(self) -> None:
        self._state = None


class Interned:
    """At most ``size`` objects, one per hashable key, made on first use and the oldest dropped first: what the
    prepared calls of one forward's sites share (a mask source, a decode step's launch plan)."""

    def __init__(self, size: int):
        self.size = size
        self._objects: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        found = self._objects.get(key)
        if found is None:
            found = self._objects[key] = make()
            while len(self._objects) > self.size:
                self._objects.popitem(last=False)
        return found

    def __len__(self) -> int:
        return len(self._objects)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA): then nothing may sync with the
    host, and nothing read from data on the host may decide what a replay computes. Asked of CUDA only once it is
    initialized (no capture runs before): ``torch.cuda.is_available`` reads the environment on every call, and
    this is asked on every inference call with terms."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
