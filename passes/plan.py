"""The planner: for one AttentionSpec, pick the kernel to run and record why.

Every registered kernel is a candidate. A candidate is rejected with reasons
when it cannot compute the spec (its own ``not_supported_reasons``) or when the
constraints forbid it (approximate while ``exact=True``). The survivors are
ranked by the kernels' cost models; the cheapest wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnopt.kernels import registry
from attnopt.kernels.spec import AttentionSpec


@dataclass(frozen=True)
class Candidate:
    kernel: str
    reasons: tuple[str, ...]
    cost: float | None
    memory_bytes: int | None

    @property
    def supported(self) -> bool:
        return not self.reasons


@dataclass(frozen=True)
class Choice:
    kernel: str
    exact: bool
    reason: str
    candidates: tuple[Candidate, ...] = field(default=())

    @property
    def rejected(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.supported)


class NoKernelError(ValueError):
    """No registered kernel can compute a spec under the constraints."""


def choose(spec: AttentionSpec, *, exact: bool = True, forced: str | None = None) -> Choice:
    """The cheapest allowed kernel for ``spec``; ``forced`` names one and only checks it."""
    names = [forced] if forced is not None else [k.name for k in registry.all_kernels()]
    candidates = []
    for name in names:
        kernel = registry.get(name)
        reasons = list(kernel.not_supported_reasons(spec))
        if exact and not kernel.exact:
            reasons.append("approximate kernel and exact=True")
        cost = memory = None
        if not reasons:
            cost, memory = kernel.cost(spec), kernel.memory_bytes(spec)
        candidates.append(Candidate(name, tuple(reasons), cost, memory))
    allowed = sorted((c for c in candidates if c.supported), key=lambda c: c.cost)
    if not allowed:
        lines = "\n".join(f"  {c.kernel}: {'; '.join(c.reasons)}" for c in candidates)
        raise NoKernelError(f"no attention kernel supports this call ({spec.mask_terms or 'no mask'}):\n{lines}")
    best = allowed[0]
    if forced is not None:
        reason = f"forced by kernel={forced!r}"
    elif len(allowed) == 1:
        reason = "only kernel supporting this call"
    else:
        reason = f"lowest estimated cost of {len(allowed)} supported kernels"
    return Choice(best.kernel, registry.get(best.kernel).exact, reason, tuple(candidates))
