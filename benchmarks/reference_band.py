"""The banded reference kernel against the CPU's other exact kernels, on causal and sliding-window calls.

    python benchmarks/reference_band.py [--lengths 2048 8192] [--rounds 5] [--threads N] [--cpu-time] [--backward]
                                        [--masks ...] [--plain-document-chunks] [--no-document-runs]

For each length and mask (causal; causal window of 128 keys; 16 causal documents packed, of one length or of
lengths drawn between a quarter and twice their mean), one forward of
``reference``, ``sdpa_cpu`` and ``flex`` (compiled FlexAttention, by name on the
CPU) in float32, batch 1, 8 heads, head dim 64, under no_grad: the median of
interleaved rounds, and flex's first call (its compilation) apart. Each kernel's
memory estimate is printed beside its time. On a shared machine, ``--threads 1
--cpu-time`` measures the process's CPU time on one thread: what the kernels
cost, without the waits of a busy machine (a kernel of many small parallel ops
waits for its second thread at every op when the cores are shared). ``--backward``
times each kernel's forward and backward from a fresh output gradient instead
(without ``flex``: FlexAttention has no backward on the CPU). ``--plain-document-chunks``
cuts ``reference``'s chunks of packed documents by size alone, as before they ended where documents end;
``--no-document-runs`` keeps those chunks but no run of whole documents in one call (``reference._document_run``).
"""

from __future__ import annotations

import argparse
import time

import torch

from attnopt.kernels import reference, registry
from attnopt.kernels.spec import AttentionSpec, Window

KERNELS = ("reference", "sdpa_cpu", "flex")
MASKS = {"causal": dict(causal=True), "window 128": dict(causal=True, window=Window(127, 0)),
         "16 documents": dict(causal=True, documents=16), "16 uneven documents": dict(causal=True, uneven=16)}


def terms_of(mask: dict, n: int) -> dict:
    """The spec's terms for a row of MASKS at length ``n``: ``documents=d`` packs d documents of equal length,
    ``uneven=d`` d documents of lengths drawn (seeded) between a quarter and twice their mean."""
    terms = dict(mask)
    documents, uneven = terms.pop("documents", None), terms.pop("uneven", None)
    if documents is not None:
        doc = (torch.arange(n) * documents // n)[None]
        terms.update(q_doc=doc, kv_doc=doc)
    if uneven is not None:
        weights = torch.empty(uneven).uniform_(0.25, 2.0, generator=torch.Generator().manual_seed(uneven))
        ends = (weights.cumsum(0) / weights.sum() * n).round().long()
        doc = torch.searchsorted(ends, torch.arange(n), right=True)[None]
        terms.update(q_doc=doc, kv_doc=doc)
    return terms


def timed(once, clock=time.perf_counter) -> float:
    start = clock()
    once()
    return clock() - start


def step(kernel, q, k, v, grad, spec, backward: bool) -> None:
    out, lse = kernel.forward(q, k, v, spec, 0)
    if backward:
        kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="the process's CPU time, not wall time")
    parser.add_argument("--backward", action="store_true", help="forward + backward, not the forward alone")
    parser.add_argument("--plain-document-chunks", action="store_true",
                        help="reference's chunks of packed documents by size alone, not ending where documents end")
    parser.add_argument("--no-document-runs", action="store_true",
                        help="no run of whole documents in one call of reference's (their chunks end where they end)")
    parser.add_argument("--masks", nargs="+", choices=list(MASKS), default=list(MASKS))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    kernels = tuple(name for name in KERNELS if not (args.backward and name == "flex"))
    if args.plain_document_chunks:
        reference._document_starts = lambda spec: None
    if args.no_document_runs:
        reference.FUSED_DOCUMENT_RUN = 0
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, "
          f"float32, B=1, H=8, D=64, {'forward + backward' if args.backward else 'forward'}, median of {args.rounds} "
          "interleaved rounds\n")
    print("| N | mask | kernel | time | first call | memory estimate |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for n in args.lengths:
            q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
            for mask in args.masks:
                terms = MASKS[mask]
                spec = AttentionSpec.from_tensors(q, k, v, **terms_of(terms, n))
                grad = torch.randn_like(q)
                runs = {name: (lambda kernel=registry.get(name): step(kernel, q, k, v, grad, spec, args.backward))
                        for name in kernels}
                first = {name: timed(once, clock) for name, once in runs.items()}  # flex compiles here
                times = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, once in runs.items():
                        times[name].append(timed(once, clock))
                for name in kernels:
                    median = sorted(times[name])[len(times[name]) // 2]
                    memory = registry.get(name).memory_bytes(spec) / 2**20
                    print(f"| {n} | {mask} | {name} | {median * 1e3:.1f} ms | {first[name] * 1e3:.0f} ms | "
                          f"{memory:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
