"""Whole models on the CPU: eager attention against ``attnopt.optimize``, interleaved medians.

    python benchmarks/cpu.py [--lengths 512 1024 2048] [--repeat 5] [--out benchmarks/results/cpu.md]

Models (random weights, float32, batch 2, forward under ``torch.no_grad()``):

* ``quickstart``: the model of ``examples/quickstart.py`` (4 layers, d 256, 8 heads, causal tril
  buffer plus an additive padding mask; one sequence right-padded to 3/4 of the length);
* ``bert``: Hugging Face BERT, 4 layers, d 256, 4 heads, ``attn_implementation="eager"``, an
  ``attention_mask`` with the same padding;
* ``gpt2``: Hugging Face GPT-2, 4 layers, d 256, 4 heads, eager attention, no padding.

Each row runs in a fresh process, as a user's program would (nothing carries over from other
rows: dynamo's caches, or the allocator's state, which decides whether eager's score-sized tensors
are faulted in afresh on every call). In it: the median forward time over ``--repeat`` interleaved
rounds of eager and optimized (one call of each in turn, so a change in the machine's load touches
both alike) and the peak extra memory of one call (``attnopt.measure``). The optimized model's
first call, which captures, times the candidates (at most a couple of seconds, cached per shape)
and rewrites, is timed separately. Correctness first: the optimized output is compared with
eager's before anything is timed. For the HF models, the same model on its own SDPA attention is
timed in another fresh process, as a peer.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import sys
import time
import warnings

import torch

import attnopt
from attnopt.measure import compare
from attnopt.report import format_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = 2


def quickstart(length: int, attn: str):
    sys.path.insert(0, str(ROOT / "examples"))
    import quickstart as qs

    if attn != "eager":
        return None
    torch.manual_seed(0)
    model = qs.GPT(max_len=max(2048, length)).eval()
    tokens, padding = qs.inputs(batch=BATCH, length=length)
    return model, (tokens, padding), {}


def _hf(kind: str, length: int, attn: str):
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "bert":
            config = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=1024,
                                             max_position_embeddings=max(512, length), attn_implementation=attn)
            model = transformers.BertModel(config)
        else:
            config = transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4,
                                             n_positions=max(1024, length), attn_implementation=attn)
            model = transformers.GPT2Model(config)
    model.eval()
    ids = torch.randint(0, 1000, (BATCH, length))
    kwargs = {"input_ids": ids}
    if kind == "bert":
        mask = torch.ones(BATCH, length, dtype=torch.long)
        mask[1, length * 3 // 4:] = 0
        kwargs["attention_mask"] = mask
    return model, (), kwargs


MODELS = {
    "quickstart": quickstart,
    "bert": lambda length, attn: _hf("bert", length, attn),
    "gpt2": lambda length, attn: _hf("gpt2", length, attn),
}


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def run(name: str, length: int, repeat: int) -> dict:
    """One row, in this process: eager against the optimized model, interleaved."""
    model, args, kwargs = MODELS[name](length, "eager")
    eager = copy.deepcopy(model)  # optimize() changes the model itself
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        expected = _first(eager(*args, **kwargs))
        start = time.perf_counter()
        got = _first(optimized(*args, **kwargs))
        first_call = time.perf_counter() - start
        error = (got - expected).abs().max().item()
        assert error < 1e-3, f"{name} at {length}: optimized output differs from eager by {error:.2e}"
        runs = compare({"eager": lambda: eager(*args, **kwargs), "attnopt": lambda: optimized(*args, **kwargs)},
                       repeat=repeat)
    report = optimized.attnopt_report
    kernels = sorted({s.kernel for s in report.replaced}) or ["-"]
    return dict(model=name, length=length, first_call=first_call, error=error,
                runs={k: [m.seconds, m.peak_bytes] for k, m in runs.items()},
                sites=f"{len(report.replaced)}/{len(report.sites)}", kernels=",".join(kernels),
                kept=[s.reason for s in report.left_alone])


def run_sdpa(name: str, length: int, repeat: int) -> list | None:
    """The HF model on its own SDPA attention, in this process: ``[seconds, peak bytes]``."""
    built = MODELS[name](length, "sdpa")
    if built is None:
        return None
    model, args, kwargs = built
    with torch.no_grad():
        found = compare({"sdpa": lambda: model(*args, **kwargs)}, repeat=repeat)["sdpa"]
    return [found.seconds, found.peak_bytes]


_ENV = dict(os.environ)


def _in_subprocess(what: str, name: str, length: int, repeat: int):
    """Run ``what`` for one row in a fresh process, as a user would: nothing (dynamo's caches, the
    allocator's state after other models) carries over from one row to the next."""
    command = [sys.executable, __file__, f"--{what}", name, str(length), str(repeat)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=_ENV)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| model | N | eager | attnopt | speedup | HF SDPA | peak eager | peak attnopt | sites replaced | kernel | "
        "first call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (eager, eager_peak), (ours, ours_peak) = r["runs"]["eager"], r["runs"]["attnopt"]
        sdpa = "—" if r.get("sdpa") is None else f"{r['sdpa'][0] * 1e3:.0f} ms"
        lines.append(
            f"| {r['model']} | {r['length']} | {eager * 1e3:.0f} ms | {ours * 1e3:.0f} ms | {eager / ours:.2f}x | "
            f"{sdpa} | {format_bytes(eager_peak)} | {format_bytes(ours_peak)} | {r['sites']} | {r['kernels']} | "
            f"{r['first_call']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the markdown table here")
    parser.add_argument("--row", nargs=3, metavar=("MODEL", "N", "REPEAT"), help=argparse.SUPPRESS)
    parser.add_argument("--sdpa", nargs=3, metavar=("MODEL", "N", "REPEAT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    for what, job in (("row", run), ("sdpa", run_sdpa)):
        given = getattr(opts, what)
        if given is not None:
            print(json.dumps(job(given[0], int(given[1]), int(given[2]))))
            return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # the run's own tuning cache: every first call measures its candidates (as a new user's would), and no
    # decision timed by an earlier run (on a busier machine, say) is read back
    _ENV["ATTNOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnopt-cpu-bench-")
    rows = []
    for name in opts.models:
        for length in opts.lengths:
            row = _in_subprocess("row", name, length, opts.repeat)
            row["sdpa"] = _in_subprocess("sdpa", name, length, opts.repeat)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            for reason in dict.fromkeys(row["kept"]):
                print(f"    left alone: {reason}", flush=True)
    text = "\n".join([
        "# CPU: eager attention against attnopt.optimize",
        "",
        f"`python benchmarks/cpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads (load average "
        f"{load:.1f} at the start: the machine is shared, so compare within a row); float32, batch "
        f"{BATCH}, forward under no_grad; median of {opts.repeat} interleaved rounds; peak = extra tensor memory "
        "of one call (profiler); each row in a fresh process. \"first call\": capture, timing of the candidates "
        "(cached afterwards) and rewrite. HF SDPA: the same model with `attn_implementation=\"sdpa\"`, in its "
        "own process, for reference.",
        "",
        table(rows),
        "",
        *[f"- {r['model']} at {r['length']}, sites left alone: {reason}"
          for r in rows for reason in dict.fromkeys(r["kept"])],
        "",
    ])
    print()
    print(text)
    if opts.out is not None:
        opts.out.write_text(text)


if __name__ == "__main__":
    main()
