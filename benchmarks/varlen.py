"""ATen's variable-length attention (cuDNN, flash, mem-efficient) on packed documents and windows, against attnopt's
``triton_flash`` and compiled FlexAttention, in one run.

Run on a GPU: ``python benchmarks/varlen.py [--out results.md] [--cases docs window]``.

Packed documents: one row of ``N`` tokens holding documents of random lengths, causal inside each document
(``B = 1``, 16 query / 4 key heads, D 128, bf16). The variable-length calls take the row as a batch of
documents through cumulative lengths (``cum_seq``): the ``[N, H, D]`` view of the row that a model's
``[B, N, H, D]`` projection already is. Windows: a causal sliding window through flash's ``window_size``.

Every provider is first checked in the same run: its output against float64 attention computed document by
document (or in query chunks), its gradients against float64 autograd (documents) or against ``triton_flash``'s
(windows). Times are ``triton.testing.do_bench`` medians in ms; ratios are the peer's time over ``triton_flash``'s
(above 1: attnopt is faster).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton

import attnopt

DTYPE = torch.bfloat16
HQ, HKV, D = 16, 4, 128


def packed_ids(n: int, documents: int, gen: torch.Generator) -> torch.Tensor:
    """Document ids ``[1, n]`` of ``documents`` packed sequences of random lengths (every one non-empty)."""
    cuts = torch.randperm(n - 1, generator=gen)[: documents - 1] + 1
    starts = torch.zeros(n, dtype=torch.long)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to("cuda")


def cumulative(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 cumulative document lengths ``[docs + 1]`` and the longest document of a row of sorted ids."""
    counts = torch.unique_consecutive(ids[0], return_counts=True)[1]
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32), int(counts.max())


def reference(q, k, v, starts, ends, causal: bool, window: int | None):
    """float64 attention of ``[N, H, D]`` inputs over the segments ``starts[i]:ends[i]`` (documents, or query
    chunks of one row with their visible keys), with autograd."""
    g = q.shape[1] // k.shape[1]
    outs = []
    for s, e, ks, ke in zip(starts[0], ends[0], starts[1], ends[1]):
        qs = q[s:e].transpose(0, 1)
        kk = k[ks:ke].transpose(0, 1).repeat_interleave(g, 0)
        vv = v[ks:ke].transpose(0, 1).repeat_interleave(g, 0)
        sc = qs @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
        qi = torch.arange(s, e, device=q.device)[:, None]
        ki = torch.arange(ks, ke, device=q.device)[None, :]
        keep = torch.ones_like(sc[0], dtype=torch.bool)
        if causal:
            keep &= ki <= qi
        if window is not None:
            keep &= ki > qi - window
        outs.append((sc.masked_fill(~keep, float("-inf")).softmax(-1) @ vv).transpose(0, 1))
    return torch.cat(outs)


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6))


