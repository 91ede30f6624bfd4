"""What each spawned rank of the DTensor tests runs: attnopt::attention on DTensors sharded by batch or
by heads, against the one-process op on the whole tensors."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

os.environ.setdefault("ATTNOPT_TUNE", "0")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

import attnopt  # noqa: E402
import attnopt.distributed  # noqa: E402,F401  (the sharding rules)
from ranks import finish_rank  # noqa: E402


def _op(q, k, v, key_padding, bias, fill):
    return torch.ops.attnopt.attention(
        q, k, v, key_padding, None, None, bias, None, q.shape[-1] ** -0.5, True, "top_left", None, None, None, 0.0,
        fill, "reference",
    )[0]


def _check_op(mesh, placement, kv_heads: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, q_heads, n, d = 4, 4, 6, 8

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rand(batch, q_heads, n, d), rand(batch, kv_heads, n, d), rand(batch, kv_heads, n, d)
    bias = rand(1, q_heads, n, n)  # broadcast over the batch: its gradient is a sum over batch shards
    keep = torch.rand(batch, n, generator=gen) > 0.3
    keep[1] = False  # a batch row without keys: rows filled
    grad = rand(batch, q_heads, n, d)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    want = _op(*leaves[:3], keep, leaves[3], "finite_added")
    want_grads = torch.autograd.grad(want, leaves, grad)

    kv_place = placement if kv_heads > 1 or placement == Shard(0) else Replicate()
    bias_place = Shard(1) if placement == Shard(1) else Replicate()
    dts = [distribute_tensor(t, mesh, [p]).requires_grad_(True)
           for t, p in ((q, placement), (k, kv_place), (v, kv_place), (bias, bias_place))]
    keep_dt = distribute_tensor(keep, mesh, [Shard(0) if placement == Shard(0) else Replicate()])
    out = _op(*dts[:3], keep_dt, dts[3], "finite_added")
    assert isinstance(out, DTensor) and out.placements == (placement,), out.placements
    grads = torch.autograd.grad(out, dts, distribute_tensor(grad, mesh, [placement]))
    where = f"placement {placement}, kv_heads {kv_heads}, rank {mesh.get_local_rank()}"
    torch.testing.assert_close(out.full_tensor(), want, msg=lambda m: f"{where} out: {m}")
    for name, got, expected in zip(("q", "k", "v", "bias"), grads, want_grads):
        torch.testing.assert_close(got.full_tensor(), expected, msg=lambda m, name=name: f"{where} d{name}: {m}")




class _Attention(torch.nn.Module):
    """Hand-written causal attention with q/k/v/o projections, as a tensor-parallel plan shards it."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wk = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # [B, H, N, D]: local heads under TP
        k = self.wk(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, -1) @ v  # [B, H, N, D]
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


def _check_parallel_model(mesh, fsdp: bool) -> None:
    """The model under tensor parallelism (heads sharded) or FSDP2, optimized: same outputs and gradients
    (FSDP averages the ranks' gradients: every rank gets the same batch here)."""
    import copy

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = _Attention().double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    want = model(x)
    want.sum().backward()
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    if fsdp:
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(copy.deepcopy(model), mesh=mesh)
    else:
        sharded = parallelize_module(copy.deepcopy(model), mesh, {
            "wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(), "wo": RowwiseParallel()})
    attnopt.optimize(sharded, tune=False, keep_original=False)
    got = sharded(x)
    got.sum().backward()
    report = sharded.attnopt_report
    assert sum(site.replaced for site in report.sites) == 1, report
    torch.testing.assert_close(got, want)
    for name, p in sharded.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), want_grads[name], msg=lambda m, name=name: f"d{name}: {m}")


def run_all(rank: int, world: int, rendezvous: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for placement in (Shard(0), Shard(1)):
            for kv_heads in (4, 2, 1):
                _check_op(mesh, placement, kv_heads, seed=kv_heads)
        _check_parallel_model(mesh, fsdp=False)
        torch._dynamo.reset()
        _check_parallel_model(mesh, fsdp=True)
        dist.barrier()  # both ranks done with every collective before either tears the group down
    finally:
        dist.destroy_process_group()
    finish_rank()
