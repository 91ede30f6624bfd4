"""What each spawned rank of the context-parallel tests runs: the whole sequence's attention by the
reference kernel in one process, against ``context_parallel_attention`` on this rank's rows."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# the parent's test session has set these; a spawned rank starts from a fresh interpreter
os.environ.setdefault("ATTNOPT_TUNE", "0")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import attnopt  # noqa: E402
from attnopt.distributed import ContextParallel, SequenceLayout, context_parallel_attention, local_shard  # noqa: E402
from ranks import finish_rank  # noqa: E402


@dataclass
class Case:
    """One attention call: global shapes and mask terms, and how it is spread over the ranks."""

    name: str
    n_q: int = 16
    n_kv: int | None = None
    q_heads: int = 4
    kv_heads: int = 4
    causal: bool | str = False
    window: tuple | None = None
    padding: str | None = None  # "left" (bool rows), "lengths" (int [B]); batch row 1 fully padded
    documents: bool = False
    softcap: float | None = None
    fill: str = "safe"
    load_balance: bool = True
    strategy: str = "auto"
    dtype: torch.dtype = torch.float64
    via_op: bool = False  # through the entry points attnopt::attention calls inside a ContextParallel scope


def _inputs(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_kv = case.n_kv or case.n_q
    batch, dim = 2, 8

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)

    q, k, v = rand(batch, case.q_heads, case.n_q, dim), rand(batch, case.kv_heads, n_kv, dim), rand(
        batch, case.kv_heads, n_kv, dim)
    grad = rand(batch, case.q_heads, case.n_q, dim)
    terms = {}
    if case.padding == "left":  # row 0 left-padded (its first queries see nothing when causal), row 1 all padding
        keep = torch.ones(batch, n_kv, dtype=torch.bool)
        keep[0, : n_kv // 3] = False
        keep[1] = False
        terms["key_padding_mask"] = keep
    elif case.padding == "lengths":
        terms["key_padding_mask"] = torch.tensor([n_kv - 3, 0])
    if case.documents:  # packed documents of random lengths, the same for both batch rows
        cuts = torch.randperm(case.n_q - 1, generator=gen)[:3].sort().values + 1
        ids = torch.zeros(case.n_q, dtype=torch.long)
        ids[cuts] = 1
        terms["document_ids"] = ids.cumsum(0)[None].expand(batch, -1).contiguous()
    return q, k, v, grad, terms


def _through_op_entries(case: Case, mesh, qkv, terms, grad):
    """``ContextParallel.op_forward`` / ``op_backward`` called with the op's arguments, as attnopt.ops
    calls them inside the scope."""
    cp = ContextParallel(mesh, load_balance=case.load_balance, strategy=case.strategy)
    q, k, v = (t.detach() for t in qkv)
    ids = terms.get("document_ids")
    window = case.window or (None, None)
    params = (terms.get("key_padding_mask"), ids, ids, None, None, q.shape[-1] ** -0.5, bool(case.causal),
              "bottom_right" if case.causal == "bottom_right" else "top_left", *window, case.softcap, 0.0,
              case.fill, "reference")
    out, lse, seed = cp.op_forward(q, k, v, *params)
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float64
    dq, dk, dv, _, _ = cp.op_backward(grad, q, k, v, out, lse, seed, *params, False, False)
    return out, (dq, dk, dv)


def _check(case: Case, mesh, seed: int) -> None:
    rank, world = mesh.get_local_rank(), mesh.size()
    q, k, v, grad, terms = _inputs(case, seed)
    common = dict(causal=case.causal, window=case.window, softcap=case.softcap, fill=case.fill)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = attnopt.attention(*leaves, **common, **terms, kernel="reference")
    expected_grads = torch.autograd.grad(expected, leaves, grad)

    q_layout = SequenceLayout(q.shape[2], world, case.load_balance)
    kv_layout = SequenceLayout(k.shape[2], world, case.load_balance)
    local_terms = dict(terms)
    if "key_padding_mask" in terms and terms["key_padding_mask"].dtype == torch.bool:
        local_terms["key_padding_mask"] = local_shard(terms["key_padding_mask"], 1, kv_layout, rank)
    if "document_ids" in terms:
        local_terms["document_ids"] = local_shard(terms["document_ids"], 1, q_layout, rank)
    mine = [local_shard(t, 2, layout, rank).requires_grad_(True)
            for t, layout in ((q, q_layout), (k, kv_layout), (v, kv_layout))]
    grad_mine = local_shard(grad, 2, q_layout, rank)
    if case.via_op:
        out, grads = _through_op_entries(case, mesh, mine, local_terms, grad_mine)
    else:
        out = context_parallel_attention(
            *mine, mesh, **common, **local_terms, kernel="reference", load_balance=case.load_balance,
            strategy=case.strategy,
        )
        grads = torch.autograd.grad(out, mine, grad_mine)

    # float64 merges agree to rounding; a finite fill's mean is float32 in the kernels (fills.py)
    tol = dict(rtol=1e-6, atol=1e-6) if case.dtype != torch.float64 or case.fill.startswith("finite") else dict(
        rtol=1e-10, atol=1e-10)
    where = f"case {case.name!r} (seed {seed}, rank {rank} of {world})"
    torch.testing.assert_close(out, local_shard(expected, 2, q_layout, rank), equal_nan=True, **tol, msg=lambda m: f"{where} out: {m}")
    for name, got, want, layout in zip("qkv", grads, expected_grads, (q_layout, kv_layout, kv_layout)):
        torch.testing.assert_close(got, local_shard(want, 2, layout, rank), equal_nan=True, **tol,
                                   msg=lambda m, name=name: f"{where} d{name}: {m}")
    assert bool(torch.isfinite(out).any()), f"{where}: no finite output at all"


CASES = {
    "causal": Case("causal", causal=True),
    "causal_ring_gqa": Case("causal_ring_gqa", causal=True, kv_heads=2, strategy="ring"),
    "gqa_gathered": Case("gqa_gathered", causal=True, kv_heads=1),
    "full_unbalanced": Case("full_unbalanced", load_balance=False),
    "window": Case("window", window=(3, 2), load_balance=False, strategy="ring"),
    "causal_window_balanced": Case("causal_window_balanced", causal=True, window=(5, 0)),
    "documents": Case("documents", causal=True, documents=True, kv_heads=2),
    "bottom_right_cross": Case("bottom_right_cross", n_q=8, n_kv=16, causal="bottom_right", window=(6, 0)),
    "softcap_padded": Case("softcap_padded", causal=True, padding="left", softcap=2.0, fill="finite_added"),
    "float32_window_padded": Case("float32_window_padded", window=(2, 2), padding="left", dtype=torch.float32,
                                  load_balance=False),
    **{f"padded_{fill}": Case(f"padded_{fill}", causal=True, padding="left", kv_heads=2, fill=fill)
       for fill in ("safe", "-inf", "finite", "finite_added")},
    **{f"lengths_{fill}": Case(f"lengths_{fill}", padding="lengths", documents=True, fill=fill)
       for fill in ("-inf", "finite_added")},
    "op_entries": Case("op_entries", causal=True, padding="left", kv_heads=2, fill="finite_added", via_op=True),
    "op_entries_window_documents": Case("op_entries_window_documents", window=(4, 1), documents=True,
                                        fill="-inf", load_balance=False, via_op=True),
}


def run_cases(rank: int, world: int, rendezvous: str, names: list[str], seeds: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        for name in names:
            for seed in seeds:
                _check(CASES[name], mesh, seed)
        dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        dist.destroy_process_group()
    finish_rank()


class _CausalSelfAttention(torch.nn.Module):
    """Hand-written causal self-attention with its mask built from the (local) length, in float64."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        self.out = torch.nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, x):  # x [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, n, c))


def run_optimized_model(rank: int, world: int, rendezvous: str) -> None:
    """An optimized model run inside ``ContextParallel`` on this rank's positions gives the rows and (summed
    over ranks) the parameter gradients of the whole sequence in one process."""
    import copy

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        torch.manual_seed(0)
        model = _CausalSelfAttention()
        x = torch.randn(2, 16, 32, dtype=torch.float64)
        grad = torch.randn(2, 16, 32, dtype=torch.float64)
        expected = model(x)
        expected_grads = torch.autograd.grad(expected, list(model.parameters()), grad)

        optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
        cp = ContextParallel(mesh, load_balance=True)
        with cp:
            out = optimized(cp.shard(x, 1))
            grads = torch.autograd.grad(out, list(optimized.parameters()), cp.shard(grad, 1))
        report = optimized.attnopt_report
        assert [s.replaced for s in report.sites] == [True] and report.sites[0].causal, str(report)
        torch.testing.assert_close(out, cp.shard(expected, 1), rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, expected_grads):
            got = got.clone()
            dist.all_reduce(got)  # each rank's rows give a part of every parameter's gradient
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    finish_rank()
