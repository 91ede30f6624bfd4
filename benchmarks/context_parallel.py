"""Context-parallel training steps: a Llama-style stack over several GPUs, attnopt against torch's own.

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py [--lengths 65536 131072] [--out FILE]
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --device cpu --tiny    # checks the script (gloo)

The model is ``memory_budget.py``'s hand-written Llama block (RMSNorm, rotary, GQA by repeating K/V,
SwiGLU, causal ``masked_fill(-inf)`` eager attention) with rotary from explicit positions, bf16 on CUDA, random weights; one step is forward and
backward of ``(hidden * g).sum()``. Each rank holds its rows of the sequence (two mirrored chunks per
rank: even causal work). Columns, each at every length:

* ``attnopt CP``: ``attnopt.optimize`` on the eager model, run inside ``attnopt.distributed.ContextParallel``
  on every rank (K/V blocks pass around the ring, or are all-gathered when GQA makes them small);
* ``attnopt, 1 rank``: the same optimized model on rank 0 alone, the whole sequence (out of memory is a result);
* ``torch CP``: the same weights with SDPA attention under
  ``torch.distributed.tensor.experimental.context_parallel`` (PyTorch's ring attention over SDPA).

Correctness first, at ``--check-length``: attnopt's context-parallel output rows and its parameter gradients
(summed over ranks) against the original eager model on the whole sequence in one process. Times are
medians over ``--repeat`` steps after a warm-up step (CUDA events on rank 0, every rank in step); peak memory
is the largest over the ranks.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import attnopt
from attnopt.distributed import ContextParallel
from memory_budget import Block, rotate  # the hand-written Llama block (eager causal attention)


class SdpaBlock(Block):
    """``memory_budget.Block`` with its attention through ``F.scaled_dot_product_attention`` (the peer that
    PyTorch's ring attention takes)."""

    def attention(self, x, cos, sin):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        group = self.heads // self.kv_heads
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, c))


