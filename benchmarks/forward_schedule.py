"""Two Hopper schedules for a plain forward (no terms but causal), checked then timed against the peers.

    python benchmarks/forward_schedule.py --out benchmarks/results/forward_schedule.md     # on the GPU, < 6 min
    python benchmarks/forward_schedule.py --device cpu --tiny                            # the interpreter

An experiment: does either schedule take the D 128 forward nearer cuDNN than ``triton_flash``'s band forward
(0.74-0.83x in ``kernels.md``)? The kernel here is the band forward's algorithm reduced to what the question
needs (contiguous ``[B, H, N, D]``, causal or not, GQA by the kv head's index, N a multiple of the tiles), with
these ``Mode`` switches:

* ``descriptors``: K and V (and Q, O) through device-side tensor descriptors over the ``[B * H * N, D]`` rows.
  Off: pointer loads.
* ``warp_specialize``: the visible loop is ``tl.range(..., warp_specialize=True)`` (Triton's automatic warp
  specialization: producer warps issue the loads, consumer warps compute). Needs the descriptors.
* ``ahead``: the visible loop is software-pipelined by hand, as FlashAttention-3 orders a warp group's work:
  tile ``j + 1``'s ``q @ k^T`` is issued before tile ``j``'s ``p @ v``, so the tensor cores have the next scores
  to compute while the softmax of the current ones runs. The last iteration computes one product it discards
  (the last tile's again, so no load runs past the row).

Each mode over a few tile shapes; every variant is first compared with the float64 reference of
``forward_sweep.py`` (output and log-sum-exp), then timed with ``do_bench`` beside SDPA cuDNN, SDPA flash,
compiled FlexAttention and ``triton_flash`` in the same process. A variant that does not compile or disagrees is
listed with its error, not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forward_sweep as fs  # noqa: E402  (sets TRITON_INTERPRET for --device cpu before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnopt.kernels.triton_flash_fwd import _dot  # noqa: E402  (the interpreter's bfloat16 dot)
from attnopt.kernels.triton_flash_tma import HAS_DESCRIPTORS, HAS_WARP_SPECIALIZE, use_scratch_allocator  # noqa: E402

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@dataclasses.dataclass(frozen=True)
class Mode:
    descriptors: bool = False
    warp_specialize: bool = False
    ahead: bool = False
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @property
    def name(self) -> str:
        parts = ["desc" if self.descriptors else "ptr"] + (["ws"] if self.warp_specialize else []) + (
            ["ahead"] if self.ahead else [])
        return "+".join(parts) + f" {self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


@triton.jit
def _rows(src, r0, stride, COLS: tl.constexpr, BLOCK: tl.constexpr, DESC: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK`` of a ``[rows, COLS]`` matrix (every row in range)."""
    if DESC:
        block = src.load([r0, 0])
    else:
        block = tl.load(src + (r0 + tl.arange(0, BLOCK))[:, None] * stride + tl.arange(0, COLS)[None, :])
    return block


@triton.jit
def _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One kv tile's online-softmax update from its raw scores ``qk``; ``v`` its values."""
    if MASKED:
        keep = pos[:, None] >= (n0 + tl.arange(0, BLOCK_N))[None, :]
        s = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a causal tile always keeps key n0 <= pos for some row
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, "tf32")
    return acc, l_i, m_new


@triton.jit
def _walk(acc, l_i, m_i, q, k_src, v_src, kv0, lo, hi, pos, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr,
          MASKED: tl.constexpr, DESC: tl.constexpr, WS: tl.constexpr, AHEAD: tl.constexpr):
    """The kv tiles ``lo, lo + BLOCK_N, ..`` below ``hi`` of one query tile."""
    if AHEAD and not MASKED:
        if lo < hi:
            qk = _dot(q, tl.trans(_rows(k_src, kv0 + lo, D, D, BLOCK_N, DESC)), None, "tf32")
            for n0 in tl.range(lo, hi, BLOCK_N):
                nxt = tl.minimum(n0 + BLOCK_N, hi - BLOCK_N)  # the last tile again on the last iteration
                qk_next = _dot(q, tl.trans(_rows(k_src, kv0 + nxt, D, D, BLOCK_N, DESC)), None, "tf32")
                v = _rows(v_src, kv0 + n0, D, D, BLOCK_N, DESC)
                acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N, MASKED)
                qk = qk_next
    else:
        for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WS and not MASKED):
            k = _rows(k_src, kv0 + n0, D, D, BLOCK_N, DESC)
            qk = _dot(q, tl.trans(k), None, "tf32")
            v = _rows(v_src, kv0 + n0, D, D, BLOCK_N, DESC)
            acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N, MASKED)
    return acc, l_i, m_i


