"""Layouts: bring q, k, v of a detected site to ``[B, H, N, D]``, and fold GQA repeats away.

An ``Operand`` is a graph node plus the view steps the rewrite applies to it
(``transpose``, ``unsqueeze``, ``permute``, ``unflatten`` of a ``[B*H]`` dim), so that a score product written
as ``q @ k.mT``, ``torch.bmm`` on ``[B*H, N, D]``, or an ``einsum`` in any
layout all reach the kernel as ``[B, H, N, D]`` views, without copies.

GQA: K/V repeated for each query head of a group, by
``x[:, :, None].expand(B, Hkv, G, N, D).reshape(B, Hkv * G, N, D)`` (HF's
``repeat_kv``), ``expand(...).flatten(1, 2)`` or ``repeat_interleave(G, dim=1)``,
are read from the un-repeated tensor: query head h uses kv head ``h // G``,
exactly what those repeats compute.

Mask terms get view steps too (``frame_steps``): a term added to scores viewed as
``[B*H, Nq, Nk]`` (BLOOM's ALiBi, DeBERTa's relative terms) is split by the frame's
``H``; a term added to scores viewed as ``[B/W, W, H, Nq, Nk]`` (Swin's per-window
mask) is expanded over the ``B/W`` images and folded into the frame's batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from .graph import arg, kind, same_size, same_sizes, shape_of, sizes_of, static_number, tensor_meta

Step = tuple[str, tuple]  # (tensor method, its arguments)


@dataclass(frozen=True)
class Operand:
    node: Node
    steps: tuple[Step, ...] = ()

    def shape(self) -> tuple[int, ...] | None:
        shape = shape_of(self.node)
        return None if shape is None else apply_steps(shape, self.steps)

    def sizes(self) -> tuple | None:
        """The shape the op reads, symbolic where the graph's is (``shape()`` holds the size hints)."""
        sizes = sizes_of(self.node)
        return None if sizes is None else apply_steps(sizes, self.steps)

    def then(self, *steps: Step) -> Operand:
        return Operand(self.node, self.steps + steps)

    def dtype(self):
        """The dtype the op reads: the node's, or the last ``to`` step's."""
        casts = [args[0] for name, args in self.steps if name == "to"]
        if casts:
            return casts[-1]
        meta = tensor_meta(self.node)
        return None if meta is None else meta.dtype


class LayoutError(Exception):
    """The operands of a product cannot be brought to [B, H, N, D]; the message says why."""


