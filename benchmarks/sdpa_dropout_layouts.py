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


#: B, N, H, D of the measured call
SHAPE = (2, 192, 4, 64)


def hf_inputs():
    """``(q, k, v, {layout: output gradient})``: bf16 ``[B, H, N, D]`` views of ``[B, N, H, D]`` tensors, as an HF
    layer hands them over, and one output gradient contiguous and in the queries' layout."""
    b, n, h, d = SHAPE
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(3))
    grad = torch.randn(b, h, n, d, generator=g).to("cuda", torch.bfloat16)
    return q, k, v, {"contiguous": grad, "queries' layout": grad.transpose(1, 2).contiguous().transpose(1, 2)}


def cell(measure) -> str:
    """``measure()``'s error to 4 places, or the refusal of a backend that refuses the call on this build."""
    try:
        return f"{measure():.4f}"
    except RuntimeError as err:
        return f"refused: {str(err).splitlines()[0][:60]}"


def emit(lines: list[str], out: pathlib.Path | None) -> None:
    print("\n".join(lines))
    if out:
        out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--p", type=float, default=0.3)
    args = parser.parse_args()
    b, n, h, d = SHAPE
    q, k, v, layouts = hf_inputs()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B {b}, {h} heads, N {n}, D {d}, bf16, "
             f"dropout {args.p}; relative error of sum(out * dO) = sum(v * dV) (bf16 rounding is about 0.005)", "",
             "| backend | dO contiguous | dO in the queries' layout |", "|---|---|---|"]
    for name, backend in BACKENDS.items():
        errors = [cell(lambda: identity_error(backend, q, k, v, grad, args.p, seed=1234)) for grad in layouts.values()]
        lines.append(f"| {name} | {errors[0]} | {errors[1]} |")
    for name in ("sdpa_cudnn", "sdpa_flash"):
        errors = [cell(lambda: pair_identity_error(name, q, k, v, grad, args.p, seed=1234)) for grad in layouts.values()]
        lines.append(f"| attnopt {name} (saved forward) | {errors[0]} | {errors[1]} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
