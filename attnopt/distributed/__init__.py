"""attnopt on ``torch.distributed``: context-parallel attention and DTensor sharding of the op."""

from attnopt.distributed.context import context_parallel_attention
from attnopt.distributed.layout import SequenceLayout, gather_sequence, local_shard
from attnopt.distributed.scope import ContextParallel, active
from attnopt.distributed import sharding  # noqa: F401  (DTensor rules of attnopt::attention)

__all__ = ["ContextParallel", "SequenceLayout", "active", "context_parallel_attention", "gather_sequence", "local_shard"]
