"""Report: one row per attention site, what was found there and what was done with it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

#: how a reason names the fill of rows with no visible key: kept for ``details(full=True)``
_FILL_NAME = re.compile(r"\s*\((?:-inf|finite|finite_added|safe) fill\)")


@dataclass(frozen=True)
class Site:
    where: str  # module path of the attention (or the graph node's name)
    node: str  # the anchor node (softmax or SDPA call) in its graph
    graph: int  # which captured graph (graph breaks and recompiles add graphs)
    replaced: bool
    reason: str  # why this kernel was chosen, or why the site was left alone
    kernel: str | None = None
    exact: bool = True
    causal: bool = False
    mask_terms: tuple[str, ...] = ()
    cross: bool = False
    q_heads: int | None = None
    kv_heads: int | None = None
    q_len: int | None = None
    kv_len: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    bytes_before: int | None = None  # estimated attention memory of the original code
    bytes_after: int | None = None  # estimated attention memory of the replacement
    rejected_kernels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (kernel, reasons) not chosen
    error: float | None = None  # measured relative error of an approximate kernel; None when exact
    #: every supported candidate: (kernel, seconds, measured: True = timed on the device, False = cost model)
    candidate_times: tuple[tuple[str, float, bool], ...] = ()
    notes: tuple[str, ...] = ()  # what the analysis recognized beyond the mask terms (an ALiBi bias)

    @property
    def found(self) -> str:
        terms = list(self.mask_terms)
        if self.cross:
            terms.append("cross")
        if self.q_heads and self.kv_heads and self.q_heads != self.kv_heads:
            terms.append("gqa" if self.kv_heads > 1 else "mqa")
        return "+".join(terms) or "full"


@dataclass(frozen=True)
class GraphMemory:
    """Estimated peak device memory of one captured graph, before and after the rewrite."""

    graph: int
    before: int
    after: int
    budget: int | None  # max_mem, when given
    training: bool  # forward + backward estimated


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    graphs: int = 0
    dry_run: bool = False  # explain(): "replaced" means "would be replaced"
    memory: list[GraphMemory] = field(default_factory=list)

    @property
    def approximate(self) -> list[Site]:
        """Sites that run an approximate kernel (``exact=False``)."""
        return [s for s in self.sites if s.replaced and not s.exact]

    def details(self, full: bool = False) -> str:
        """Per site: each candidate's time, why the others were rejected; per graph: peak memory.

        On a machine without CUDA, the kernels that only run on CUDA are named in
        one line instead of being rejected site by site, and reasons are given in
        plain words; ``full=True`` lists every kernel with every reason as the
        planner wrote it (fill names included).
        """
        lines = []
        for g in self.memory:
            budget = "" if g.budget is None else f" (max_mem {format_bytes(g.budget)})"
            what = "forward+backward" if g.training else "forward"
            lines.append(f"graph {g.graph}: estimated peak {what} {format_bytes(g.before)} -> {format_bytes(g.after)}"
                         f"{budget}")
        unavailable = {} if full else _unavailable_kernels()
        hidden: dict[str, str] = {}
        blocks: list[tuple[list[int], list[str]]] = []  # sites with the same candidates share one block
        for i, s in enumerate(self.sites):
            if not s.candidate_times and not s.rejected_kernels:
                continue
            chosen = s.kernel if s.replaced else "left alone"
            approx = "" if s.exact or s.error is None else f", APPROXIMATE: relative error {s.error:.3g}"
            body = [f"{chosen}{approx}"] + [f"  note: {note}" for note in s.notes]
            for name, seconds, measured in s.candidate_times:
                mark = "*" if name == s.kernel else " "
                body.append(f"  {mark} {name:<22} {seconds * 1e3:10.3f} ms {'measured' if measured else 'estimated'}")
            for name, reasons in s.rejected_kernels:
                if name in unavailable:
                    hidden[name] = unavailable[name]
                    continue
                said = reasons if full else tuple(_plain(r) for r in reasons)
                body.append(f"  x {name:<22} rejected: {'; '.join(said)}")
            if blocks and blocks[-1][1] == body:
                blocks[-1][0].append(i)
            else:
                blocks.append(([i], body))
        for indices, body in blocks:
            label = f"site {indices[0]}" if len(indices) == 1 else f"sites {indices[0]}-{indices[-1]}"
            lines.append(f"{label}: {body[0]}")
            lines.extend(body[1:])
        if hidden:
            devices = "/".join(sorted(set(hidden.values())))
            lines.append(f"not run on this machine ({devices} only, none here): {', '.join(hidden)} "
                         "(report.details(full=True) lists every kernel's reasons)")
        return "\n".join(lines)

    @property
    def replaced(self) -> list[Site]:
        return [s for s in self.sites if s.replaced]

    @property
    def left_alone(self) -> list[Site]:
        return [s for s in self.sites if not s.replaced]

    def to_dict(self) -> dict:
        return {
            "graphs": self.graphs, "dry_run": self.dry_run, "sites": [asdict(s) for s in self.sites],
            "memory": [asdict(m) for m in self.memory],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        if not self.graphs:
            return "attnopt report: no graph captured yet (the model has not been called)"
        verb = "would be replaced (dry run)" if self.dry_run else "replaced"
        head = f"attnopt: {len(self.replaced)} of {len(self.sites)} attention site(s) {verb} in {self.graphs} graph(s)"
        if not self.sites:
            return head
        rows = [("#", "where", "node", "attention", "heads q/kv", "q x kv", "dtype", "kernel", "memory", "why")]
        for i, s in enumerate(self.sites):
            memory = ""
            if s.bytes_before is not None and s.bytes_after is not None:
                memory = f"{format_bytes(s.bytes_before)} -> {format_bytes(s.bytes_after)}"
            kernel = (s.kernel or "-") if s.replaced else "left alone"
            if s.replaced and not s.exact:
                kernel += " (approx)"
            rows.append((
                str(i), s.where, s.node, s.found if s.q_len is not None else "?",
                f"{s.q_heads}/{s.kv_heads}" if s.q_heads else "", f"{s.q_len} x {s.kv_len}" if s.q_len else "",
                (s.dtype or "").replace("torch.", ""), kernel, memory, s.reason,
            ))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        lines = [head]
        for j, r in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
        if self.approximate:
            lines.append(f"APPROXIMATE sites (exact=False): {', '.join(s.where for s in self.approximate)}")
        details = self.details()
        return "\n".join(lines + ([details] if details else []))

    def __repr__(self) -> str:
        return f"Report({len(self.replaced)}/{len(self.sites)} sites replaced, {self.graphs} graphs)"


def _plain(reason: str) -> str:
    """A rejection reason without the planner's names for fills: what would differ, in plain words."""
    return _FILL_NAME.sub("", reason)


def _unavailable_kernels() -> dict[str, str]:
    """Kernel name -> the device it needs, for kernels that cannot run on this machine (CUDA ones without CUDA)."""
    import torch

    from attnopt.kernels import registry

    if torch.cuda.is_available():
        return {}
    found = {}
    for kernel in registry.all_kernels():
        needs = kernel.devices or ((kernel.device_type,) if getattr(kernel, "device_type", None) else None)
        if needs and "cpu" not in needs:
            found[kernel.name] = "/".join(needs).upper()
    return found


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
