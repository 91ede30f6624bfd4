"""The README's headline plot, drawn from committed results: attnopt's speed against SDPA per model.

    python benchmarks/plot.py [--results benchmarks/results/models.md] [--out docs/headline.svg]

Reads every table of ``benchmarks/results/models.md`` (one per ``--attention-mask`` setting of
``benchmarks/models.py``), takes SDPA's and attnopt's median times per row and draws one bar per
row: SDPA's time over attnopt's, so a bar above the 1.0 line is a win and below it a loss. The image
is plain SVG written here, without a plotting library.
"""

from __future__ import annotations

import argparse
import pathlib
import re

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 760, 330, 60, 70, 40
WIN, LOSS = "#2f7d32", "#c62828"


def read_tables(text: str) -> list[tuple[str, list[dict]]]:
    """``[(caption, rows)]``: each markdown table with the line above it as caption; rows as dicts."""
    tables, caption, header, rows = [], "", None, []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                rows.append(dict(zip(header, cells)))
            continue
        if header is not None:
            tables.append((caption, rows))
            header, rows = None, []
        if line.strip():
            caption = line.strip()
    if header is not None:
        tables.append((caption, rows))
    return tables


def _ms(cell: str) -> float | None:
    match = re.match(r"([\d.]+) ms", cell or "")
    return float(match.group(1)) if match else None


def bars(tables) -> list[tuple[str, str, float]]:
    """``[(group, label, SDPA time / attnopt time)]`` for rows where both ran, grouped, then by model and length.
    The file lists the newest run first: a row measured again keeps its newest value."""
    found = {}
    for caption, rows in tables:
        group = "left-padded batch" if "padded" in caption else "attention_mask all ones"
        for row in rows:
            sdpa, ours = _ms(row.get("sdpa") or row.get("SDPA")), _ms(row.get("attnopt") or row.get("attnopt (from eager)"))
            if sdpa and ours:
                found.setdefault((group != "attention_mask all ones", row["model"], int(row["N"])), (group, sdpa / ours))
    return [(group, f"{model} {n // 1024}k", ratio) for (_, model, n), (group, ratio) in sorted(found.items())]


def svg(found: list[tuple[str, str, float]], title: str) -> str:
    top = max(2.0, max(r for _, _, r in found) * 1.1)
    plot_h = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT - 20) / max(1, len(found))

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>']
    for tick in range(0, int(top) + 1):
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick}x</text>')
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="black" '
               'stroke-dasharray="4 3"/>')
    previous = None
    for i, (group, label, ratio) in enumerate(found):
        x = LEFT + i * step + step * 0.15
        colour = WIN if ratio >= 1.0 else LOSS
        out.append(f'<rect x="{x:.1f}" y="{y(ratio):.1f}" width="{step * 0.7:.1f}" '
                   f'height="{y(0) - y(ratio):.1f}" fill="{colour}"/>')
        out.append(f'<text x="{x + step * 0.35:.1f}" y="{y(ratio) - 4:.1f}" text-anchor="middle">{ratio:.2f}</text>')
        out.append(f'<text x="{x + step * 0.35:.1f}" y="{y(0) + 16:.1f}" text-anchor="middle">{label}</text>')
        if group != previous:
            out.append(f'<text x="{x:.1f}" y="{y(0) + 36:.1f}" font-weight="bold">{group}</text>')
            previous = group
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("benchmarks/results/models.md"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/headline.svg"))
    args = parser.parse_args()
    text = args.results.read_text()
    found = bars(read_tables(text))
    if not found:
        raise SystemExit(f"{args.results}: no table with both 'sdpa' and 'attnopt' times")
    device = text.splitlines()[0].split(",")[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(found, f"HF eager attention after attnopt.optimize, speed vs SDPA ({device}, bf16)"))
    print(f"wrote {args.out}: {len(found)} bars")


if __name__ == "__main__":
    main()