def providers_docs(q, k, v, ids, cu, longest, scale):
    """name -> (forward(), backward(grad)) closures; ``forward`` returns ``[N, Hq, D]``."""
    n = q.shape[0]
    q_leaf, k_leaf, v_leaf = q, k, v
    qb, kb, vb = (t[None].transpose(1, 2) for t in (q, k, v))  # [1, H, N, D] views of the [N, H, D] rows
    found = {}

    def autograd_pair(call):
        state = {}

        def fwd():
            state["out"] = call()
            return state["out"][0].transpose(0, 1)

        def bwd(grad):
            leaves = (q_leaf, k_leaf, v_leaf)
            for t in leaves:
                t.grad = None
            state["out"].backward(grad[None].transpose(1, 2), retain_graph=True)
            return tuple(t.grad for t in leaves)

        return fwd, bwd

    found["triton_flash"] = autograd_pair(
        lambda: attnopt.attention(qb, kb, vb, causal=True, document_ids=ids, kernel="triton_flash"))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def doc_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx >= kv_idx)

    bm = create_block_mask(doc_mod, 1, None, n, n)
    found["flex"] = autograd_pair(lambda: flex(qb, kb, vb, block_mask=bm, enable_gqa=True))

    q, k, v = (t.detach() for t in (q, k, v))  # the ATen calls below take no autograd

    def repeat(t):
        return t.repeat_interleave(HQ // HKV, dim=1)

    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (repeat(k), repeat(v))
        tag = "" if gqa else " (K/V repeated)"

        def cudnn(kk=kk, vv=vv):
            state = {}

            def fwd():
                res = torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, longest, longest, True, 0.0,
                                                              True, False, scale=scale)
                state["res"] = res
                return res[0]

            def bwd(grad):
                res = state["res"]
                dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
                    grad, q, kk, vv, res[0], res[1], res[6], res[7], None, cu, cu, longest, longest, 0.0, True,
                    scale=scale)
                return dq, dk, dv

            return fwd, bwd

        def flash(kk=kk, vv=vv):
            state = {}

            def fwd():
                res = torch.ops.aten._flash_attention_forward(q, kk, vv, cu, cu, longest, longest, 0.0, True, False,
                                                              scale=scale)
                state["res"] = res
                return res[0]

            def bwd(grad):
                res = state["res"]
                return torch.ops.aten._flash_attention_backward(
                    grad, q, kk, vv, res[0], res[1], cu, cu, longest, longest, 0.0, True, res[2], res[3],
                    scale=scale)

            return fwd, bwd

        found["cudnn varlen" + tag] = cudnn()
        found["flash varlen" + tag] = flash()
    kk, vv = repeat(k), repeat(v)
    state = {}

    def eff_fwd():
        res = torch.ops.aten._efficient_attention_forward(q[None], kk[None], vv[None], None, cu, cu, longest, longest,
                                                          0.0, 1, True, scale=scale)
        state["res"] = res
        return res[0][0]

    def eff_bwd(grad):
        res = state["res"]
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            grad[None], q[None], kk[None], vv[None], None, res[0], cu, cu, longest, longest, res[1], 0.0, res[2],
            res[3], 1, False, scale=scale)
        return dq[0], dk[0], dv[0]

    found["mem_eff varlen (K/V repeated)"] = (eff_fwd, eff_bwd)
    return found


def reduce_heads(grad: torch.Tensor, heads: int) -> torch.Tensor:
    """A ``[N, Hq, D]`` gradient of repeated K/V summed back to ``[N, heads, D]``."""
    return grad if grad.shape[1] == heads else grad.unflatten(1, (heads, -1)).sum(2)


def run_docs(n: int, documents: int, lines: list[str]) -> None:
    gen = torch.Generator().manual_seed(documents)
    ids = packed_ids(n, documents, gen)
    cu, longest = cumulative(ids)
    q = torch.randn(n, HQ, D, device="cuda", dtype=DTYPE)
    k = torch.randn(n, HKV, D, device="cuda", dtype=DTYPE)
    v = torch.randn(n, HKV, D, device="cuda", dtype=DTYPE)
    grad = torch.randn(n, HQ, D, device="cuda", dtype=DTYPE)
    scale = 1 / math.sqrt(D)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    bounds = cu.tolist()
    ref = reference(q64, k64, v64, (bounds[:-1], bounds[:-1]), (bounds[1:], bounds[1:]), True, None)
    ref.backward(grad.double())
    want = (ref.detach(), q64.grad, k64.grad, v64.grad)
    for t in (q, k, v):
        t.requires_grad_(False)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    times = {}
    for name, (fwd, bwd) in providers_docs(qr, kr, vr, ids, cu, longest, scale).items():
        try:
            out = fwd()
            grads = [reduce_heads(g, HKV) if i else g for i, g in enumerate(bwd(grad))]
        except Exception as exc:  # a backend that refuses the call: say why
            lines.append(f"| docs {documents} @ {n // 1024}k | {name} | failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:140]} | | | |")
            print(lines[-1], flush=True)
            continue
        errors = [err(out, want[0])] + [err(g, w) for g, w in zip(grads, want[1:])]
        ok = errors[0] < 2e-2 and max(errors[1:]) < 5e-2
        f_ms = timed(fwd)

        def step(fwd=fwd, bwd=bwd):
            fwd()
            bwd(grad)

        fb_ms = timed(step)
        times[name] = (f_ms, fb_ms)
        lines.append(f"| docs {documents} @ {n // 1024}k | {name} | {'ok' if ok else 'WRONG'} "
                     f"{max(errors):.1e} | {f_ms:.3f} | {fb_ms:.3f} | |")
        print(lines[-1], flush=True)
    base = times.get("triton_flash")
    if base:
        for name, (f_ms, fb_ms) in times.items():
            lines.append(f"| docs {documents} @ {n // 1024}k | {name} / triton_flash | | "
                         f"{f_ms / base[0]:.2f}x | {fb_ms / base[1]:.2f}x | |")
        print("\n".join(lines[-len(times):]), flush=True)