class Llama(nn.Module):
    """Hidden states of ``ids`` at global positions ``pos`` (this rank's rows under context parallelism)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, layers: int, vocab: int = 32000, sdpa: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList((SdpaBlock if sdpa else Block)(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head_dim = dim // heads

    def forward(self, ids, pos):
        half = self.head_dim // 2
        freq = 10000 ** (-torch.arange(half, device=ids.device, dtype=torch.float32) / half)
        angle = pos.to(torch.float32)[:, None] * freq[None, :]
        x = self.embed(ids)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def check(model, cp: ContextParallel, n: int, device, dtype) -> str:
    """attnopt's context-parallel rows and gradients against the eager model on the whole sequence."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (1, n), generator=gen).to(device)
    g = torch.randn(1, n, model.norm.weight.shape[0], generator=gen).to(device, dtype)
    pos = torch.arange(n, device=device)
    out = model(ids, pos)
    want_grads = torch.autograd.grad((out * g).sum(), list(model.parameters()))
    optimized = attnopt.optimize(copy.deepcopy(model))
    with cp:
        mine = optimized(cp.shard(ids, 1), cp.positions(n, device))
        grads = torch.autograd.grad((mine * cp.shard(g, 1)).sum(), list(optimized.parameters()))
    out_error = _relative(mine, cp.shard(out, 1))
    grad_error = 0.0
    for got, want in zip(grads, want_grads):
        got = got.clone()
        dist.all_reduce(got)
        grad_error = max(grad_error, _relative(got, want))
    replaced = sum(s.replaced for s in optimized.attnopt_report.sites)
    errors = torch.tensor([out_error, grad_error], device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    limit = 2e-2 if dtype != torch.float32 else 1e-4
    if errors.max().item() > limit:
        raise SystemExit(f"context-parallel attnopt differs from the original: output {errors[0]:.2e}, "
                         f"gradients {errors[1]:.2e} (relative, above {limit:g})")
    return (f"check at N={n}: {replaced} of {len(optimized.attnopt_report.sites)} sites replaced; relative error "
            f"of the rows {errors[0]:.1e}, of the parameter gradients {errors[1]:.1e} (limit {limit:g})")


def _clock(device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return lambda: (end.record(), torch.cuda.synchronize(), start.elapsed_time(end))[-1]
    begin = time.perf_counter()
    return lambda: (time.perf_counter() - begin) * 1e3


def timed(step, device, repeat: int, group=None) -> tuple[float, int]:
    """(median ms, peak bytes over the ranks of ``group``) of ``step()`` after one warm-up step."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()
    times = []
    for _ in range(repeat):
        if group is not None:
            dist.barrier(group)
        stop = _clock(device)
        step()
        times.append(stop())
    peak = torch.tensor([torch.cuda.max_memory_allocated() if device.type == "cuda" else 0], device=device)
    if group is not None:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(times), int(peak.item())


def fmt(result) -> str:
    if isinstance(result, str):
        return result
    ms, peak = result
    return f"{ms:.1f} ms, {peak / 2**30:.1f} GiB" if peak else f"{ms:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--check-length", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model on short rows (checks the script)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.lengths, args.check_length, args.layers, args.dim, args.heads, args.kv_heads = [256], 64, 2, 64, 4, 2
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mesh = init_device_mesh(args.device, (world,), mesh_dim_names=("cp",))
    cp = ContextParallel(mesh["cp"], load_balance=True)
    lines = []
    try:
        torch.manual_seed(0)
        model = Llama(args.dim, args.heads, args.kv_heads, args.layers).to(device, dtype)
        sdpa_model = Llama(args.dim, args.heads, args.kv_heads, args.layers, sdpa=True).to(device, dtype)
        sdpa_model.load_state_dict(model.state_dict())
        checked = check(model, cp, args.check_length, device, dtype)
        optimized = attnopt.optimize(copy.deepcopy(model))
        name = torch.cuda.get_device_name() if cuda else "CPU"
        lines += [f"{world} x {name}, torch {torch.__version__}; {str(dtype).removeprefix('torch.')}, "
                  f"{args.layers} layers, d_model {args.dim}, {args.heads}/{args.kv_heads} heads, batch 1; one step = "
                  "forward + backward; each cell: median time, peak memory of the busiest rank", "", checked, "",
                  f"| N | attnopt CP ({world} ranks) | attnopt, 1 rank | torch CP + SDPA | CP vs 1 rank | attnopt CP vs "
                  "torch CP |", "|---|---|---|---|---|---|"]
        for n in args.lengths:
            gen = torch.Generator().manual_seed(n)
            ids = torch.randint(0, 32000, (1, n), generator=gen).to(device)
            g = torch.randn(1, n, args.dim, generator=gen).to(device, dtype)
            pos = torch.arange(n, device=device)
            ids_local, g_local, pos_local = cp.shard(ids, 1), cp.shard(g, 1), cp.positions(n, device)

            def ours():
                with cp:
                    (optimized(ids_local, pos_local) * g_local).sum().backward()

            results = {"cp": _attempt(lambda: timed(ours, device, args.repeat, dist.group.WORLD))}
            results["one"] = "-"
            if rank == 0:
                results["one"] = _attempt(lambda: timed(lambda: (optimized(ids, pos) * g).sum().backward(), device,
                                                        args.repeat))
            dist.barrier()
            results["torch"] = _attempt(lambda: _torch_cp(sdpa_model, mesh, ids, pos, g, device, args.repeat))
            if rank == 0:
                cp_ms = results["cp"][0] if not isinstance(results["cp"], str) else None
                ratio = lambda other: (  # noqa: E731
                    f"{other[0] / cp_ms:.2f}x" if cp_ms and not isinstance(other, str) else "-")
                lines.append(f"| {n} | {fmt(results['cp'])} | {fmt(results['one'])} | {fmt(results['torch'])} | "
                             f"{ratio(results['one'])} | {ratio(results['torch'])} |")
                print(lines[-1], flush=True)
            for m in (optimized, model, sdpa_model):
                m.zero_grad(set_to_none=True)
        if rank == 0:
            print("\n".join(lines), flush=True)
            if args.out:
                args.out.write_text("\n".join(lines) + "\n")
    finally:
        dist.destroy_process_group()


def _attempt(run):
    try:
        return run()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except Exception as error:  # a peer that refuses this setup: say so in its cell and go on
        return f"n/a: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _torch_cp(model, mesh, ids, pos, g, device, repeat):
    """PyTorch's ring attention over SDPA: ``context_parallel`` shards the buffers in place along their
    sequence dims (its own load-balanced layout) and runs every SDPA call over the ring."""
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [ids.clone(), pos.clone(), g.clone()]
    with context_parallel(mesh["cp"], buffers=buffers, buffer_seq_dims=[1, 0, 1], no_restore_buffers=set(buffers)):
        return timed(lambda: (model(buffers[0], buffers[1]) * buffers[2]).sum().backward(), device, repeat,
                     dist.group.WORLD)


if __name__ == "__main__":
    main()
