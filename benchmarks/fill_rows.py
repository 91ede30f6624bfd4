"""The row-wise fills of rows without keys against the original attention's forward and backward.

    python benchmarks/fill_rows.py --out benchmarks/results/fill_rows.md
    python benchmarks/fill_rows.py --device cuda --out benchmarks/results/fill_rows_cuda.md

A left-padded causal batch in training: B 8, 12 heads, N 512, D 64, float32, batch row b padded on the left by
``b * N / 2 / (B - 1)`` keys (0 .. N/2), so its first rows see no key. Each case times what ``kernels/fills.py``
adds to a kernel for those rows, the gradients (``empty_row_grads``) where they are computed row by row (a
softcap, dropout, the band replaced then the padding added) and the dropped-out forward fill
(``_dropped_uniform_rows``, through ``fill_empty_rows``), next to the original attention of the same inputs,
eager ``softmax(q k^T s + mask) v`` forward and backward under autograd. ``ops``: the aten ops other than views
the fill dispatches (on a GPU, about its kernel launches). Times: medians of ``--repeat`` interleaved runs after
a warm-up.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import torch

from attnopt.kernels import AttentionSpec, Fill
from attnopt.kernels import fills, triton_fill_rows

B, H, N, D = 8, 12, 512, 64
SEED = 1234
#: (name, spec terms, what is timed: "backward" for empty_row_grads, "forward" for the dropped-out fill)
CASES = [("softcap 50, finite added", dict(fill=Fill.FINITE_ADDED, softcap=50.0), "backward"),
         ("dropout 0.1, finite added", dict(fill=Fill.FINITE_ADDED, dropout_p=0.1), "backward"),
         ("band replaced, padding added", dict(fill=Fill.FINITE_REPLACED_ADDED), "backward"),
         ("dropout 0.1, finite added", dict(fill=Fill.FINITE_ADDED, dropout_p=0.1), "forward")]


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops other than views dispatched while on."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def inputs(device: str):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(B, H, N, D, generator=g).to(device) for _ in range(4))
    pads = torch.tensor([round(b * N / 2 / (B - 1)) for b in range(B)], device=device)
    keep = torch.arange(N, device=device)[None, :] >= pads[:, None]  # [B, N] left padding
    empty = (~keep)[:, None, :].expand(B, H, N)  # causal: the rows before a batch row's first kept key
    return q, k, v, grad_out, keep, empty


def original(q, k, v, grad_out, keep):
    """The written model's attention, forward and backward: an additive finfo.min mask of the band and padding."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    mask = torch.zeros(B, 1, N, N, device=q.device).masked_fill(~(causal & keep[:, None, None, :]),
                                                                torch.finfo(torch.float32).min)
    out = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5 + mask, dim=-1) @ v
    return torch.autograd.grad(out, (q, k, v), grad_out)


def median_ms(fn, sync, runs: list[float]) -> None:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    runs.append((time.perf_counter() - start) * 1e3)


def variants(q, k, v, grad_out, keep, empty, out):
    """(case, terms, timed, what, fill) of each case: the PyTorch fills, and the Triton kernels (``triton_fill_rows``,
    checked against them first) where they take the call (a GPU)."""
    for name, terms, timed in CASES:
        spec = AttentionSpec.from_tensors(q, k, v, causal=True, key_padding=keep, **terms)
        dropped = SEED if spec.dropout_p > 0.0 else None
        if timed == "forward":
            yield name, terms, timed, "`_dropped_uniform_rows` (PyTorch)", (
                lambda spec=spec: fills._dropped_uniform_rows(out, empty, v, spec, 0, SEED))
            if triton_fill_rows.supported(spec, v, False, False):
                want = fills._dropped_uniform_rows(out, empty, v, spec, 0, SEED)
                got = triton_fill_rows.dropped_rows(out, empty, v, spec, 0, SEED)
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                yield name, terms, timed, f"`triton_fill_rows.dropped_rows` (max rel. diff {error:.1e})", (
                    lambda spec=spec: triton_fill_rows.dropped_rows(out, empty, v, spec, 0, SEED))
            continue
        yield name, terms, timed, "`_row_grads` (PyTorch)", (
            lambda spec=spec: fills._row_grads(q, k, v, grad_out, empty, spec, dropped, False, False))
        if triton_fill_rows.supported(spec, q, False, False):
            want = fills._row_grads(q, k, v, grad_out, empty, spec, dropped, False, False)[:3]
            got = triton_fill_rows.row_grads(q, k, v, grad_out, empty, spec, dropped)
            error = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
                        for g, w in zip(got, want) if w is not None)
            yield name, terms, timed, f"`triton_fill_rows` (max rel. diff {error:.1e})", (
                lambda spec=spec: triton_fill_rows.row_grads(q, k, v, grad_out, empty, spec, dropped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    q, k, v, grad_out, keep, empty = inputs(args.device)
    out = torch.zeros_like(q)  # a kernel's output, 0 on the rows without keys
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"{machine}, torch {torch.__version__}; B {B}, {H} heads, N {N}, D {D}, float32, causal, left padding "
             f"0..{N // 2}: {int(empty[:, 0].sum())} of {B * N} rows without keys; medians of {args.repeat} "
             "interleaved runs", "",
             "| fill | timed | ops | fill ms | original fwd+bwd ms | fill / original |", "|---|---|---|---|---|---|"]
    for name, terms, timed, what, fill in variants(q, k, v, grad_out, keep, empty, out):
        fill()  # warm-up; known_empty_rows finds the padding's answer once
        original(q, k, v, grad_out, keep)
        with _Ops() as ops:
            fill()
        runs = {"fill": [], "original": []}
        for _ in range(args.repeat):
            median_ms(fill, sync, runs["fill"])
            median_ms(lambda: original(q, k, v, grad_out, keep), sync, runs["original"])
        ms = {key: sorted(r)[len(r) // 2] for key, r in runs.items()}
        lines.append(f"| {name} | {what} | {ops.count} | {ms['fill']:.1f} | {ms['original']:.1f} | "
                     f"{ms['fill'] / ms['original']:.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("# Row-wise fills of rows without keys (`benchmarks/fill_rows.py`)\n\n"
                            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
