"""Whether SDPA's own cuDNN backward gives the right gradients, per layout of the output's gradient.

The queries, keys and values are ``[B, H, N, D]`` views of ``[B, N, H, D]`` tensors, as a Hugging Face layer
hands them over. For each case (dropout or not, a key padding mask or none) the script runs SDPA pinned to cuDNN
under autograd and differentiates it with the output's gradient contiguous and in the queries' layout (what the
backward of an HF layer's ``transpose(1, 2)`` hands back):

* without dropout: the largest error of dQ, dK, dV against float64 SDPA, relative to the largest gradient;
* with dropout: the error of ``sum(out * dO) = sum(v * dV)`` per batch row and head, which holds exactly when the
  backward dropped out what the forward did (the output is linear in v).

Rows: SDPA's own call; the same call with its output made contiguous and seen through ``as_strided`` (whose
backward hands the call a contiguous gradient); and attnopt's ``sdpa_cudnn`` training call
(``SDPAKernel.autograd_forward``). bf16 rounding is about 0.005.

    python benchmarks/sdpa_cudnn_grad_layouts.py [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpa_dropout_layouts import SHAPE, cell, emit, hf_inputs  # run as a script: benchmarks/ is on the path


def own(q, k, v, mask, p):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def contiguous_view(q, k, v, mask, p):
    out = own(q, k, v, mask, p).contiguous()
    return out.as_strided(out.shape, out.stride(), out.storage_offset())


def attnopt_call(q, k, v, keep, p):
    from attnopt.kernels import AttentionSpec, Fill, get

    padding = None if keep is None else keep[:, 0, 0, :]
    spec = AttentionSpec.from_tensors(q.detach(), k.detach(), v.detach(), key_padding=padding, dropout_p=p,
                                      fill=Fill.FINITE_ADDED, requires_grad=True)
    out = get("sdpa_cudnn").autograd_forward(q, k, v, spec, 7)
    if out is None:
        raise RuntimeError("sdpa_cudnn has no autograd call for this case")
    return out


def dropout_error(call, q, k, v, grad) -> float:
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.cuda.manual_seed(7)
    out = call(*leaves)
    dv = torch.autograd.grad(out, leaves[2], grad)[0]
    lhs = (out.float() * grad.float()).sum((-1, -2))
    rhs = (v.float() * dv.float()).sum((-1, -2))
    return ((lhs - rhs).abs().max() / lhs.abs().max()).item()


def reference_grads(q, k, v, mask, grad):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, attn_mask=None if mask is None else mask.double())
    return torch.autograd.grad(ref, leaves, grad.double())


def grad_error(call, q, k, v, grad, want) -> float:
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    got = torch.autograd.grad(call(*leaves), leaves, grad)
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    b, n, h, d = SHAPE
    q, k, v, layouts = hf_inputs()
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
    keep[1, ..., 2 * n // 3:] = False
    additive = torch.zeros(b, 1, n, n, device="cuda", dtype=torch.bfloat16).masked_fill(~keep, float("-inf"))
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B {b}, {h} heads, N {n}, D {d}, bf16, "
             "q/k/v in the layout of [B, N, H, D]; without dropout the largest error of dQ/dK/dV against float64 "
             "SDPA, with dropout (p 0.3) the error of sum(out * dO) = sum(v * dV); both relative (bf16 rounding "
             "is about 0.005)", "",
             "| call | dropout | mask | dO contiguous | dO in the queries' layout |", "|---|---|---|---|---|"]
    for p in (0.0, 0.3):
        for mask_name, (mask, kept) in {"none": (None, None), "key padding": (additive, keep)}.items():
            calls = {"SDPA's own cuDNN": lambda q, k, v: own(q, k, v, mask, p),
                     "contiguous output through as_strided": lambda q, k, v: contiguous_view(q, k, v, mask, p),
                     "attnopt sdpa_cudnn training call": lambda q, k, v: attnopt_call(q, k, v, kept, p)}
            for name, call in calls.items():
                if p > 0.0:
                    cells = [cell(lambda: dropout_error(call, q, k, v, grad)) for grad in layouts.values()]
                else:
                    cells = [cell(lambda: grad_error(call, q, k, v, grad, reference_grads(q, k, v, mask, grad)))
                             for grad in layouts.values()]
                lines.append(f"| {name} | {p} | {mask_name} | {cells[0]} | {cells[1]} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
