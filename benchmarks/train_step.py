"""Training steps: attnopt against eager, SDPA, torch.compile and FlexAttention, plain and packed rows.

    python benchmarks/train_step.py [--causal 4096 16384] [--packed 16384] [--documents 4 16 64]
                                    [--peers eager sdpa sdpa_compile flex flex_compile attnopt attnopt_compile]
                                    [--repeat 3] [--device cuda|cpu] [--tiny] [--out FILE] [--stacks-every S]

One training step is forward, backward and an AdamW step of a Llama-style ``LlamaForCausalLM``
(8 layers, d_model 2048, 16 query / 4 kv heads, MLP 5632, vocabulary 32000; random weights, bf16 on
CUDA) with the language-model loss on the row's own tokens. Workloads, batch 1:

* ``causal N``: one row of N tokens, HF's usual call ``model(input_ids, labels=...)``;
* ``packed N / k docs``: one row of N tokens holding k documents of random lengths, passed as
  ``position_ids`` restarting at 0 per document and ``use_cache=False``, HF's packing call
  (``DataCollatorWithFlattening``): the model must not attend across documents. HF builds the mask
  itself: SDPA and eager get a dense ``[1, 1, N, N]`` document mask, Flex a ``BlockMask``.

Peers (``benchmarks/models.py``'s), each with the same initial weights: ``eager``, ``sdpa``, ``flex``
(transformers' ``attn_implementation``, Flex as ``"flex_attention"``), ``sdpa_compile`` (the SDPA
model under ``torch.compile``), ``flex_compile`` (the Flex model under ``torch.compile``: the fair peer of
``attnopt_compile``; its cold compile takes minutes, so it runs only when named), ``attnopt`` (the eager model
after ``attnopt.optimize``) and
``attnopt_compile`` (the eager model under ``torch.compile(backend="attnopt")``).

Correctness first: for each workload every peer computes the loss and the gradients of a few weights
from the initial weights, compared with SDPA's before any timing (loss difference, largest gradient
difference relative to SDPA's largest gradient). Then the median step time over ``--repeat`` steps after
two warm-up steps (compiled peers compile there), tokens per second, the first call's seconds (the
correctness call: capture, planning and compiling for attnopt and the compiled peers), for attnopt the seconds
``attnopt.settle`` then waited for the kernels it compiles in the background (the loss and gradients are checked
again after it, on the kernels the steps run), and the peak memory a step
allocates above what persists between steps (weights, gradients, AdamW state; CUDA only). A cell that
runs out of memory says so. ``--device cpu --tiny`` runs a two-layer model on short rows end to end
(a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import pathlib
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

import attnopt
from models import DEFAULT_PEERS, PEERS, timed

#: the weights whose gradients are compared with SDPA's
CHECKED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
           "model.layers.{last}.self_attn.v_proj.weight")
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4)
#: a gradient difference above this share of SDPA's largest gradient is not bf16 rounding (peers: 0.01-0.03)
WRONG_GRAD = 0.1
TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Workload:
    n: int
    documents: int | None = None  # None: one causal row

    @property
    def name(self) -> str:
        return f"causal {self.n}" if self.documents is None else f"packed {self.n} / {self.documents} docs"

    def inputs(self, vocab: int, device: str) -> dict:
        generator = torch.Generator().manual_seed(self.n * 1000 + (self.documents or 0))
        ids = torch.randint(0, vocab, (1, self.n), generator=generator).to(device)
        if self.documents is None:
            return {"input_ids": ids, "labels": ids}
        cuts = torch.randperm(self.n - 1, generator=generator)[: self.documents - 1].add(1).sort().values.tolist()
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, self.n])]
        position_ids = torch.cat([torch.arange(length) for length in lengths])[None].to(device)
        return {"input_ids": ids, "labels": ids, "position_ids": position_ids, "use_cache": False}


#: ``--checkpoint``: every peer's layers run under activation checkpointing (HF's non-reentrant mode)
CHECKPOINT = False


def build(attn: str, config: dict, device: str, dtype: torch.dtype):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **config, max_position_embeddings=65536, attn_implementation=attn, use_cache=not CHECKPOINT))
        if CHECKPOINT:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device, dtype).train()


def make_peer(name: str, weights: dict, config: dict, device: str, dtype: torch.dtype):
    """(the module a step calls, the module holding the parameters)."""
    attn = {"sdpa": "sdpa", "sdpa_compile": "sdpa", "flex": "flex_attention",
            "flex_compile": "flex_attention"}.get(name, "eager")
    model = build(attn, config, device, dtype)
    model.load_state_dict(weights)
    if name in ("sdpa_compile", "flex_compile"):
        return torch.compile(model, dynamic=False), model
    if name == "attnopt":
        return attnopt.optimize(model, dynamic=False), model
    if name == "attnopt_compile":
        return torch.compile(model, backend="attnopt", dynamic=False), model
    return model, model


def loss_and_grads(run, model, inputs: dict, names: list[str]) -> tuple[float, list[torch.Tensor]]:
    """The loss and the gradients of ``names`` at the model's current weights (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    loss = run(**inputs).loss
    loss.backward()
    params = dict(model.named_parameters())
    grads = [params[n].grad.detach().float().clone() for n in names]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def training_step(run, model, inputs: dict):
    """One step as a call: forward, backward, AdamW (its state is created by the first step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        run(**inputs).loss.backward()
        optimizer.step()

    return step


def measure(step, device: str, repeat: int) -> tuple[float, int | None]:
    """(median ms, peak bytes above the steady state or None) of ``step()``."""
    if device == "cuda":
        return timed(step, repeat=repeat, warmup=2)
    for _ in range(2):
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def profile(label: str, step, rows: int) -> None:
    """Print the ``rows`` ops of most device time, and of most host time, over two steps (after one more)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    step()
    torch.cuda.synchronize()
    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"== profile of {label} (two steps): device time", flush=True)
    print(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70), flush=True)
    print(f"== profile of {label} (two steps): host time", flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70), flush=True)


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def run_peer(name: str, workloads: list[Workload], weights: dict, reference: dict, args, config: dict,
             dtype: torch.dtype, cells: dict, measured=lambda: None) -> dict:
    """Correctness, then timing, of one peer on every workload: fills ``cells`` (workload -> cell), calling
    ``measured()`` after each."""
    try:
        run, model = make_peer(name, weights, config, args.device, dtype)
    except (ValueError, ImportError) as error:  # an attention implementation this install lacks
        print(f"{name}: not available ({error})", flush=True)
        cells.update({w: {"error": "n/a"} for w in workloads})
        return cells
    names = [n.format(last=config["num_hidden_layers"] - 1) for n in CHECKED]
    sites: dict = {}  # (length, packed) -> attnopt's sites of the graph that shape captured
    for workload in workloads:
        inputs = workload.inputs(config["vocab_size"], args.device)
        cell: dict = {}
        try:
            model.load_state_dict(weights)  # every peer starts each workload from the same weights
            start = time.perf_counter()
            loss, grads = loss_and_grads(run, model, inputs, names)
            cell["first_s"] = time.perf_counter() - start  # capture, planning and compiling, for the compiled
            if name.startswith("attnopt"):  # the kernels compiled in the background: timed, switched; checked then
                start = time.perf_counter()
                attnopt.settle(run)
                cell["settle_s"] = time.perf_counter() - start
                loss, grads = loss_and_grads(run, model, inputs, names)
            ref_loss, ref_grads = reference[workload]
            cell["loss_diff"] = abs(loss - ref_loss)
            cell["grad_diff"] = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                                    for g, r in zip(grads, ref_grads))
            cell["ms"], cell["peak"] = measure(training_step(run, model, inputs), args.device, args.repeat)
            if args.profile:
                profile(f"{name}, {workload.name}", training_step(run, model, inputs), args.profile)
        except Exception as error:  # one cell's failure (out of memory, an unsupported peer) is its result
            cell["error"] = "out of memory" if out_of_memory(error) else f"error: {type(error).__name__}"
            cell["message"] = (str(error).splitlines() or [""])[0][:200]
        model.zero_grad(set_to_none=True)
        if name.startswith("attnopt"):  # graphs seen for the first time were captured by this workload
            key, known = (workload.n, workload.documents is not None), {s.graph for v in sites.values() for s in v}
            sites[key] = [s for s in attnopt.report_of(run).sites if s.graph not in known] or sites.get(key, [])
            cell["sites"] = sorted({f"{s.found}: {s.kernel or 'left alone'}" for s in sites[key]})
        cells[workload] = cell
        measured()
        print(f"{name}, {workload.name}: " + ", ".join(f"{k}={v}" for k, v in cell.items()), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if name.startswith("attnopt"):
        print(attnopt.report_of(run), flush=True)
    return cells


def table(workloads: list[Workload], peers: list[str], results: dict) -> list[str]:
    """One row per workload and peer; ratios are the other's time over the peer's (above 1: faster)."""
    lines = ["| workload | peer | ms / step | tokens/s | peak MiB | vs SDPA | vs best peer | loss diff vs SDPA "
             "| grad diff vs SDPA | first call s | settled s | attnopt sites |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload in workloads:
        cells = {p: results[p][workload] for p in peers if workload in results[p]}  # a run cut short: what it has
        times = {p: c["ms"] for p, c in cells.items() if "ms" in c}
        others = {p: t for p, t in times.items() if not p.startswith("attnopt") and p != "eager"}
        best = min(others, key=others.get) if others else None
        for peer, cell in cells.items():
            if "ms" not in cell:
                lines.append(f"| {workload.name} | {peer} | {cell['error']} | | | | | | | | | |")
                continue
            ms = cell["ms"]
            peak = "-" if cell["peak"] is None else f"{cell['peak'] / 2**20:.0f}"
            vs_sdpa = f"{times['sdpa'] / ms:.2f}x" if "sdpa" in times else "-"
            vs_best = f"{others[best] / ms:.2f}x ({best})" if best else "-"
            diffs = [f"{cell[k]:.3g}" if k in cell else "-" for k in ("loss_diff", "grad_diff")]
            settled = f"{cell['settle_s']:.1f}" if "settle_s" in cell else ""
            if cell.get("grad_diff", 0.0) > WRONG_GRAD:
                diffs[1] = f"**{diffs[1]} (wrong)**"
            lines.append(f"| {workload.name} | {peer} | {ms:.1f} | {workload.n / ms * 1e3:,.0f} | {peak} | {vs_sdpa} "
                         f"| {vs_best} | {diffs[0]} | {diffs[1]} | {cell.get('first_s', 0.0):.1f} "
                         f"| {settled} | {'; '.join(cell.get('sites', []))} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", type=int, nargs="*", default=None, help="plain causal lengths")
    parser.add_argument("--packed", type=int, nargs="*", default=None, help="packed row lengths")
    parser.add_argument("--documents", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=DEFAULT_PEERS,
                        help="run in this order (a run cut short by its time limit keeps the first ones' rows)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model on short rows (checks the script)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="activation checkpointing in every peer (gradient_checkpointing_enable, non-reentrant)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing each cell, print its ROWS ops of most device and host time (CUDA)")
    parser.add_argument("--stacks-every", type=float, default=None, metavar="S",
                        help="print every thread's Python stack on stderr each S seconds (where a long call waits)")
    args = parser.parse_args()
    global CHECKPOINT
    CHECKPOINT = args.checkpoint
    if args.stacks_every:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True)
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("attnopt").setLevel(logging.INFO)  # each timing's warm-up as it starts: where a first call waits
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --device cpu --tiny to check the script")
    config = TINY if args.tiny else FULL
    causal = args.causal if args.causal is not None else ([64, 256] if args.tiny else [4096, 16384])
    packed = args.packed if args.packed is not None else ([256] if args.tiny else [16384])
    if any(k < 1 or k > n for n in packed for k in args.documents):
        parser.error(f"--documents {args.documents}: each count must be between 1 and the packed length {packed}")
    workloads = [Workload(n) for n in causal] + [Workload(n, k) for n in packed for k in args.documents]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peers = list(dict.fromkeys(args.peers))

    torch.manual_seed(0)
    reference_run = build("sdpa", config, args.device, dtype)
    weights = {k: v.clone() for k, v in reference_run.state_dict().items()}
    names = [n.format(last=config["num_hidden_layers"] - 1) for n in CHECKED]
    reference = {w: loss_and_grads(reference_run, reference_run, w.inputs(config["vocab_size"], args.device), names)
                 for w in workloads}
    del reference_run
    results = {}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    model = "tiny two-layer Llama, float32" if args.tiny else "Llama-style, 8 layers, d 2048, 16/4 heads, MLP 5632, bf16"
    if args.checkpoint:
        model += ", activation checkpointing"
    def lines() -> list[str]:
        return [f"{device}, torch {torch.__version__}; {model}; batch 1; forward + backward + AdamW step, median "
                f"of {args.repeat} after 2 warm-up steps. Peak MiB: above weights, gradients and AdamW state.", "",
                *table(workloads, list(results), results)]

    def measured() -> None:
        if args.out:  # after every cell: a run cut short keeps what it measured
            args.out.write_text("\n".join(lines()) + "\n")

    for peer in peers:
        torch._dynamo.reset()  # each peer compiles its own graphs, within dynamo's recompile limit
        results[peer] = {}
        run_peer(peer, workloads, weights, reference, args, config, dtype, results[peer], measured)
    print("\n".join(lines()), flush=True)


if __name__ == "__main__":
    main()
