"""Report: one row per attention site, what was found there and what was done with it."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field

#: the planner's reason for an approximate kernel under ``exact=True``: said once for all sites
_APPROXIMATE = "approximate kernel and exact=True"
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


class AttnoptWarning(UserWarning):
    """Something the user should know about the rewrite: code that ran without it, a site restored by ``verify``."""


@dataclass(frozen=True)
class Fallback:
    """Code attnopt did not see whole: a frame dynamo ran eagerly, or a graph break through an attention."""

    where: str  # the user's code: "forward (model.py:42)"
    why: str  # what happened there and what it costs, in plain words
    #: the captured graph whose attention the break split, when one did (the same break in a recompiled
    #: graph is the same fallback)
    graph: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SiteRow:
    """One attention site of the model, with every captured graph it was seen in.

    A module runs in several graphs after a train/eval switch, a new dtype, or during ``generate()``
    (a prompt graph, then one-token graphs); each graph has its own decision for the site, in ``seen``.
    """

    where: str
    seen: tuple[Site, ...]

    @property
    def graphs(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(s.graph for s in self.seen))

    @property
    def replaced(self) -> bool:
        """Replaced in every graph it was seen in."""
        return all(s.replaced for s in self.seen)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """(q length, kv length) of each distinct call shape, in the order first seen."""
        return tuple(dict.fromkeys((s.q_len, s.kv_len) for s in self.seen if s.q_len is not None))


@dataclass
class Report:
    """What attnopt found and did. ``sites``: one entry per site and captured graph; ``rows()``: one per site
    of the model (what the table prints); ``fallbacks``: code that ran without attnopt, and why."""

    sites: list[Site] = field(default_factory=list)
    graphs: int = 0
    dry_run: bool = False  # explain(): "replaced" means "would be replaced"
    memory: list[GraphMemory] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)

    @property
    def approximate(self) -> list[Site]:
        """Sites that run an approximate kernel (``exact=False``)."""
        return [s for s in self.sites if s.replaced and not s.exact]

    def rows(self) -> list[SiteRow]:
        """One row per attention site of the model: the n-th site of a module in each graph is one site."""
        rows: dict[tuple[str, int], list[Site]] = {}
        nth: dict[tuple[int, str], int] = {}
        for s in self.sites:
            count = nth.get((s.graph, s.where), 0)
            nth[(s.graph, s.where)] = count + 1
            rows.setdefault((s.where, count), []).append(s)
        return [SiteRow(where, tuple(seen)) for (where, _), seen in rows.items()]

    def add_fallback(self, fallback: Fallback) -> bool:
        """Record ``fallback``, warning the first time it is seen; False when it was already recorded."""
        if fallback in self.fallbacks:
            return False
        self.fallbacks.append(fallback)
        warnings.warn(f"attnopt: {fallback.where}: {fallback.why}", AttnoptWarning, stacklevel=3)
        return True

    def details(self, full: bool = False) -> str:
        """Per site: each candidate's time, why the others were rejected; per graph: peak memory.

        Sites are numbered as in the table. On a machine without CUDA, the kernels
        that only run on CUDA are named in one line instead of being rejected site by
        site, and reasons are given in plain words; ``full=True`` lists every kernel
        with every reason as the planner wrote it (fill names included).
        """
        lines = []
        for g in self.memory:
            budget = "" if g.budget is None else f" (max_mem {format_bytes(g.budget)})"
            what = "forward+backward" if g.training else "forward"
            lines.append(f"graph {g.graph}: estimated peak {what} {format_bytes(g.before)} -> {format_bytes(g.after)}"
                         f"{budget}")
        unavailable = {} if full else _unavailable_kernels()
        if not full and any(_APPROXIMATE in reasons for s in self.sites for _, reasons in s.rejected_kernels):
            # exact=True: the approximate kernels' other reasons do not matter either
            unavailable.update({name: _APPROXIMATE for name in _approximate_kernels()})
        hidden: dict[str, str] = {}
        several_graphs = self.graphs > 1
        # sites and graphs with the same candidates share one block: body -> graphs -> site numbers
        blocks: dict[tuple[str, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, row in enumerate(self.rows()):
            bodies: dict[tuple[str, ...], list[int]] = {}
            for s in row.seen:
                body = _candidates_block(s, full, unavailable, hidden)
                if body:
                    bodies.setdefault(tuple(body), []).append(s.graph)
            for body, graphs in bodies.items():
                blocks.setdefault(body, {}).setdefault(tuple(graphs) if several_graphs else (), []).append(i)
        for body, where in blocks.items():
            labels = []
            for graphs, indices in where.items():
                label = ("site " if len(indices) == 1 else "sites ") + _ranges(indices)
                labels.append(f"{label} ({_graphs_label(graphs)})" if graphs else label)
            lines.append(f"{'; '.join(labels)}: {body[0]}")
            lines.extend(body[1:])
        approximate = [name for name, why in hidden.items() if why == _APPROXIMATE]
        elsewhere = {name: why for name, why in hidden.items() if why != _APPROXIMATE}
        if approximate:
            lines.append(f"not considered ({_APPROXIMATE}): {', '.join(approximate)}")
        if elsewhere:
            devices = "/".join(sorted(set(elsewhere.values())))
            lines.append(f"not run on this machine ({devices} only, none here): {', '.join(elsewhere)} "
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
            "rows": [{"where": r.where, "graphs": list(r.graphs), "replaced": r.replaced,
                      "shapes": [list(shape) for shape in r.shapes]} for r in self.rows()],
            "memory": [asdict(m) for m in self.memory], "fallbacks": [asdict(f) for f in self.fallbacks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        fallbacks = [f"not optimized: {f.where}: {f.why}" for f in self.fallbacks]
        if not self.graphs:
            if fallbacks:
                return "\n".join(["attnopt: no graph captured"] + fallbacks)
            return "attnopt report: no graph captured yet (the model has not been called)"
        rows = self.rows()
        verb = "would be replaced (dry run)" if self.dry_run else "replaced"
        everywhere = sum(r.replaced for r in rows)
        partly = sum(not r.replaced and any(s.replaced for s in r.seen) for r in rows)
        head = f"attnopt: {everywhere} of {len(rows)} attention site(s) {verb} in {self.graphs} graph(s)"
        if partly:
            head += f"; {partly} more in some graphs only (see why)"
        if not rows:
            return "\n".join([head] + fallbacks)
        table = [("#", "where", "attention", "heads q/kv", "q x kv", "dtype", "kernel", "memory", "graphs", "why")]
        for i, row in enumerate(rows):
            table.append((str(i), row.where, *_row_cells(row)))
        widths = [max(len(r[c]) for r in table) for c in range(len(table[0]) - 1)]
        lines = [head]
        for j, r in enumerate(table):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
        if self.approximate:
            approximate = dict.fromkeys(s.where for s in self.approximate)
            lines.append(f"APPROXIMATE sites (exact=False): {', '.join(approximate)}")
        lines.extend(fallbacks)
        details = self.details()
        return "\n".join(lines + ([details] if details else []))

    def __repr__(self) -> str:
        rows = self.rows()
        return f"Report({sum(r.replaced for r in rows)}/{len(rows)} sites replaced, {self.graphs} graphs)"


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(v for v in values if v))


def _row_cells(row: SiteRow) -> tuple[str, ...]:
    """The table cells of one site after its path: what it is, what was done, in which graphs, and why."""
    seen = row.seen
    found = _distinct(s.found for s in seen if s.q_len is not None) or "?"
    heads = _distinct(f"{s.q_heads}/{s.kv_heads}" if s.q_heads else "" for s in seen)
    dtype = _distinct((s.dtype or "").replace("torch.", "") for s in seen)
    kernel = _distinct(((s.kernel or "-") + ("" if s.exact else " (approx)")) if s.replaced else "left alone"
                       for s in seen)
    memory = next((f"{format_bytes(s.bytes_before)} -> {format_bytes(s.bytes_after)}" for s in seen
                   if s.bytes_before is not None and s.bytes_after is not None), "")
    reasons: dict[str, list[int]] = {}
    for s in seen:
        reasons.setdefault(_plain(s.reason), []).append(s.graph)
    if len(reasons) == 1:
        why = next(iter(reasons))
    else:
        why = "; ".join(f"{_graphs_label(graphs)}: {reason}" for reason, graphs in reasons.items())
    return found, heads, _shapes_label(row.shapes), dtype, kernel, memory, _ranges(row.graphs), why


def _candidates_block(s: Site, full: bool, unavailable: dict[str, str], hidden: dict[str, str]) -> list[str]:
    """The decision on one site in one graph, with every candidate's time and the rejected kernels' reasons."""
    if not s.candidate_times and not s.rejected_kernels:
        return []
    chosen = s.kernel if s.replaced else "left alone"
    approx = "" if s.exact or s.error is None else f", APPROXIMATE: this site's own error {s.error:.3g} on the calibration input (the model's output error is in the reason)"
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
    return body


def _ranges(numbers) -> str:
    """``0, 1, 2, 5`` as "0-2, 5"."""
    numbers = sorted(set(numbers))
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _graphs_label(graphs) -> str:
    return ("graph " if len(set(graphs)) == 1 else "graphs ") + _ranges(graphs)


def _shapes_label(shapes: tuple[tuple[int, int], ...]) -> str:
    """Each distinct "q x kv", or the first and last of many (a generate() loop sees one shape per step)."""
    said = [f"{q} x {kv}" for q, kv in shapes]
    if len(said) > 4:
        return f"{said[0]}, ..., {said[-1]} ({len(said)} shapes)"
    return ", ".join(said)


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


def _approximate_kernels() -> list[str]:
    from attnopt.kernels import registry

    return [kernel.name for kernel in registry.all_kernels() if not kernel.exact]


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
