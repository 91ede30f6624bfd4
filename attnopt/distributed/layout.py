"""Which positions of a sequence each rank of a context-parallel group holds.

A sequence of ``N`` positions is cut into equal chunks. Without load balancing
rank ``r`` of ``P`` holds chunk ``r`` of ``P``. With load balancing (for causal
attention, where late queries see more keys than early ones) it is cut into
``2P`` chunks and rank ``r`` holds chunk ``r`` and its mirror ``2P - 1 - r``,
so that every rank does the same work::

    P = 2, N = 8, load balanced:   positions 0 1 | 2 3 | 4 5 | 6 7
                                   rank       0     1     1     0

A rank's local tensor is its chunks concatenated in that order; each chunk is
a *segment* ``(start, stop)`` of global positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

Segment = tuple[int, int]

#: torch >= 2.13 names the tensor collectives ``*_single``; earlier releases ``*_into_tensor`` / ``*_tensor``
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_stacked(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's ``x`` stacked: ``[world, *x.shape]`` (a collective)."""
    x = x.contiguous() if x.dim() else x.reshape(1)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _ALL_GATHER(out, x, group=group)
    return out.reshape(world, *x.shape)


def reduce_scatter_stacked(parts: torch.Tensor, group) -> torch.Tensor:
    """The sum over ranks of ``parts[rank]``, from ``parts`` ``[world, ...]`` on every rank (a collective)."""
    out = parts.new_empty(parts.shape[1:])
    flat = out.reshape(-1, *parts.shape[2:]) if parts.dim() > 1 else out
    _REDUCE_SCATTER(flat, parts.reshape(-1, *parts.shape[2:]).contiguous(), group=group)
    return out


@dataclass(frozen=True)
class SequenceLayout:
    """The global positions each of ``world`` ranks holds of a sequence of ``length``."""

    length: int
    world: int
    load_balance: bool

    def __post_init__(self):
        parts = self.world * (2 if self.load_balance else 1)
        if self.world < 1 or self.length < parts or self.length % parts:
            balance = " (load balanced: 2 chunks per rank)" if self.load_balance else ""
            raise ValueError(
                f"a sequence of length {self.length} cannot be cut into {parts} equal chunks for {self.world} "
                f"ranks{balance}: pad the sequence to a multiple of {parts} (and mask the padding as key "
                "padding), or use load_balance=False"
            )

    @staticmethod
    def of_local(local_length: int, world: int, load_balance: bool) -> SequenceLayout:
        """The layout whose ranks each hold ``local_length`` positions."""
        return SequenceLayout(local_length * world, world, load_balance)

    @property
    def chunk(self) -> int:
        return self.length // (self.world * (2 if self.load_balance else 1))

    @property
    def local_length(self) -> int:
        return self.length // self.world

    def segments(self, rank: int) -> tuple[Segment, ...]:
        """Global ``(start, stop)`` ranges of rank ``rank``'s local positions, in local order."""
        c = self.chunk
        if not self.load_balance:
            return ((rank * c, (rank + 1) * c),)
        mirror = 2 * self.world - 1 - rank
        return ((rank * c, (rank + 1) * c), (mirror * c, (mirror + 1) * c))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position of each local row of ``rank``, int64 ``[local_length]``."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.segments(rank)])

    def global_order(self, device=None) -> torch.Tensor:
        """Global position of each row of all ranks' local tensors concatenated rank after rank."""
        return torch.cat([self.positions(r, device) for r in range(self.world)])


def local_shard(x: torch.Tensor, dim: int, layout: SequenceLayout, rank: int) -> torch.Tensor:
    """The rows of ``x`` (the whole sequence along ``dim``) that ``rank`` holds."""
    if x.shape[dim] != layout.length:
        raise ValueError(
            f"tensor of shape {tuple(x.shape)} has {x.shape[dim]} positions along dim {dim}, the layout "
            f"{layout.length}: pass the sequence dimension as dim"
        )
    return x.index_select(dim, layout.positions(rank, x.device))


def gather_sequence(x_local: torch.Tensor, dim: int, layout: SequenceLayout, group) -> torch.Tensor:
    """The whole sequence along ``dim`` from every rank's local rows (a collective)."""
    parts = all_gather_stacked(x_local, layout.world, group)
    ranked = torch.cat(parts.unbind(0), dim)  # rank after rank
    inverse = torch.argsort(layout.global_order(x_local.device))
    return ranked.index_select(dim, inverse)