def run_window(n: int, batch: int, window: int, lines: list[str]) -> None:
    q = torch.randn(batch, n, HQ, D, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, n, HKV, D, device="cuda", dtype=DTYPE)
    v = torch.randn(batch, n, HKV, D, device="cuda", dtype=DTYPE)
    grad = torch.randn(batch, n, HQ, D, device="cuda", dtype=DTYPE)
    scale = 1 / math.sqrt(D)
    chunk = 1024
    starts = list(range(0, n, chunk))
    ends = [min(s + chunk, n) for s in starts]
    kstarts = [max(0, s - window + 1) for s in starts]
    want = reference(q[0].double(), k[0].double(), v[0].double(), (starts, kstarts), (ends, ends), True, window)
    qb, kb, vb = (t.transpose(1, 2).requires_grad_(True) for t in (q.clone(), k.clone(), v.clone()))
    gb = grad.transpose(1, 2)
    found = {}

    def ours():
        return attnopt.attention(qb, kb, vb, causal=True, window=(window - 1, 0), kernel="triton_flash")

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def window_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    bm = create_block_mask(window_mod, None, None, n, n)
    found["triton_flash"] = ours
    found["flex"] = lambda: flex(qb, kb, vb, block_mask=bm, enable_gqa=True)
    grads_of = {}
    for name, call in found.items():
        out = call()
        qb.grad = kb.grad = vb.grad = None
        out.backward(gb)
        grads_of[name] = (out.transpose(1, 2), qb.grad.clone(), kb.grad.clone(), vb.grad.clone())
    qf, kf, vf = (t.detach().clone().requires_grad_(False) for t in (q, k, v))
    state = {}

    def flash_fwd():
        res = torch.ops.aten._flash_attention_forward(qf, kf, vf, None, None, n, n, 0.0, True, False, scale=scale,
                                                      window_size_left=window - 1, window_size_right=0)
        state["res"] = res
        return res[0]

    def flash_bwd():
        res = state["res"]
        return torch.ops.aten._flash_attention_backward(
            grad, qf, kf, vf, res[0], res[1], None, None, n, n, 0.0, True, res[2], res[3], scale=scale,
            window_size_left=window - 1, window_size_right=0)

    times = {}
    try:
        out = flash_fwd()
        dq, dk, dv = flash_bwd()
        ref_grads = grads_of["triton_flash"]
        errors = [err(out[0], want), err(dq, ref_grads[1].transpose(1, 2)), err(dk, ref_grads[2].transpose(1, 2)),
                  err(dv, ref_grads[3].transpose(1, 2))]
        ok = errors[0] < 2e-2 and max(errors[1:]) < 5e-2
        times["flash window"] = (timed(flash_fwd), timed(lambda: (flash_fwd(), flash_bwd())))
        lines.append(f"| window {window} @ {n // 1024}k B{batch} | flash window | {'ok' if ok else 'WRONG'} "
                     f"{max(errors):.1e} | {times['flash window'][0]:.3f} | {times['flash window'][1]:.3f} | |")
        print(lines[-1], flush=True)
    except Exception as exc:
        lines.append(f"| window {window} @ {n // 1024}k | flash window | failed: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:140]} | | | |")
        print(lines[-1], flush=True)
    for name, call in found.items():
        e = err(grads_of[name][0][0], want)

        def step(call=call):
            out = call()
            out.backward(gb)

        times[name] = (timed(call), timed(step))
        lines.append(f"| window {window} @ {n // 1024}k B{batch} | {name} | {'ok' if e < 2e-2 else 'WRONG'} {e:.1e} "
                     f"| {times[name][0]:.3f} | {times[name][1]:.3f} | |")
        print(lines[-1], flush=True)
    base = times["triton_flash"]
    for name, (f_ms, fb_ms) in times.items():
        lines.append(f"| window {window} @ {n // 1024}k B{batch} | {name} / triton_flash | | "
                     f"{f_ms / base[0]:.2f}x | {fb_ms / base[1]:.2f}x | |")
    print("\n".join(lines[-len(times):]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", nargs="+", default=["docs", "window"])
    parser.add_argument("--documents", nargs="+", type=int, default=[4, 16, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"cuDNN {torch.backends.cudnn.version()}", "",
             "| case | provider | check (max rel. error) | fwd ms | fwd+bwd ms | |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    if "docs" in args.cases:
        for documents in args.documents:
            run_docs(16384, documents, lines)
    if "window" in args.cases:
        run_window(8192, 2, 1024, lines)
        run_window(32768, 1, 1024, lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
