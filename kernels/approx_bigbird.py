"""``approx_bigbird``: BigBird-style block-sparse attention, window + seeded random blocks + global.

Tokens are grouped in blocks of ``block`` rows. Query block ``b`` sees key blocks
``b - 1, b, b + 1`` (the sliding window), the first ``global_blocks`` blocks
(global tokens, which also see every key), and ``random_blocks`` further blocks
drawn with a generator seeded by ``(seed, b)``: the sparsity pattern is a pure
function of the kernel's settings and the shapes, so forward, backward and the
calibration run see the same pattern. The spec's own mask (causal, padding...)
applies on top. Computation and backward are those of ``approx_local_global``
(gathered keys per block, the exact kernel on each block's problem): O(N * block)
time and memory.
"""

from __future__ import annotations

import functools

import torch

from .approx_local_global import GatheredKernel, Layout
from .registry import register
from .spec import AttentionSpec


@functools.lru_cache(maxsize=64)
def _key_blocks(n_blocks: int, global_blocks: int, random_blocks: int, seed: int) -> torch.Tensor:
    """``[n_blocks, 3 + global + random]`` key block ids per query block, -1 padded (CPU, cached)."""
    width = 3 + global_blocks + random_blocks
    table = torch.full((n_blocks, width), -1, dtype=torch.long)
    for qb in range(n_blocks):
        chosen = {b for b in (qb - 1, qb, qb + 1) if 0 <= b < n_blocks}
        chosen |= set(range(min(global_blocks, n_blocks)))
        others = [b for b in range(n_blocks) if b not in chosen]
        if others and random_blocks:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + qb)
            picks = torch.randperm(len(others), generator=gen)[:random_blocks]
            chosen |= {others[i] for i in picks.tolist()}
        blocks = sorted(chosen)
        table[qb, : len(blocks)] = torch.tensor(blocks)
    return table


class BigBirdKernel(GatheredKernel):
    name = family = "approx_bigbird"
    summary = "approximate (BigBird): 3-block window + seeded random blocks + global blocks"

    def __init__(self, block: int = 64, random_blocks: int = 2, global_blocks: int = 1, seed: int = 0):
        self.block, self.random_blocks, self.global_blocks, self.seed = block, random_blocks, global_blocks, seed

    def settings(self) -> dict[str, int]:
        return {"block": self.block, "random_blocks": self.random_blocks, "global_blocks": self.global_blocks,
                "seed": self.seed}

    def search_space(self, spec: AttentionSpec) -> list[dict[str, int]]:
        return [{"block": b, "random_blocks": r, "global_blocks": 1, "seed": self.seed}
                for b in (64, 128) if 8 * b <= spec.kv_len for r in (1, 3)]

    def blocks_of(self, query_block: int, n_blocks: int) -> list[int]:
        """Key blocks seen by a (non-global) query block: window, global, then seeded random ones."""
        row = _key_blocks(n_blocks, self.global_blocks, self.random_blocks, self.seed)[query_block]
        return [b for b in row.tolist() if b >= 0]

    def block_rows(self) -> int:
        return self.block

    def gathered_keys(self, spec: AttentionSpec) -> float:
        n_blocks = -(-spec.kv_len // self.block)
        sparse = min(n_blocks, 3 + self.global_blocks + self.random_blocks) * self.block
        dense = min(spec.q_len, self.global_blocks * self.block) * spec.kv_len / max(1, spec.q_len)
        return min(spec.kv_len, sparse) + dense

    def layouts(self, spec: AttentionSpec, device: torch.device) -> list[Layout]:
        c, n, n_k = self.block, spec.q_len, spec.kv_len
        nb = -(-n // c)
        n_global = min(n, self.global_blocks * c)
        table = _key_blocks(-(-n_k // c), self.global_blocks, self.random_blocks, self.seed)
        table = table[torch.arange(nb).clamp(max=table.shape[0] - 1)].to(device)  # [nb, blocks]
        cols = table[:, :, None] * c + torch.arange(c, device=device)  # [nb, blocks, c]
        cols = torch.where((table[:, :, None] >= 0) & (cols < n_k), cols, -1).flatten(1)
        rows = torch.arange(nb * c, device=device).reshape(nb, c)
        rows = torch.where((rows < n) & (rows >= n_global), rows, -1)
        found = [Layout(rows, cols)]
        if n_global:
            found.append(Layout(torch.arange(n_global, device=device)[None], torch.arange(n_k, device=device)[None]))
        return found


register(BigBirdKernel())
