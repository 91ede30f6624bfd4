"""Fine-tuning a BERT encoder on padded batches: attnopt against HF's eager and SDPA attention.

    python benchmarks/bert_train.py [--batch 32] [--lengths 128 512] [--peers eager sdpa attnopt attnopt_sdpa]
                                    [--repeat 5] [--device cuda|cpu] [--tiny] [--profile] [--out FILE]

The usual fine-tuning step: ``BertForSequenceClassification`` (BERT-base: 12 layers, d_model 768, 12 heads,
attention and hidden dropout 0.1; random weights, bf16 autocast on CUDA, float32 on CPU), a batch of
sequences padded to the longest (lengths drawn between a quarter of it and all of it, so every batch row has
padding but the longest), ``attention_mask`` passed, cross-entropy loss, backward and an AdamW step.

With dropout on, HF's attention drops out the softmax of scores that the padding mask shifted by
``finfo.min``; a row with no key (a batch row all padding) would be the dropped-out uniform average, which
attnopt's fills reproduce (``kernels/fills.py``), so the sites are replaced in training too.

Peers, each with the same initial weights:

* ``eager``, ``sdpa``: transformers' ``attn_implementation``;
* ``attnopt``: the eager model after ``attnopt.optimize``;
* ``attnopt_sdpa``: the SDPA model after ``attnopt.optimize`` (HF's SDPA call with its dense additive mask
  and ``dropout_p``, found and replaced).

Correctness first, with dropout off (``model.eval()``): every peer's logits and the gradients of a few
weights against SDPA's on the same batch. Then, dropout on, the median step time over ``--repeat`` steps
after two warm-up steps, sequences per second, and the peak memory a step allocates (CUDA). ``--device cpu
--tiny`` runs a two-layer model (a check of the script, not a measurement). ``--profile`` also prints, per
peer, ``torch.profiler``'s operators of one more step by self host time and by device time: where a step bound
by the host spends it (a host sync shows as a long self time in the op that waits).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
import warnings

import torch

import attnopt

PEERS = ("eager", "sdpa", "attnopt", "attnopt_sdpa")
BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, num_labels=2)
TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512, num_labels=2)
#: the weights whose gradients are compared with SDPA's
CHECKED = ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.weight",
           "classifier.weight")


def build(peer: str, config: dict, device: str):
    import transformers

    attn = "sdpa" if peer in ("sdpa", "attnopt_sdpa") else "eager"
    torch.manual_seed(0)  # the same initial weights for every peer
    cfg = transformers.BertConfig(**config, attn_implementation=attn)
    model = transformers.BertForSequenceClassification(cfg).to(device)
    if peer.startswith("attnopt["):  # one kernel forced on every site: attnopt[sdpa_efficient]
        model = attnopt.optimize(model, kernel=peer[len("attnopt["):-1])
    elif peer.startswith("attnopt"):
        model = attnopt.optimize(model)
    return model


def batch(n: int, size: int, vocab: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(n * 7 + size)
    lengths = torch.randint(n // 4, n + 1, (size,), generator=generator)
    lengths[0] = n
    mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (size, n), generator=generator) * mask
    labels = torch.randint(0, 2, (size,), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def loss_and_grads(model, inputs, device: str):
    model.zero_grad(set_to_none=True)
    with autocast(device):
        out = model(**inputs)
    out.loss.backward()
    params = dict(model.named_parameters())
    return out.logits.detach().float(), [params[name].grad.detach().float().clone() for name in CHECKED]


def step_fn(model, inputs, device: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        with autocast(device):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device: str, repeat: int) -> tuple[float, int | None]:
    """(median ms, peak bytes above the start or None on CPU) of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def profile_step(step, device: str, peer: str, n: int, rows: int = 15) -> None:
    """``torch.profiler``'s operators of one ``step``: the ``rows`` largest by self host time, then by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"\n### {peer} at N = {n}: operators by self host time", flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if device == "cuda":
        print(f"### {peer} at N = {n}: operators by device time")
        print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def _sites(model) -> str:
    """The training graph's sites (the last graph captured: the eval check captured its own first)."""
    report = getattr(model, "attnopt_report", None)
    if report is None or not report.sites:
        return ""
    last = max(s.graph for s in report.sites)
    sites = [s for s in report.sites if s.graph == last]
    kernels = sorted({s.kernel for s in sites if s.replaced})
    replaced = sum(s.replaced for s in sites)
    return f"{replaced} of {len(sites)} replaced" + (f" ({', '.join(kernels)})" if kernels else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--forced", nargs="*", default=[], metavar="KERNEL",
                        help="also run attnopt with this kernel forced on every site (peer attnopt[KERNEL])")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model (checks the script)")
    parser.add_argument("--profile", action="store_true", help="print each peer's operators over one more step")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device, config = args.device, TINY if args.tiny else BASE
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [f"{where}, torch {torch.__version__}; BertForSequenceClassification {config['num_hidden_layers']} "
             f"layers, d {config['hidden_size']}, {config['num_attention_heads']} heads, dropout 0.1; batch "
             f"{args.batch} padded to N; {'bf16 autocast' if device == 'cuda' else 'float32'}; forward + backward "
             f"+ AdamW, median of {args.repeat} after 2 warm-up steps", "",
             "| N | peer | ms / step | sequences/s | peak MiB | vs SDPA | logits diff vs SDPA (eval) | "
             "grad diff vs SDPA (eval) | first call s | attnopt sites |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    peers = [p for p in PEERS if p in args.peers] + [f"attnopt[{k}]" for k in args.forced]
    for n in args.lengths:
        inputs = batch(n, args.batch, config["vocab_size"], device)
        reference, rows = None, {}
        for peer in ["sdpa"] + [p for p in peers if p != "sdpa"]:
            model = build(peer, config, device)
            start = time.perf_counter()
            model.eval()  # dropout off: outputs comparable with SDPA's
            logits, grads = loss_and_grads(model, inputs, device)
            first = time.perf_counter() - start
            if reference is None:
                reference = (logits, grads)
            valid = logits.isfinite()
            logit_diff = (logits - reference[0]).abs()[valid].max().item()
            grad_diff = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                            for g, r in zip(grads, reference[1]))
            model.train()  # dropout on: the fine-tuning step
            step = step_fn(model, inputs, device)
            try:
                ms, peak = timed(step, device, args.repeat)
            except torch.OutOfMemoryError:
                ms, peak = float("nan"), None
            if args.profile and ms == ms:
                profile_step(step, device, peer, n)
            rows[peer] = (ms, peak, logit_diff, grad_diff, first, _sites(model))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        sdpa_ms = rows["sdpa"][0]
        for peer in peers:
            ms, peak, logit_diff, grad_diff, first, sites = rows[peer]
            peak_text = "-" if peak is None else f"{peak / 2**20:.0f}"
            line = (f"| {n} | {peer} | {ms:.1f} | {args.batch * 1e3 / ms:,.0f} | {peak_text} | {sdpa_ms / ms:.2f}x | "
                    f"{logit_diff:.3g} | {grad_diff:.3g} | {first:.1f} | {sites} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
