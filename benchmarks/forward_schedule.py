"""Warp specialization on a plain or causal forward, checked then timed against the peers.

    python benchmarks/forward_schedule.py --out benchmarks/results/forward_schedule.md     # on the GPU, < 6 min
    python benchmarks/forward_schedule.py --device cpu --tiny                            # the interpreter
    python benchmarks/forward_schedule.py --compile-only                                 # every mode for sm_90, here

An experiment: does Triton's automatic warp specialization take the D 128 forward nearer cuDNN than
``triton_flash``'s band forward (0.74-0.83x in ``kernels.md``)? The kernel here is the band forward's algorithm
reduced to what the question needs (causal or not, GQA by the kv head's index, N a multiple of the tiles), with
these ``Mode`` switches:

* ``loads``: pointer loads; descriptors over every head's rows (``flat``, contiguous inputs); or each program's
  own descriptors over its head's rows (``head``, any strides with a contiguous last dim, as HF hands them over).
* ``warp_specialize``: the kv loop is ``tl.range(..., warp_specialize=True)``: producer warps issue the loads,
  the consumer warp group computes with the registers the producer gives up.
* ``single``: every kv tile of a query tile in one loop, the causal mask applied inside it, on every tile or
  (``branch``) only on the tiles that cross the diagonal. Triton 3.6's warp specialization compiles only a kernel
  with one loop (the first version of this script, ``forward_schedule.md``: every two-loop causal variant failed
  in its pass). Off: the diagonal's tiles in a loop of their own.

Every variant is first compared with the float64 reference of ``forward_sweep.py`` (output and log-sum-exp),
then timed with ``do_bench`` beside SDPA cuDNN, SDPA flash, compiled FlexAttention and ``triton_flash`` in the
same process. A variant that does not compile or disagrees is listed with its error, not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
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
    #: "ptr": pointer loads; "flat": descriptors over the ``[B * H * N, D]`` rows (contiguous inputs only);
    #: "head": each program's own descriptors over its head's ``[N, D]`` rows (any strides, last dim contiguous)
    loads: str = "ptr"
    warp_specialize: bool = False
    #: one loop over every kv tile of the query tile, the causal mask applied inside it (on every tile, or with
    #: ``branch`` only on the tiles that cross the diagonal); off: the diagonal's tiles in a loop of their own
    single: bool = False
    branch: bool = False
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @property
    def name(self) -> str:
        parts = [self.loads] + (["ws"] if self.warp_specialize else []) + (["single"] if self.single else []) + (
            ["branch"] if self.branch else [])
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
    """One kv tile's online-softmax update from its raw scores ``qk``; ``v`` its values. Every row has seen a key
    by the end of the first tile walked (the diagonal's or key 0's), so ``m`` is finite from then on."""
    if MASKED:
        keep = pos[:, None] >= (n0 + tl.arange(0, BLOCK_N))[None, :]
        s = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, "tf32")
    return acc, l_i, m_new


@triton.jit
def _walk(acc, l_i, m_i, q, k_src, v_src, kv0, stride_kn, stride_vn, lo, hi, pos, m0, qk_scale, D: tl.constexpr,
          BLOCK_N: tl.constexpr, MASKED: tl.constexpr, BRANCH: tl.constexpr, DESC: tl.constexpr, WS: tl.constexpr):
    """The kv tiles ``lo, lo + BLOCK_N, ..`` below ``hi`` of one query tile; with ``BRANCH`` only the tiles past
    ``m0`` masked."""
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = _rows(k_src, kv0 + n0, stride_kn, D, BLOCK_N, DESC)
        qk = _dot(q, tl.trans(k), None, "tf32")
        v = _rows(v_src, kv0 + n0, stride_vn, D, BLOCK_N, DESC)
        if BRANCH:
            if n0 + BLOCK_N > m0:
                acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N, True)
            else:
                acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N, False)
        else:
            acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, pos, n0, qk_scale, BLOCK_N, MASKED)
    return acc, l_i, m_i


@triton.jit
def _forward(Q, K, V, O, LSE, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
             stride_vn, stride_ob, stride_oh, stride_on, N, H, GROUP, qk_scale, D: tl.constexpr,
             CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOADS: tl.constexpr,
             WS: tl.constexpr, SINGLE: tl.constexpr, BRANCH: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # late causal tiles first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    m0 = pid_m * BLOCK_M
    pos = m0 + tl.arange(0, BLOCK_M)
    DESC: tl.constexpr = LOADS != 0
    if LOADS == 1:  # one descriptor over every head's rows: row offsets pick the head
        rows_q = tl.num_programs(1) * N
        rows_kv = (tl.num_programs(1) // GROUP) * N
        q_src = tl.make_tensor_descriptor(Q, [rows_q, D], [D, 1], [BLOCK_M, D])
        o_src = tl.make_tensor_descriptor(O, [rows_q, D], [D, 1], [BLOCK_M, D])
        k_src = tl.make_tensor_descriptor(K, [rows_kv, D], [D, 1], [BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(V, [rows_kv, D], [D, 1], [BLOCK_N, D])
        q0 = bh * N + m0
        kv0 = (bh // GROUP) * N
    elif LOADS == 2:  # the program's own descriptors over its head's rows
        q_src = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [N, D], [stride_qn, 1], [BLOCK_M, D])
        o_src = tl.make_tensor_descriptor(O + b * stride_ob + h * stride_oh, [N, D], [stride_on, 1], [BLOCK_M, D])
        k_src = tl.make_tensor_descriptor(K + b * stride_kb + kvh * stride_kh, [N, D], [stride_kn, 1], [BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(V + b * stride_vb + kvh * stride_vh, [N, D], [stride_vn, 1], [BLOCK_N, D])
        q0 = m0
        kv0 = 0
    else:
        q_src = Q + b * stride_qb + h * stride_qh
        o_src = O + b * stride_ob + h * stride_oh
        k_src = K + b * stride_kb + kvh * stride_kh
        v_src = V + b * stride_vb + kvh * stride_vh
        q0 = m0
        kv0 = 0
    q = _rows(q_src, q0, stride_qn, D, BLOCK_M, DESC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if SINGLE:  # one loop: the only form Triton 3.6's warp specialization compiles
        hi = m0 + BLOCK_M if CAUSAL else N
        acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_src, v_src, kv0, stride_kn, stride_vn, 0, hi, pos, m0, qk_scale, D,
                              BLOCK_N, CAUSAL, CAUSAL and BRANCH, DESC, WS)
    else:
        if CAUSAL:  # the diagonal's tiles first, then every key below the query tile's first row
            acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_src, v_src, kv0, stride_kn, stride_vn, m0, m0 + BLOCK_M, pos,
                                  m0, qk_scale, D, BLOCK_N, True, False, DESC, False)
        acc, l_i, m_i = _walk(acc, l_i, m_i, q, k_src, v_src, kv0, stride_kn, stride_vn, 0, m0 if CAUSAL else N,
                              pos, m0, qk_scale, D, BLOCK_N, False, False, DESC, WS)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if DESC:
        o_src.store([q0, 0], out)
    else:
        tl.store(o_src + pos[:, None] * stride_on + tl.arange(0, D)[None, :], out)
    tl.store(LSE + bh * N + pos, (m_i + tl.math.log2(l_i)) * LN2)


LOADS = {"ptr": 0, "flat": 1, "head": 2}


def forward(q, k, v, causal: bool, mode: Mode):
    """(out, lse) of ``[B, H, N, D]`` q and ``[B, Hkv, N, D]`` k, v (last dims contiguous; all of it for "flat");
    N a multiple of the tiles."""
    batch, heads, n, d = q.shape
    if n % mode.block_m or n % mode.block_n:
        raise ValueError(f"{mode.name}: N ({n}) must be a multiple of the tiles")
    if mode.loads == "flat" and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"{mode.name}: one descriptor over all rows needs contiguous inputs")
    if mode.warp_specialize and not (HAS_WARP_SPECIALIZE and mode.loads != "ptr"):
        raise ValueError(f"{mode.name}: warp specialization needs descriptors and a Triton that has it")
    if mode.loads != "ptr":
        use_scratch_allocator()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    grid = (n // mode.block_m, batch * heads)
    _forward[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], n, heads,
                   heads // k.shape[1], d ** -0.5 * LOG2E, D=d, CAUSAL=causal, BLOCK_M=mode.block_m,
                   BLOCK_N=mode.block_n, LOADS=LOADS[mode.loads], WS=mode.warp_specialize, SINGLE=mode.single,
                   BRANCH=mode.branch, num_warps=mode.num_warps, num_stages=mode.num_stages)
    return out, lse


#: the band forward's measured tiles, without warp specialization (two loops)
BASELINES = [Mode("ptr", block_m=64, block_n=64, num_warps=4), Mode("ptr", block_m=128, block_n=64, num_warps=8),
             Mode("head", block_m=64, block_n=64, num_warps=4), Mode("flat", block_m=64, block_n=64, num_warps=4)]
#: (block_m, block_n, num_warps, num_stages) tried with warp specialization (one consumer warp group of 4 warps:
#: with 8 the pass leaves the loop alone)
WS_TILES = [(128, 128, 4, 2), (128, 128, 4, 3), (128, 64, 4, 2), (64, 128, 4, 2)]


def modes(tiny: bool, causal: bool = True) -> list[Mode]:
    if tiny:
        return [Mode(loads, False, single, branch and causal, 16, 16, 4, 1) for loads in ("ptr", "flat", "head")
                for single in (False, True) for branch in ((False, True) if single else (False,))
                if not (branch and not causal)]
    out = list(BASELINES)
    for bm, bn, w, s in WS_TILES:
        for loads in ("flat", "head"):
            for branch in (False, True) if causal else (False,):
                out.append(Mode(loads, True, True, branch, bm, bn, w, s))
    return [m for m in out if HAS_DESCRIPTORS or m.loads == "ptr"]


def cases(tiny: bool) -> list[fs.Case]:
    if tiny:
        return [fs.Case(32, 64, 2, 2, 2, True), fs.Case(32, 64, 1, 4, 2, False)]
    return [fs.Case(128, 4096, 4, 16, 16, False), fs.Case(128, 4096, 4, 16, 16, True),
            fs.Case(128, 16384, 1, 16, 16, True), fs.Case(128, 4096, 4, 32, 8, True),
            fs.Case(128, 8192, 2, 16, 16, False), fs.Case(128, 16384, 1, 16, 16, False),
            fs.Case(64, 4096, 4, 16, 16, True), fs.Case(64, 4096, 4, 16, 16, False),
            fs.Case(128, 1024, 16, 16, 16, True)]


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


def compile_for_sm90(todo: list[fs.Case]) -> None:
    """Compile each (head dim, causal, mode) of ``todo`` for sm_90 without a GPU (Triton's own compiler and
    ptxas): what fails here fails on the H200 too, before any device time is spent."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(_forward.fn).parameters)
    for d, causal in dict.fromkeys((c.d, c.causal) for c in todo):
        for mode in modes(False, causal):
            constants = dict(D=d, CAUSAL=causal, BLOCK_M=mode.block_m, BLOCK_N=mode.block_n, LOADS=LOADS[mode.loads],
                             WS=mode.warp_specialize, SINGLE=mode.single, BRANCH=mode.branch)
            signature = {name: "constexpr" if name in constants else ("*bf16" if name in "QKVO" else (
                "*fp32" if name == "LSE" else ("fp32" if name == "qk_scale" else "i32"))) for name in names}
            try:
                kernel = triton.compile(ASTSource(_forward, signature, constants), target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": mode.num_warps, "num_stages": mode.num_stages})
                print(f"ok   D{d} causal={causal} {mode.name}: shared {kernel.metadata.shared}", flush=True)
            except Exception as exc:
                lines = [line for line in str(exc).splitlines() if line.strip()]
                print(f"FAIL D{d} causal={causal} {mode.name}: {type(exc).__name__}: {lines[-1][:160] if lines else ''}",
                      flush=True)


def sweep_case(case: fs.Case, tiny: bool, device: str, failed: dict, transposed: bool = False) -> list[fs.Row]:
    q, k, v, spec = fs.inputs(case, device, transposed=transposed)
    ref = fs.reference(q, k, v, spec)
    rows = [fs.run_one(name, fn, ctx, ref, device, False)
            for name, (fn, ctx) in fs.peers(case, q, k, v, spec, device).items()]
    for mode in modes(tiny, case.causal):
        family = (case.d, case.causal)
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
    parser.add_argument("--transposed", action="store_true",
                        help="inputs as HF hands them over: [B, N, H, D] tensors seen as [B, H, N, D]")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every (head dim, causal, mode) for sm_90 on this machine and stop")
    args = parser.parse_args()
    start = time.time()
    todo = cases(args.tiny)
    if args.compile_only:
        compile_for_sm90(todo)
        return
    failed: dict = {}
    if args.device == "cuda" and args.workers > 0:
        jobs = list({((c.d, c.causal), m): (dataclasses.replace(c, n=256, batch=1), m, args.device)
                     for c in todo for m in modes(args.tiny, c.causal)}.items())
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
    fs.run_within_budget(todo, start, args.budget, lambda case: sweep_case(case, args.tiny, args.device, failed, args.transposed),
                         head, fs.table, args.out)


if __name__ == "__main__":
    main()
