"""Memory model of one attention site: what the original code and the replacement hold at their peak."""

from __future__ import annotations

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec

from .detect import Match
from .graph import tensor_meta


def _nbytes(node) -> int:
    meta = tensor_meta(node)
    return 0 if meta is None else meta.numel() * meta.element_size()


def bytes_before(match: Match, spec: AttentionSpec) -> int:
    """Attention memory of the original: the score-sized tensors eager keeps alive at once.

    During training autograd keeps every intermediate for the backward; in
    inference an op's input and output are alive together. An SDPA call is
    estimated as PyTorch's math path when it has a mask on CPU (scores and
    probabilities in float32) and as a fused kernel otherwise.
    """
    if match.kind == "sdpa":
        fused = spec.device.type == "cuda" or not (match.booleans or match.additive)
        if fused:
            return 4 * spec.batch * spec.q_heads * spec.q_len
        return 2 * 4 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len
    sizes = [_nbytes(n) for n in match.intermediates]
    if spec.requires_grad:
        return sum(sizes)
    return max((a + b for a, b in zip(sizes, sizes[1:])), default=sum(sizes))


def bytes_after(spec: AttentionSpec, kernel: str) -> int:
    k = registry.get(kernel)
    return k.memory_bytes(spec) + (k.saved_bytes(spec) if spec.requires_grad else 0)
