"""``approx_bigbird``: BigBird-style block-sparse attention, window + seeded random blocks + global.

Tokens are grouped in blocks of ``block`` (= the query chunk). Query block ``b``
sees key blocks ``b - 1, b, b + 1`` (the sliding window), the first
``global_blocks`` blocks (global tokens, which also see every key), and
``random_blocks`` further blocks drawn with a generator seeded by
``(seed, b)``: the sparsity pattern is a pure function of the kernel's seed and
the shapes, so forward, backward and the calibration run see the same pattern.
The spec's own mask (causal, padding...) applies on top. Computation and
backward are those of ``approx_local_global`` (gathered keys, exact reference
kernel per block).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .approx_local_global import CHUNK, KeySet, KeySetKernel
from .registry import register
from .spec import AttentionSpec


class BigBirdKernel(KeySetKernel):
    name = "approx_bigbird"
    summary = "approximate (BigBird): 3-block window + seeded random blocks + global blocks"

    def __init__(self, random_blocks: int = 2, global_blocks: int = 1, seed: int = 0):
        self.random_blocks, self.global_blocks, self.seed = random_blocks, global_blocks, seed

    def keys_per_chunk(self, spec: AttentionSpec) -> int:
        return CHUNK * (3 + self.global_blocks + self.random_blocks)

    def has_global_rows(self, spec: AttentionSpec) -> bool:
        return self.global_blocks > 0

    def blocks_of(self, query_block: int, n_blocks: int) -> list[int]:
        """Key blocks seen by a (non-global) query block: window, global, then seeded random ones."""
        chosen = {b for b in (query_block - 1, query_block, query_block + 1) if 0 <= b < n_blocks}
        chosen |= set(range(min(self.global_blocks, n_blocks)))
        others = [b for b in range(n_blocks) if b not in chosen]
        if others and self.random_blocks:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + query_block)
            picks = torch.randperm(len(others), generator=gen)[: self.random_blocks]
            chosen |= {others[i] for i in picks.tolist()}
        return sorted(chosen)

    def key_sets(self, spec: AttentionSpec, device: torch.device) -> Iterator[KeySet]:
        n_blocks = -(-spec.kv_len // CHUNK)
        for qb, q0 in enumerate(range(0, spec.q_len, CHUNK)):
            q1 = min(q0 + CHUNK, spec.q_len)
            if qb < self.global_blocks:
                yield KeySet(q0, q1, None, None)
                continue
            idx = torch.cat([
                torch.arange(b * CHUNK, min((b + 1) * CHUNK, spec.kv_len), device=device)
                for b in self.blocks_of(qb, n_blocks)
            ])
            yield KeySet(q0, q1, idx, None)


register(BigBirdKernel())
