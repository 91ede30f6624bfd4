"""Context-parallel attention on the gloo backend: each spawned rank holds its rows of the sequence and
must get exactly its rows of the one-process result (outputs and gradients, every fill)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cp_workers
from attnopt.distributed import SequenceLayout
from attnopt.distributed.context import block_band

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _spawn(world: int, names: list[str], tmp_path) -> None:
    mp.spawn(cp_workers.run_cases, args=(world, str(tmp_path / "rendezvous"), names, [0]), nprocs=world)


def test_two_ranks_every_case(tmp_path):
    _spawn(2, list(cp_workers.CASES), tmp_path)


@pytest.mark.slow
def test_four_ranks(tmp_path):
    _spawn(4, ["causal", "window", "documents", "padded_finite_added", "op_entries"], tmp_path)


def test_layout_balances_causal_work():
    layout = SequenceLayout(16, 4, load_balance=True)
    assert layout.segments(0) == ((0, 2), (14, 16))
    assert layout.segments(3) == ((6, 8), (8, 10))
    assert sorted(layout.global_order().tolist()) == list(range(16))
    # every rank's causal work (visible query-key pairs) is the same
    work = [sum(b * (b + 1) // 2 - a * (a + 1) // 2 for a, b in layout.segments(r)) for r in range(4)]
    assert len(set(work)) == 1, work


def test_layout_rejects_uneven_sequences():
    with pytest.raises(ValueError, match="cannot be cut into 8 equal chunks"):
        SequenceLayout(12, 4, load_balance=True)


@pytest.mark.parametrize("lo, hi", [(None, 0), (-3, 0), (-2, 2), (None, None), (-5, None), (0, 3)])
@pytest.mark.parametrize("d", [-9, -4, -1, 0, 2, 5, 11])
@pytest.mark.parametrize("nq, nk", [(4, 4), (3, 6), (6, 3)])
def test_block_band_is_the_band_restricted_to_the_block(lo, hi, d, nq, nk):
    """The causal/window terms (or dense mask) chosen for a block keep exactly the band's entries."""
    rel = torch.arange(nk)[None, :] - torch.arange(nq)[:, None] - d  # j - i - d
    want = torch.ones(nq, nk, dtype=torch.bool)
    if lo is not None:
        want &= rel >= lo
    if hi is not None:
        want &= rel <= hi
    band = block_band(lo, hi, d, nq, nk)
    if band is None:
        assert not want.any()
        return
    causal, align, left, right, mask = band
    if mask is not None:
        assert (left, right, causal) == (None, None, False)
        got = mask[0, 0]
    else:
        offset = 0 if align == "top_left" else nk - nq
        diag = torch.arange(nk)[None, :] - torch.arange(nq)[:, None] - offset
        got = torch.ones(nq, nk, dtype=torch.bool)
        if left is not None:
            got &= diag >= -left
        if right is not None:
            got &= diag <= right
        if causal:
            got &= diag <= 0
    assert torch.equal(got, want)


def test_optimized_model_inside_the_scope(tmp_path):
    """optimize() composes with ContextParallel: the rewritten site runs context-parallel, exactly."""
    mp.spawn(cp_workers.run_optimized_model, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def test_a_replaced_then_added_fill_is_refused_with_the_way_out():
    """GPT-2's fill (a band replaced by finfo.min, then padding added) has no sharded form yet: the plan
    says so before any collective, rather than computing another function."""
    from attnopt.distributed.context import make_plan
    from attnopt.kernels.spec import Align, Fill

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="outside the ContextParallel scope"):
        make_plan(q, q, None, causal=True, align=Align.TOP_LEFT, window=None, key_padding=None, q_doc=None,
                  kv_doc=None, scale=0.5, softcap=None, fill=Fill.FINITE_REPLACED_ADDED, kernel="reference",
                  load_balance=True, strategy="auto")


@pytest.mark.parametrize("window,world,load_balance,expected", [
    (None, 4, True, "all_gather"),  # causal, balanced: every rank sees a block of every other rank
    ((64, 0), 4, False, "ring"),  # a 64-key window over 4 x 256 positions: only the left neighbour's block
    (None, 2, False, "ring"),  # causal, contiguous halves: rank 0 needs nothing of rank 1
])
def test_auto_strategy_gathers_only_when_every_block_is_needed(window, world, load_balance, expected):
    from attnopt.distributed.context import _Plan, auto_strategy
    from attnopt.kernels.spec import Fill, Window, band_bounds

    layout = SequenceLayout(256 * world, world, load_balance)
    plan = _Plan(group=None, rank=0, world=world, q_layout=layout, kv_layout=layout, scale=1.0,
                 band=band_bounds(True, None if window is None else Window(*window)), offset=0, softcap=None,
                 fill=Fill.SAFE, kernel="reference", strategy="auto", key_padding=None, q_doc=None, kv_doc=None,
                 device=torch.device("cpu"))
    needs = plan.needs
    assert auto_strategy(plan, grouped=True) == ("all_gather" if bool(needs.all()) else "ring") == expected, needs
    assert auto_strategy(plan, grouped=False) == "ring"  # as many kv heads as q heads: K/V blocks are large


@pytest.mark.parametrize("batch_rows", [1, None], ids=["one_batch_row", "all_batch_rows"])
def test_softcap_rows_empty_in_some_heads_take_the_fills_gradients_block_by_block(batch_rows, monkeypatch):
    """The softcap path of an added fill's rows without keys takes a batch row's empty rows in every head at once
    (``fills.row_blocks``), against one rank's block of keys at a time with the mean of v over all of them: summed
    over the key blocks, dq and dk equal ``fills.empty_row_grads`` on all keys, where ``empty`` differs between
    heads too: a head whose row sees a key takes nothing from it, a NaN of its query or of a key of a key head
    without an empty row notwithstanding; with one batch row per block (a CPU's rule) or all (a GPU's)."""
    from types import SimpleNamespace

    from attnopt.distributed.context import _uniform_row_grads
    from attnopt.kernels import fills
    from attnopt.kernels.spec import AttentionSpec, Fill

    monkeypatch.setattr(fills, "BATCH_ROWS_PER_BLOCK", {"cpu": batch_rows})
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 9, 4
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    empty = torch.rand(b, hq, n, generator=g) < 0.5
    empty[1, 2:] = False  # key head 1 of batch row 1: no empty row
    assert (empty.any(1, keepdim=True) & ~empty).any()
    seeing = (~empty[0]).nonzero()[0]
    q[0, seeing[0], seeing[1]] = k[1, 1, 3] = float("nan")
    spec = AttentionSpec.from_tensors(q, k, v, scale=0.5, softcap=2.0, fill=Fill.FINITE_ADDED,
                                      mask=~empty[..., None].expand(b, hq, n, n))
    want_dq, want_dk = fills.empty_row_grads(q, k, v, grad_out, empty, spec)[:2]

    plan = SimpleNamespace(kv_layout=SimpleNamespace(length=n), scale=spec.scale, softcap=spec.softcap)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    for keys in (slice(0, 4), slice(4, n)):  # two ranks' blocks of keys
        _uniform_row_grads(plan, empty, q, k[:, :, keys], v[:, :, keys], grad_out, v.mean(2), dq, dk[:, :, keys])
    torch.testing.assert_close(dq, want_dq, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dk, want_dk, atol=1e-12, rtol=1e-10)
    assert dq[empty].abs().max() > 0 and torch.equal(dq[~empty], torch.zeros_like(dq[~empty]))
    assert not dk.isnan().any() and torch.equal(dk[1, 1], torch.zeros_like(dk[1, 1]))
