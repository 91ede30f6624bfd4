"""The left-padded HF Llama forward, attnopt against SDPA in interleaved rounds: latency, host time, launches.

    python benchmarks/padded_rounds.py [--lengths 1024 2048 4096] [--rounds 30]
                                       [--kernels auto sdpa_cudnn triton_flash] [--profile 15]

``benchmarks/models.py``'s Llama-style model (8 layers, d 2048, 16/4 heads, bf16) and its ``padded`` input (batch 2,
the second row left-padded by N/4), forward. At 2k that forward is bound by the host on both sides, so five
medians in a row (``models.py``) move by more than the difference between the peers. Here every peer runs once per
round, in an order that turns each round, for ``--rounds`` rounds: the latency of one forward from an idle GPU
(CUDA events, what ``models.py`` times), the host time until it returns, and the throughput of 8 forwards back to
back. Peers: HF's SDPA model twice (``sdpa`` and ``sdpa (control)``: two equal models, what the method tells
apart), and the eager model after ``attnopt.optimize`` with each of ``--kernels`` (``auto``: the planner's choice).
Then one profiled forward per peer: kernel launches and device time (``torch.profiler``); ``--profile N``: the N
costliest functions of 5 forwards by own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

import attnopt

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import build, inputs_for, settled  # noqa: E402


def one_forward(model, inputs) -> tuple[float, float]:
    """(latency ms from an idle GPU, host ms until the call returns)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    model(**inputs)
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), host * 1e3


def burst(model, inputs, calls: int = 8) -> float:
    """ms per forward of ``calls`` forwards back to back (one synchronization)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        model(**inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def launches_and_device_ms(model, inputs) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC"))
    device = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return launches, device / 1e3


def peers_for(kernels: list[str], weights: dict) -> dict:
    peers = {}
    for name in ("sdpa", "sdpa (control)"):
        peers[name] = build("llama", "sdpa")
        peers[name].load_state_dict(weights)
    for kernel in kernels:
        model = build("llama", "eager")
        model.load_state_dict(weights)
        chosen = {} if kernel == "auto" else {"kernel": kernel}
        peers[f"attnopt {kernel}"] = attnopt.optimize(model, dynamic=False, **chosen)
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kernels", nargs="+", default=["auto", "sdpa_cudnn", "triton_flash"])
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = build("llama", "eager").state_dict()
    peers = peers_for(args.kernels, weights)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; HF Llama-style, bf16, forward, batch 2, "
          f"the second row left-padded by N/4; medians of {args.rounds} interleaved rounds\n")
    print("| N | peer | latency ms | host ms | ms per forward, 8 back to back | latency vs SDPA | launches | "
          "device ms | max abs diff vs SDPA | kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        inputs, real = inputs_for("padded", n)
        with torch.no_grad():
            reference = peers["sdpa"](**inputs).last_hidden_state.float()
            diffs, kernels, trials = {}, {}, {}
            for name, model in peers.items():
                out = model(**inputs).last_hidden_state
                if name.startswith("attnopt"):
                    settled(model, lambda model=model: model(**inputs))
                    out = model(**inputs).last_hidden_state
                    report = model.attnopt_report
                    kernels[name] = ", ".join(sorted({s.kernel for s in report.sites if s.q_len == n}))
                    trials[name] = {s.reason.rsplit("; ", 1)[-1] for s in report.sites
                                    if s.q_len == n and "in the model's own" in s.reason}
                diffs[name] = (out.float() - reference)[real].abs().max().item()
                for _ in range(3):
                    model(**inputs)
            samples = {name: ([], [], []) for name in peers}
            names = list(peers)
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order if r % 2 == 0 else order[::-1]:
                    latency, host = one_forward(peers[name], inputs)
                    samples[name][0].append(latency)
                    samples[name][1].append(host)
                    samples[name][2].append(burst(peers[name], inputs))
            base = statistics.median(samples["sdpa"][0])
            for name in names:
                latency, host, back = (statistics.median(s) for s in samples[name])
                launches, device = launches_and_device_ms(peers[name], inputs)
                print(f"| {n} | {name} | {latency:.2f} | {host:.2f} | {back:.2f} | {base / latency:.3f}x | "
                      f"{launches} | {device:.2f} | {diffs[name]:.3g} | {kernels.get(name, 'SDPA (HF)')} |",
                      flush=True)
            for name, said in trials.items():
                for line in sorted(said):
                    print(f"\n{name}, N {n}: {line}")
            if args.profile:
                for name in names:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(5):
                        peers[name](**inputs)
                    profiler.disable()
                    torch.cuda.synchronize()
                    print(f"\n{name}, N {n}: 5 forwards, by own time")
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