@triton.jit
def _forward(Q, K, V, O, LSE, N, H, GROUP, qk_scale, D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DESC: tl.constexpr, WS: tl.constexpr, AHEAD: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # late causal tiles first
    bh = tl.program_id(1)
    kvh = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    m0 = pid_m * BLOCK_M
    q0 = bh * N + m0  # first row of the query tile in the [B * H * N, D] rows
    kv0 = kvh * N
    pos = m0 + tl.arange(0, BLOCK_M)
    if DESC:
        q_src = tl.make_tensor_descriptor(Q, [tl.num_programs(1) * N, D], [D, 1], [BLOCK_M, D])
        o_src = tl.make_tensor_descriptor(O, [tl.num_programs(1) * N, D], [D, 1], [BLOCK_M, D])
        k_src = tl.make_tensor_descriptor(K, [(tl.num_programs(1) // GROUP) * N, D], [D, 1], [BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(V, [(tl.num_programs(1) // GROUP) * N, D], [D, 1], [BLOCK_N, D])
    else:
        q_src, o_src, k_src, v_src = Q, O, K, V
    q = _rows(q_src, q0, D, D, BLOCK_M, DESC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:  # the diagonal tiles first: the warp-specialized loop must come last (the pass fails otherwise)
        acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_src, v_src, kv0, m0, m0 + BLOCK_M, pos, qk_scale, D, BLOCK_N,
                              True, DESC, False, False)
    visible = m0 if CAUSAL else N  # keys below the query tile's first row are seen by all its rows
    acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_src, v_src, kv0, 0, visible, pos, qk_scale, D, BLOCK_N, False, DESC,
                          WS, AHEAD)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if DESC:
        o_src.store([q0, 0], out)
    else:
        tl.store(O + (q0 + tl.arange(0, BLOCK_M))[:, None] * D + tl.arange(0, D)[None, :], out)
    tl.store(LSE + q0 + tl.arange(0, BLOCK_M), (m_i + tl.math.log2(l_i)) * LN2)


def forward(q, k, v, causal: bool, mode: Mode):
    """(out, lse) of contiguous ``[B, H, N, D]`` q and ``[B, Hkv, N, D]`` k, v; N a multiple of the tiles."""
    batch, heads, n, d = q.shape
    if n % mode.block_m or n % mode.block_n or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"{mode.name}: needs contiguous inputs and N ({n}) a multiple of the tiles")
    if mode.warp_specialize and not (HAS_WARP_SPECIALIZE and mode.descriptors):
        raise ValueError(f"{mode.name}: warp specialization needs descriptors and a Triton that has it")
    if mode.descriptors:
        use_scratch_allocator()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    grid = (n // mode.block_m, batch * heads)
    _forward[grid](q, k, v, out, lse, n, heads, heads // k.shape[1], d ** -0.5 * LOG2E, D=d, CAUSAL=causal,
                   BLOCK_M=mode.block_m, BLOCK_N=mode.block_n, DESC=mode.descriptors, WS=mode.warp_specialize,
                   AHEAD=mode.ahead, num_warps=mode.num_warps, num_stages=mode.num_stages)
    return out, lse


TILES = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3)]


def modes(tiny: bool) -> list[Mode]:
    out = []
    for bm, bn, w, s in [(16, 16, 4, 1)] if tiny else TILES:
        for desc, ws, ahead in ((False, False, False), (False, False, True), (True, False, False),
                                (True, False, True), (True, True, False)):
            if (desc and not HAS_DESCRIPTORS) or (ws and not HAS_WARP_SPECIALIZE) or (ws and tiny):
                continue
            out.append(Mode(desc, ws, ahead, bm, bn, w, s))
    return out


def cases(tiny: bool) -> list[fs.Case]:
    if tiny:
        return [fs.Case(32, 64, 2, 2, 2, True), fs.Case(32, 64, 1, 4, 2, False)]
    return [fs.Case(128, 4096, 4, 16, 16, False), fs.Case(128, 4096, 4, 16, 16, True),
            fs.Case(128, 16384, 1, 16, 16, False), fs.Case(128, 4096, 4, 32, 8, True),
            fs.Case(64, 4096, 4, 16, 16, False)]


def _warm(job):
    """Compile one (family, mode) into Triton's disk cache on small inputs; its error or None."""
    case, mode, device = job
    try:
        q, k, v, _ = fs.inputs(case, device, n=256)
        forward(q, k, v, case.causal, mode)
        torch.cuda.synchronize()
        return job, None
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return job, f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"


def sweep_case(case: fs.Case, tiny: bool, device: str, failed: dict) -> list[fs.Row]:
    q, k, v, spec = fs.inputs(case, device)
    ref = fs.reference(q, k, v, spec)
    rows = [fs.run_one(name, fn, ctx, ref, device, False)
            for name, (fn, ctx) in fs.peers(case, q, k, v, spec, device).items()]
    for mode in modes(tiny):
        family = (case.d, case.causal, case.q_heads // case.kv_heads)
        if (family, mode) in failed:
            rows.append(fs.Row(mode.name, note=failed[(family, mode)], variant=True))
            continue
        rows.append(fs.run_one(mode.name, lambda mode=mode: forward(q, k, v, case.causal, mode),
                               fs.contextlib.nullcontext, ref, device, True))
    for row in rows:
        print(f"  {row.impl}: {fs.fmt(row.ms)} ms, err {fs.fmt(row.out_err, '.1e')} {row.note}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    args.transposed = False  # forward_sweep.sweep_setting's layout: contiguous
    start = time.time()
    todo = cases(args.tiny)
    failed: dict = {}
    if args.device == "cuda" and args.workers > 0:
        jobs = list({((c.d, c.causal, c.q_heads // c.kv_heads), m): (dataclasses.replace(c, n=256, batch=1), m,
                                                                      args.device)
                     for c in todo for m in modes(args.tiny)}.items())
        print(f"compiling {len(jobs)} (family, mode) pairs in {args.workers} processes", flush=True)
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for (_, mode, _), error in pool.imap_unordered(_warm, [job for _, job in jobs]):
                pass
        # errors again in this process, keyed by family (the pool's jobs carry the small case)
        for key, (small, mode, device) in jobs:
            _, error = _warm((small, mode, device))
            if error:
                failed[key] = error
                print(f"  does not run: {mode.name} D{small.d} causal={small.causal}: {error}", flush=True)
    head = [f"{fs.sweep_setting(args, todo)}; correct = max |out - ref| <= {fs.OUT_TOL} max |ref| and "
            f"|lse - ref| <= {fs.LSE_TOL} max(1, |ref|) against float64", ""]
    fs.run_within_budget(todo, start, args.budget, lambda case: sweep_case(case, args.tiny, args.device, failed),
                         head, fs.table, args.out)


if __name__ == "__main__":
    main()
