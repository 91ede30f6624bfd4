"""ATen's fused CPU flash attention, as the CPU kernels call it.

``sdpa_cpu`` calls it on a whole call; ``reference`` on the tiles its band and
masks leave (one call per tile instead of a dozen passes over a score tile).
Its output for a row whose mask is ``-inf`` everywhere is 0 with a log-sum-exp
of 0, not NaN: callers that care about such rows find them from the mask.
"""

from __future__ import annotations

import torch

#: ATen's CPU flash attention through its generated binding (``torch.ops.aten`` parses the schema per call)
flash_attention_cpu = torch._scaled_dot_product_flash_attention_for_cpu
#: its backward from the saved output and log-sum-exp (no binding of its own: the overload, resolved once)
flash_attention_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

#: whether ATen's CPU flash attention reads grouped K/V heads itself, once asked (``cpu_flash_reads_groups``)
_CPU_GROUPS: list[bool] = []


def cpu_flash_reads_groups() -> bool:
    """Whether ``flash_attention_cpu`` and its backward take fewer K/V heads than query heads and read each
    query head's group (recent torch does, with the same arithmetic as on repeated heads, summing dK/dV over
    the group): then nothing is repeated. Asked once per process, with a tiny call compared against
    repeated heads."""
    if not _CPU_GROUPS:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, 3, 4, generator=g) for h in (4, 2, 2))  # query heads 0, 1 read kv head 0
        k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        try:
            out, lse = flash_attention_cpu(q, k, v, 0.0, False)
            grad = torch.randn(out.shape, generator=g)
            grouped = flash_attention_cpu_backward(grad, q, k, v, out, lse, 0.0, False)
            repeated = flash_attention_cpu_backward(grad, q, k2, v2, out, lse, 0.0, False)
            summed = (repeated[0], *(r.view(1, 2, 2, 3, 4).sum(2) for r in repeated[1:]))  # over each group
            same = torch.equal(out, flash_attention_cpu(q, k2, v2, 0.0, False)[0]) and all(
                a.shape == b.shape and torch.allclose(a, b, atol=1e-6) for a, b in zip(grouped, summed))
            _CPU_GROUPS.append(bool(same))
        except RuntimeError:
            _CPU_GROUPS.append(False)
    return _CPU_GROUPS[0]