def apply_steps(shape: tuple[int, ...], steps) -> tuple[int, ...]:
    shape = list(shape)
    for name, args in steps:
        if name == "transpose":
            a, b = (d % len(shape) for d in args)
            shape[a], shape[b] = shape[b], shape[a]
        elif name == "unsqueeze":
            shape.insert(args[0] % (len(shape) + 1), 1)
        elif name == "squeeze":
            del shape[args[0] % len(shape)]
        elif name == "permute":
            shape = [shape[d] for d in args[0]]
        elif name == "to":  # a dtype cast keeps the shape
            pass
        elif name == "unflatten":  # (dim, sizes) with at most one -1
            dim, sizes = args[0] % len(shape), list(args[1])
            known = math.prod(s for s in sizes if s != -1)
            sizes = [shape[dim] // known if s == -1 else s for s in sizes]
            shape[dim:dim + 1] = sizes
        elif name == "flatten":  # (start, end)
            start, end = (d % len(shape) for d in args)
            shape[start:end + 1] = [math.prod(shape[start:end + 1])]
        elif name == "fold_windows":  # (windows, frame batch): [b or 1, w or 1, ..] -> [frame batch or 1, ..]
            shape[0:2] = [1 if shape[0] == shape[1] == 1 else args[1]]
        else:
            raise AssertionError(f"unknown layout step {name}")
    return tuple(shape)


def fold_windows(term: torch.Tensor, windows: int, batch: int) -> torch.Tensor:
    """A term ``[B/W or 1, W or 1, ..]`` added to scores viewed as ``[B/W, W, H, Nq, Nk]``, as a term of the
    ``[B, H, Nq, Nk]`` scores they are a view of: frame row ``b * W + w`` reads the term at ``(b, w)``."""
    if term.shape[0] == term.shape[1] == 1:
        return term[0]
    return term.expand(batch // windows, windows, *term.shape[2:]).flatten(0, 1)  # [B, ..]: a copy


def run_steps(x: torch.Tensor, steps) -> torch.Tensor:
    """``steps`` applied to a tensor (a constant the mask algebra reads in the op's frame)."""
    for name, args in steps:
        x = fold_windows(x, *args) if name == "fold_windows" else getattr(x, name)(*args)
    return x


def frame_steps(term: tuple, local: tuple, frame: tuple) -> tuple[Step, ...]:
    """Steps that bring a term broadcast against scores of shape ``local`` to the scores' ``frame``
    ``[B, H, Nq, Nk]`` (or ``[B*H, Nq, Nk]``), of which ``local`` is a view; () when right-aligned
    broadcasting already means the same.

    * ``local`` ``[B*H, Nq, Nk]``: a 3-D term with a leading dim of ``B*H`` is per (batch, head):
      ``unflatten(0, (-1, H))``.
    * ``local`` ``[B/W, W, H, Nq, Nk]``: a term with a leading ``B/W`` or ``W`` is folded into the batch.
    """
    if len(local) == len(frame):
        if tuple(local) != tuple(frame):
            raise LayoutError(f"a mask term is added to scores of shape {list(local)}, not a view of the "
                              f"attention's {list(frame)}")
        return ()
    if len(local) == 3 and len(frame) == 4 and local[0] == frame[0] * frame[1] and tuple(local[1:]) == tuple(frame[2:]):
        if len(term) < 3 or term[-3] == 1:
            return ()
        return (("unflatten", (0, (-1, frame[1]))),)
    if len(local) == 5 and len(frame) == 4 and local[0] * local[1] == frame[0] and tuple(local[2:]) == tuple(frame[1:]):
        padded = (1,) * (5 - len(term)) + tuple(term)
        if len(term) <= 3 or padded[:2] == (1, 1) and len(term) == 4:
            return ()
        lift = tuple(("unsqueeze", (0,)) for _ in range(5 - len(term)))
        return (*lift, ("fold_windows", (local[1], frame[0])))
    raise LayoutError(f"a mask term is added to scores of shape {list(local)}, which the site does not read as a "
                      f"view of its {list(frame)} scores")


def swaps_last_two(node: Node) -> bool:
    """Whether ``node`` is a transpose / permute / ``.mT`` that only swaps the last two dims."""
    k = kind(node)
    rank = len(shape_of(node) or ())
    if k == "mT":
        return True
    if k == "transpose" and rank >= 2:
        return {d % rank for d in node.args[1:3]} == {rank - 1, rank - 2}
    if k == "permute" and rank >= 2:
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        expected = list(range(rank - 2)) + [rank - 1, rank - 2]
        return [d % rank for d in dims] == expected
    return False


def untransposed(node: Node) -> Operand:
    """The ``[.., N, D]`` tensor whose last-two-dims transpose is ``node``."""
    if swaps_last_two(node):
        return Operand(node.args[0])
    return Operand(node, (("transpose", (-2, -1)),))


def to_rank4(op: Operand) -> Operand:
    """``[B*H, N, D]`` operands become ``[B*H, 1, N, D]``; 4-D ones stay."""
    shape = op.shape()
    if shape is not None and len(shape) == 3:
        return op.then(("unsqueeze", (1,)))
    return op


# ----------------------------------------------------------------- einsum
@dataclass(frozen=True)
class Einsum:
    inputs: tuple[str, str]
    output: str

    @staticmethod
    def parse(equation: str) -> Einsum:
        eq = equation.replace(" ", "")
        if "->" not in eq or "..." in eq:
            raise LayoutError(f"einsum {equation!r} needs an explicit output and no ellipsis")
        lhs, out = eq.split("->")
        parts = lhs.split(",")
        if len(parts) != 2:
            raise LayoutError(f"einsum {equation!r} does not have two operands")
        return Einsum((parts[0], parts[1]), out)


def permute_to(op: Operand, letters: str, order: str) -> Operand:
    perm = tuple(letters.index(c) for c in order)
    return op if perm == tuple(range(len(perm))) else op.then(("permute", (perm,)))


def score_einsum(node: Node) -> tuple[Operand, Operand]:
    """``(q, k)`` in ``[batch.., N, D]`` layout from ``einsum('..q d, ..k d -> ..q k')`` in any layout."""
    e = Einsum.parse(node.args[0])
    a, b = e.inputs
    out = e.output
    if len(out) not in (3, 4):
        raise LayoutError(f"einsum scores {e.output!r} are not [B, H, Nq, Nk] or [B*H, Nq, Nk]")
    batch, q_tok, k_tok = out[:-2], out[-2], out[-1]
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or q_tok not in a or q_tok in b or k_tok not in b or k_tok in a:
        raise LayoutError(f"einsum {node.args[0]!r} is not a product of queries with keys")
    if any(c not in a or c not in b for c in batch) or len(a) != len(out) or len(b) != len(out):
        raise LayoutError(f"einsum {node.args[0]!r} broadcasts or reduces batch dims")
    d = contracted[0]
    q = permute_to(Operand(node.args[1]), a, batch + q_tok + d)
    k = permute_to(Operand(node.args[2]), b, batch + k_tok + d)
    return to_rank4(q), to_rank4(k)


def value_einsum(node: Node) -> tuple[Operand, tuple[Step, ...]]:
    """``(v, output steps)`` of ``einsum('..q k, ..k e -> any order of ..q e')``."""
    e = Einsum.parse(node.args[0])
    p, vs = e.inputs
    batch, q_tok, k_tok = p[:-2], p[-2], p[-1]
    extra = [c for c in vs if c not in p]
    if len(extra) != 1 or k_tok not in vs or q_tok in vs or sorted(e.output) != sorted(batch + q_tok + extra[0]):
        raise LayoutError(f"einsum {node.args[0]!r} is not a product of probabilities with values")
    if any(c not in vs for c in batch) or len(vs) != len(p):
        raise LayoutError(f"einsum {node.args[0]!r} broadcasts batch dims of the values")
    dv = extra[0]
    v = permute_to(Operand(node.args[2]), vs, batch + k_tok + dv)
    canonical = batch + q_tok + dv
    steps: tuple[Step, ...] = ()
    if len(batch) == 1:
        v = v.then(("unsqueeze", (1,)))
        steps = (("squeeze", (1,)),)
    perm = tuple(canonical.index(c) for c in e.output)
    if perm != tuple(range(len(perm))):
        steps = steps + (("permute", (perm,)),)
    return v, steps


# ----------------------------------------------------------------- GQA
def repeated_heads(node: Node) -> tuple[Node, int] | None:
    """``(source [B, Hkv, N, D], group)`` when ``node`` repeats each kv head ``group`` times in place.

    Sizes are compared as the graph holds them: under dynamic shapes the reshape must be the repeat's
    for every size the shape environment allows (``[B, Hkv, G, N, D]`` to ``[B, Hkv*G, N, D]``), not only
    for the sizes of the capture; the group is a static number.
    """
    shape = sizes_of(node)
    if shape is None or len(shape) != 4:
        return None
    k = kind(node)
    if k == "repeat_interleave":
        repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(repeats, int) and not isinstance(repeats, bool) and dim in (1, -3):
            return node.args[0], repeats
        return None
    if k == "flatten":
        start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
        if (start, end) not in ((1, 2), (1, -3)):
            return None
        expanded = node.args[0]
    elif k == "reshape":
        expanded = node.args[0]
    else:
        return None
    if kind(expanded) != "expand":
        return None
    unsqueezed = expanded.args[0]
    e_shape, u_shape = sizes_of(expanded), sizes_of(unsqueezed)
    if e_shape is None or u_shape is None or len(e_shape) != 5 or len(u_shape) != 5 or not same_size(u_shape[2], 1):
        return None
    if kind(unsqueezed) == "getitem":
        index = unsqueezed.args[1]
        full = slice(None, None, None)
        if not (isinstance(index, tuple) and len(index) >= 3 and index[0] == full and index[1] == full
                and index[2] is None and all(i == full for i in index[3:])):
            return None
        source = unsqueezed.args[0]
    elif kind(unsqueezed) == "unsqueeze" and arg(unsqueezed, 1, "dim") in (2, -3):
        source = unsqueezed.args[0]
    else:
        return None
    b, h_kv, group, n, d = e_shape
    group = static_number(group)
    if not isinstance(group, int) or not same_sizes(shape, (b, h_kv * group, n, d)):
        return None
    if not same_sizes(sizes_of(source), (b, h_kv, n, d)):
        return None
    return source, group


def fold_gqa(k: Operand, v: Operand) -> tuple[Operand, Operand, int]:
    """Read K/V from their un-repeated tensors when both repeat heads by the same group size."""
    if k.steps or v.steps:
        return k, v, 1
    rk, rv = repeated_heads(k.node), repeated_heads(v.node)
    if rk is None or rv is None or rk[1] != rv[1]:
        return k, v, 1
    return Operand(rk[0]), Operand(rv[0]), rk[1]
