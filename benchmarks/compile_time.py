"""First-call overhead: ``attnopt.optimize`` and ``torch.compile(backend="attnopt")`` against plain torch.compile.

    python benchmarks/compile_time.py [--repeat 3] [--length 256] [--train] [--out benchmarks/results/compile_time.md]
    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --length 4096 [--train]   # on a GPU

A user pays the first call once per shape family: dynamo captures the forward, attnopt rewrites
each graph (detect, analyze, plan: within ``tune``'s time budget it measures the candidates), and
the graph is run as is (``optimize``) or compiled by inductor (the backend). Every run is a fresh
process with cold caches (inductor's FX graph and autograd caches off, an empty attnopt tuning
cache), as a new user's first run is. Per model and route: the first call's wall time (median of
``--repeat`` processes), and attnopt's own share of it (the time spent in ``optimize_graph``, of
which the candidates' timing). Routes:

* ``dynamo``: ``torch.compile(model, backend="eager")``, capture only (what ``optimize`` adds attnopt to);
* ``optimize``: ``attnopt.optimize(model)`` (``compiler="eager"``);
* ``inductor``: plain ``torch.compile(model)``;
* ``backend``: ``torch.compile(model, backend="attnopt")`` (inductor).

``--train``: the first call is a training one, forward and backward (``model.train()``, the sum of the
outputs' floating tensors as the loss, dropout off so the outputs compare): inductor compiles the backward too,
and attnopt times its candidates' training path.

``--warm-triton``: Triton's kernel cache (attnopt's kernels and inductor's) is filled by an earlier process, as on a
user's second run or a new shape of a model run before; attnopt's timings and inductor's graphs stay cold.

``--device cuda --dtype bfloat16``: the same on the GPU, where the first call also compiles attnopt's Triton
kernels (within the pass when the candidates are timed, else at the first launch) and inductor's.

Models (random weights, float32 unless ``--dtype``, batch 2, forward under ``torch.no_grad()``): the quickstart's GPT
(4 layers, d 256, 8 heads, causal + padding), Hugging Face Llama (4 layers, d 256, 8/2 heads,
``attention_mask`` with padding) and GPT-2 (4 layers, d 256, 4 heads), eager attention. By name only,
``llama_2048``: the Llama of the GPU benchmarks (8 layers, d 2048, 16/4 heads: head dim 128, which the
measured Triton variants cover; head dim 32 of the small Llama autotunes), for a GPU run::

    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --length 4096 --models llama llama_2048
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("quickstart", "llama", "gpt2", "llama_2048")
#: what runs without --models: the small models (llama_2048 is the GPU benchmarks' Llama: 8 layers, d 2048)
DEFAULT_MODELS = MODELS[:3]
ROUTES = ("dynamo", "optimize", "inductor", "backend")
BATCH = 2


def build(kind: str, length: int):
    """``(model, (args, kwargs))`` for one model, seeded."""
    torch.manual_seed(0)
    if kind == "quickstart":
        sys.path.insert(0, str(ROOT / "examples"))
        import quickstart as qs

        tokens, padding = qs.inputs(batch=BATCH, length=length)
        return qs.GPT(max_len=max(1024, length)).eval(), ((tokens, padding), {})
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in ("llama", "llama_2048"):
            size = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2) if kind == "llama" else
                    dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4))
            config = transformers.LlamaConfig(vocab_size=1000, **size, max_position_embeddings=max(1024, length),
                                              attn_implementation="eager")
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4,
                                             n_positions=max(1024, length), attn_implementation="eager",
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 1000, (BATCH, length))
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, : length // 4] = 0
    return model.eval(), ((), {"input_ids": ids, "attention_mask": mask})


def one(kind: str, route: str, length: int, train: bool = False, device: str = "cpu",
        dtype: str = "float32") -> dict:
    """Time the first call of one route on one model in this (fresh) process (``train``: forward and
    backward), on ``device`` with the model's floating weights in ``dtype``."""
    import attnopt
    import attnopt.backend
    from attnopt.passes import tuning

    spent = {"pass": 0.0, "tune": 0.0, "later": 0.0}

    def timed(fn, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return run

    attnopt.backend.optimize_graph = timed(attnopt.backend.optimize_graph, "pass")
    # the timing of kernels deferred past inductor's compile is on the first call's path too (their compile in
    # the background thread is not, unless the settling waits for it)
    attnopt.backend.settle_deferred = timed(attnopt.backend.settle_deferred, "pass")
    # optimize's graphs run as Python: a site whose kernel compiles in the background is timed before a later call
    import attnopt.passes.pipeline

    attnopt.passes.pipeline.settle_deferred = timed(attnopt.passes.pipeline.settle_deferred, "later")
    tuning.measured_seconds = timed(tuning.measured_seconds, "tune")
    warmups: dict[str, float] = {}  # seconds of each candidate's warm-ups (its compile, autotuning), all sites
    warmed = tuning.Progress.warmed

    def record(self, name, seconds):
        warmups[name] = warmups.get(name, 0.0) + seconds
        return warmed(self, name, seconds)

    tuning.Progress.warmed = record
    compiles: dict[str, list[float]] = {}  # Triton kernel name: [compiles, seconds], attnopt's and inductor's
    if device == "cuda":
        import triton.compiler

        compile_fn = triton.compiler.compile

        def counted(src, *args, **kwargs):  # JITFunction looks ``compile`` up here on its first launch
            start = time.perf_counter()
            try:
                return compile_fn(src, *args, **kwargs)
            finally:
                name = getattr(getattr(src, "fn", None), "__name__", "?")
                entry = compiles.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start

        triton.compiler.compile = counted
    model, inputs = build(kind, length)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    args, kwargs = torch.utils._pytree.tree_map(
        lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)
    if train:
        model.train()

    def call(module):
        out = module(*args, **kwargs)
        if train:
            loss = sum(t.float().sum() for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.requires_grad)
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with contextlib.nullcontext() if train else torch.no_grad():
        call(model)  # eager warm-up: the allocator and lazy inits are not the compiler's
        start = time.perf_counter()
        eager = call(model)
        eager_s = time.perf_counter() - start
        if route == "dynamo":
            compiled = torch.compile(model, backend="eager")
        elif route == "optimize":
            compiled = attnopt.optimize(model)
        elif route == "inductor":
            compiled = torch.compile(model)
        else:
            compiled = torch.compile(model, backend="attnopt")
        start = time.perf_counter()
        got = call(compiled)
        first = time.perf_counter() - start
        # the background compile a first call left (optimize's deferred kernels), then the call that times them
        waited = time.perf_counter()
        for thread in threading.enumerate():
            if thread.name == "attnopt-warm-up":
                thread.join()
        waited = time.perf_counter() - waited
        call(compiled)
    # half precision: two kernels' rounding compounds over the layers (8 for llama_2048), so the largest
    # difference is taken relative to the output's largest value; a wrong rewrite is off by its whole size
    tol = 1e-4 if dtype == "float32" else 5e-2
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(eager)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a, b = a.detach().float(), b.detach().float()
            off = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
            assert off <= tol, f"{kind} {route}: output differs from eager's by {off:.3g} of its largest value"
    sites = replaced = 0
    chosen: dict[str, int] = {}
    if route in ("optimize", "backend"):
        report = attnopt.report_of(compiled)
        sites, replaced = len(report.rows()), sum(r.replaced for r in report.rows())
        for site in report.sites:
            name = site.kernel if site.replaced else "original"
            chosen[name] = chosen.get(name, 0) + 1
    return {"first": first, "eager": eager_s, "pass": spent["pass"], "tune": spent["tune"],
            "later": spent["later"], "waited": waited,
            "sites": sites, "replaced": replaced, "warmups": {n: round(t, 2) for n, t in warmups.items()},
            "chosen": chosen, "triton": {n: [c, round(t, 2)] for n, (c, t) in compiles.items()}}


def fresh(kind: str, route: str, length: int, train: bool = False, device: str = "cpu",
          dtype: str = "float32", warm_triton: bool = False) -> dict:
    """The first call of ``route`` in a fresh process with cold caches; ``warm_triton``: Triton's compiled kernels
    (attnopt's and inductor's) are on disk from an earlier process, as on a user's second run, while attnopt's
    timings and inductor's graphs are not."""
    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, __file__, "--one", kind, route, "--length", str(length), "--device", device,
                   "--dtype", dtype] + (["--train"] if train else [])
        for attempt in range(2 if warm_triton else 1):
            tried = os.path.join(cache, str(attempt))
            env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
                       TORCHINDUCTOR_CACHE_DIR=os.path.join(tried, "inductor"), ATTNOPT_CACHE_DIR=tried)
            env.pop("ATTNOPT_TUNE", None)
            env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")  # cold in the first process
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{kind} {route} failed:\n" + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS,
                        help="llama_2048: the GPU benchmarks' Llama (8 layers, d 2048, 16/4 heads, head dim 128)")
    parser.add_argument("--train", action="store_true", help="a training first call: forward and backward")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--warm-triton", action="store_true",
                        help="Triton's kernel cache filled by an earlier process (a user's second run); the "
                             "other caches cold")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ROUTE"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.length, args.train, args.device, args.dtype)))
        return
    setting = dict(train=args.train, device=args.device, dtype=args.dtype, warm_triton=args.warm_triton)
    fresh(args.models[0], "inductor", args.length, **setting)  # untimed: the first process also warms the OS's file caches
    load = os.getloadavg()[0]
    rows = [
        "| model | dynamo (capture) | optimize | overhead vs dynamo | inductor | backend | overhead vs inductor "
        "| attnopt pass | of which timing candidates | pass / inductor | pass without timing / inductor "
        "| slowest warm-ups | attnopt's Triton compiles | chosen (backend) | optimize: compile left after its first "
        "call, timing on a later call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in args.models:
        runs = {route: [] for route in ROUTES}
        for _ in range(args.repeat):  # interleaved, so that a change in the machine's load touches every route
            for route in ROUTES:
                runs[route].append(fresh(kind, route, args.length, **setting))
                print(kind, route, runs[route][-1], file=sys.stderr, flush=True)
        med = {route: statistics.median(r["first"] for r in runs[route]) for route in ROUTES}
        rewrites = [r for route in ("optimize", "backend") for r in runs[route]]
        pass_s = statistics.median(r["pass"] for r in rewrites)
        tune_s = statistics.median(r["tune"] for r in rewrites)
        own_s = statistics.median(r["pass"] - r["tune"] for r in rewrites)
        chosen = "; ".join(", ".join(f"{n} {c}/{sum(r['chosen'].values())}" for n, c in sorted(r["chosen"].items()))
                           for r in runs["backend"])
        # attnopt's kernels are named with a leading underscore, inductor's ``triton_...``
        ours = [{n: ct for n, ct in r.get("triton", {}).items() if n.startswith("_")} for r in rewrites]
        compiled = (f"{statistics.median(sum(c for c, _ in o.values()) for o in ours):.0f} in "
                    f"{statistics.median(sum(t for _, t in o.values()) for o in ours):.1f} s"
                    if args.device == "cuda" else "-")
        names = {n for r in rewrites for n in r["warmups"]}
        warm = {n: statistics.median(r["warmups"].get(n, 0.0) for r in rewrites) for n in names}
        slowest = ", ".join(f"{n} {t:.1f} s" for n, t in sorted(warm.items(), key=lambda nt: -nt[1])[:3]) or "-"
        rows.append(
            f"| {kind} | {med['dynamo']:.2f} s | {med['optimize']:.2f} s | {med['optimize'] - med['dynamo']:+.2f} s "
            f"| {med['inductor']:.2f} s | {med['backend']:.2f} s | {med['backend'] - med['inductor']:+.2f} s "
            f"| {pass_s:.2f} s | {tune_s:.2f} s | {100 * pass_s / med['inductor']:.1f}% "
            f"| {100 * own_s / med['inductor']:.1f}% | {slowest} | {compiled} | {chosen} "
            f"| {statistics.median(r.get('waited', 0.0) for r in runs['optimize']):.2f} s, "
            f"{statistics.median(r.get('later', 0.0) for r in runs['optimize']):.2f} s |"
        )
    machine = (f"{torch.cuda.get_device_name()}, " if args.device == "cuda" else "") + (
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    flags = (f"{' --train' if args.train else ''}{' --warm-triton' if args.warm_triton else ''}"
             f"{f' --device {args.device} --dtype {args.dtype}' if args.device != 'cpu' else ''}")
    text = "\n".join([
        f"# First-call overhead: attnopt against plain torch.compile ({args.device.upper()})",
        "",
        f"`python benchmarks/compile_time.py --repeat {args.repeat} --length {args.length}{flags}`",
        "",
        f"{machine} (load average {load:.1f} at the start: the machine is shared); {args.dtype}, batch 2, "
        f"N = {args.length}, "
        f"{'forward and backward in training mode' if args.train else 'forward under no_grad'}. Each cell: the first call's wall time, median of {args.repeat} fresh processes with cold "
        "caches (inductor's FX graph and autograd caches off, an empty attnopt tuning cache), run "
        "interleaved. \"attnopt pass\": time in attnopt's rewrite of the captured graphs (detect, masks, "
        "plan, rewrite), median over the optimize and backend runs, and the part of it spent timing the "
        "candidates on this machine (the default `tune=True`, within its time budget; cached per shape "
        "bucket afterwards, so a second run skips it). \"pass / inductor\": attnopt's own share against "
        "plain torch.compile's first call. \"slowest warm-ups\": the candidates whose first runs (their "
        "compile, their autotuning) took longest, summed over the graph's sites. \"attnopt's Triton compiles\": "
        "how many of attnopt's Triton kernels compiled in the process and the seconds in Triton's compiler "
        "(median over the optimize and backend runs). \"chosen\": each backend run's kernels over its sites "
        "(\"original\": kept; the planner keeps the original where it measured it faster, and on a loaded machine "
        "the timings move)."
        + (" Triton's kernel cache was filled by an earlier process (`--warm-triton`), as on a user's second "
           "run; the other caches are cold." if args.warm_triton else ""),
        "",
        *rows,
        "",
    ])
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
