"""Tile configurations of the ``triton_flash`` kernels, one at a time, against cuDNN in the same run.

    python benchmarks/kernel_configs.py [--out benchmarks/results/kernel_configs.md]

The autotuners choose among a short list of configurations (``_fwd_configs``, ``_bwd_configs``); this
script times each candidate alone on the shapes of ``benchmarks/kernels.py`` (bf16, d_model 2048,
B*N = 16384) so the lists can be chosen from measurements. Forward: the forward kernel with one
configuration. Backward: preprocess + dK/dV kernel (atomic dQ) with one configuration, and the
deterministic dQ kernel with one configuration. Every configuration's output is first checked
against cuDNN's (forward) or autograd through SDPA (gradients).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import get
from attnopt.kernels.launch import forget as forget_tuning
from attnopt.kernels.spec import AttentionSpec
from attnopt.kernels.triton_flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from attnopt.kernels.triton_flash_fwd import _attn_fwd

FWD = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 4),
       (128, 128, 8, 2), (64, 128, 4, 3)]
DKDV = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 128, 4, 2),
        (128, 128, 8, 2), (16, 128, 4, 3)]
DQ = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2)]
CASES = [(128, 4096, True), (128, 4096, False), (64, 4096, True)]


def only(autotuned, shape):
    bm, bn, w, s = shape
    autotuned.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    autotuned.cache.clear()
    forget_tuning()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kernel = get("triton_flash")
    saved = {k: list(k.configs) for k in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)}
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16, "
             "milliseconds (median), one configuration (BLOCK_M, BLOCK_N, warps, stages) at a time", ""]
    for d, n, causal in CASES:
        torch.manual_seed(0)
        h, b = 2048 // d, 16384 // n
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dout = torch.randn_like(q)
        spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            cudnn_fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
            grads = torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True)
            cudnn_bwd = bench(lambda: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True))
        lines += [f"### D={d} N={n} B={b} H={h} causal={causal}: cuDNN forward {cudnn_fwd:.3f} ms, "
                  f"backward {cudnn_bwd:.3f} ms", "", "| kernel | config | ms | vs cuDNN | max err |",
                  "|---|---|---|---|---|"]
        out, lse = None, None
        for shape in FWD:
            only(_attn_fwd, shape)
            try:
                out, lse = kernel.forward(q, k, v, spec, 0)
                err = (out.float() - ref.float()).abs().max().item()
                ms = bench(lambda: kernel.forward(q, k, v, spec, 0))
                lines.append(f"| forward | {shape} | {ms:.3f} | {cudnn_fwd / ms:.2f} | {err:.1e} |")
            except Exception as exc:  # a configuration that does not fit this GPU
                lines.append(f"| forward | {shape} | {type(exc).__name__} | | |")
            print(lines[-1], flush=True)
        _attn_fwd.configs = saved[_attn_fwd]
        _attn_fwd.cache.clear()
        forget_tuning()
        out, lse = kernel.forward(q, k, v, spec, 0)
        for name, autotuned, shapes, det in (("dk/dv + atomic dQ", _attn_bwd_dkdv, DKDV, False),
                                             ("dQ (deterministic)", _attn_bwd_dq, DQ, True)):
            kernel.atomic_dq = not det
            for shape in shapes:
                only(autotuned, shape)
                try:
                    dq, dk, dv, _, _ = kernel.backward(dout, q, k, v, out, lse, spec, 0, False, False)
                    err = max((a.float() - r.float()).abs().max().item() for a, r in zip((dq, dk, dv), grads))
                    ms = bench(lambda: kernel.backward(dout, q, k, v, out, lse, spec, 0, False, False))
                    lines.append(f"| {name} | {shape} | {ms:.3f} | {cudnn_bwd / ms:.2f} | {err:.1e} |")
                except Exception as exc:
                    lines.append(f"| {name} | {shape} | {type(exc).__name__} | | |")
                print(lines[-1], flush=True)
            autotuned.configs = saved[autotuned]
            autotuned.cache.clear()
            forget_tuning()
        kernel.atomic_dq = False
        lines.append("")
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
