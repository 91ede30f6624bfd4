"""Whether SDPA's own backends drop out the same weights in the backward as in the forward, per layout of the
output's gradient.

The output of attention is linear in v: ``out = P v`` with ``P`` the dropped-out softmax. So for any output
gradient ``dO``, ``sum(out * dO) = sum(v * dV)`` per batch row and head, exactly (up to rounding) when the backward
used the forward's dropout mask, and off by about the sums' own size when it did not. This script measures that
identity for each CUDA backend of ``F.scaled_dot_product_attention`` with dropout, under autograd, with ``dO``
contiguous and with ``dO`` in the queries' layout (``[B, N, H, D]`` memory seen as ``[B, H, N, D]``: what an HF
layer's ``transpose(1, 2)`` hands back). attnopt's ``sdpa_cudnn`` refuses dropout while cuDNN fails it.

The ``attnopt ... (saved forward)`` rows measure the same identity for attnopt's own forward and backward pair
on cuDNN and flash (``kernels/sdpa.py``: ATen's forward under the call's seed, ATen's backward from its saved
output, log-sum-exp and random state, the gradient put in the output's layout), called directly, past
``sdpa_cudnn``'s refusal: the evidence on which that refusal could be lifted for the pair alone.

    python benchmarks/sdpa_dropout_layouts.py [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def identity_error(backend: SDPBackend, q, k, v, grad, p: float, seed: int) -> float:
    """``max |sum(out * dO) - sum(v * dV)|`` over batch rows and heads, relative to the largest ``sum(out * dO)``."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.cuda.manual_seed(seed)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(*leaves, dropout_p=p)
    dv = torch.autograd.grad(out, leaves[2], grad)[0]
    lhs = (out.float() * grad.float()).sum((-1, -2))
    rhs = (v.float() * dv.float()).sum((-1, -2))
    return ((lhs - rhs).abs().max() / lhs.abs().max()).item()


def pair_identity_error(name: str, q, k, v, grad, p: float, seed: int) -> float:
    """The same identity for attnopt's saved-forward pair of kernel ``name``, called directly."""
    from attnopt.kernels import AttentionSpec, get

    kernel = get(name)
    spec = AttentionSpec.from_tensors(q, k, v, dropout_p=p, requires_grad=True)
    if not kernel._saves_lse(spec):
        raise RuntimeError(f"{name} does not take the saved-forward pair for this call")
    out, lse = kernel.forward(q, k, v, spec, seed)
    dv = kernel.backward(grad, q, k, v, out, lse, spec, seed, False, False)[2]
    lhs = (out.float() * grad.float()).sum((-1, -2))
    rhs = (v.float() * dv.float()).sum((-1, -2))
    return ((lhs - rhs).abs().max() / lhs.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--p", type=float, default=0.3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 192, 4, 64
    q, k, v = (torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(3))
    grad = torch.randn(b, h, n, d, generator=g).to("cuda", torch.bfloat16)
    layouts = {"contiguous": grad, "queries' layout": grad.transpose(1, 2).contiguous().transpose(1, 2)}
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B {b}, {h} heads, N {n}, D {d}, bf16, "
             f"dropout {args.p}; relative error of sum(out * dO) = sum(v * dV) (bf16 rounding is about 0.005)", "",
             "| backend | dO contiguous | dO in the queries' layout |", "|---|---|---|"]
    for name, backend in BACKENDS.items():
        errors = []
        for grad_in_layout in layouts.values():
            try:
                errors.append(f"{identity_error(backend, q, k, v, grad_in_layout, args.p, seed=1234):.4f}")
            except RuntimeError as err:  # this backend refuses the call on this build
                errors.append(f"refused: {str(err).splitlines()[0][:60]}")
        lines.append(f"| {name} | {errors[0]} | {errors[1]} |")
    for name in ("sdpa_cudnn", "sdpa_flash"):
        errors = []
        for grad_in_layout in layouts.values():
            try:
                errors.append(f"{pair_identity_error(name, q, k, v, grad_in_layout, args.p, seed=1234):.4f}")
            except RuntimeError as err:
                errors.append(f"refused: {str(err).splitlines()[0][:60]}")
        lines.append(f"| attnopt {name} (saved forward) | {errors[0]} | {errors[1]} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
