"""``torch.ops.attnopt.attention``: the one op that rewritten graphs call.

It is a ``torch.library.custom_op`` so that torch.compile, torch.export and the
ONNX exporter see one opaque node with a fake (shape) implementation; its
backward is a second opaque op. Both dispatch to a named kernel from
``attnopt.kernels`` ("auto" asks the planner at run time).

The forward returns ``(out, lse, seed)``: the log-sum-exp and the dropout seed
are what a kernel's backward needs to recompute the probabilities.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnopt.kernels import registry
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window


def spec_from_args(
    q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left, window_right,
    softcap, dropout_p, fill,
) -> AttentionSpec:
    window = None if window_left is None and window_right is None else Window(window_left, window_right)
    return AttentionSpec.from_tensors(
        q, k, v, scale=scale, causal=causal, align=Align(align), window=window, key_padding=key_padding,
        q_doc=q_doc, kv_doc=kv_doc, bias=bias, mask=mask, softcap=softcap, dropout_p=dropout_p, fill=Fill(fill),
        requires_grad=False,
    )


def _kernel_for(spec: AttentionSpec, kernel: str):
    if kernel == "auto":
        from attnopt.passes.plan import choose

        kernel = choose(spec).kernel
    return registry.get(kernel)


@torch.library.custom_op("attnopt::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor,
    key_padding: Optional[Tensor], q_doc: Optional[Tensor], kv_doc: Optional[Tensor],
    bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, align: str, window_left: Optional[int], window_right: Optional[int],
    softcap: Optional[float], dropout_p: float, fill: str, kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = spec_from_args(
        q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left, window_right,
        softcap, dropout_p, fill,
    )
    seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    out, lse = _kernel_for(spec, kernel).forward(q, k, v, spec, int(seed))
    return out, lse, seed.to(q.device)


@attention.register_fake
def _attention_fake(q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                    window_right, softcap, dropout_p, fill, kernel):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    seed = q.new_empty((1,), dtype=torch.int64)
    return out, lse, seed


@torch.library.custom_op("attnopt::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
    key_padding: Optional[Tensor], q_doc: Optional[Tensor], kv_doc: Optional[Tensor],
    bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, align: str, window_left: Optional[int], window_right: Optional[int],
    softcap: Optional[float], dropout_p: float, fill: str, kernel: str,
    needs_bias_grad: bool, needs_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = spec_from_args(
        q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left, window_right,
        softcap, dropout_p, fill,
    )
    dq, dk, dv, dbias, dmask = _kernel_for(spec, kernel).backward(
        grad_out, q, k, v, out, lse, spec, int(seed.item()), needs_bias_grad, needs_mask_grad
    )
    return (
        dq, dk, dv,
        q.new_empty((0,)) if dbias is None else dbias,
        q.new_empty((0,)) if dmask is None else dmask,
    )


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, scale,
                             causal, align, window_left, window_right, softcap, dropout_p, fill, kernel,
                             needs_bias_grad, needs_mask_grad):
    dbias = torch.empty_like(bias) if needs_bias_grad else q.new_empty((0,))
    dmask = torch.empty_like(mask) if needs_mask_grad else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dmask


_TENSOR_INPUTS = 8  # q, k, v, key_padding, q_doc, kv_doc, bias, mask


def _setup_context(ctx, inputs, output):
    tensors, params = inputs[:_TENSOR_INPUTS], inputs[_TENSOR_INPUTS:]
    out, lse, seed = output
    ctx.save_for_backward(*tensors, out, lse, seed)
    ctx.params = params


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, key_padding, q_doc, kv_doc, bias, mask, out, lse, seed = ctx.saved_tensors
    needs_bias_grad = bias is not None and ctx.needs_input_grad[6]
    needs_mask_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[7]
    dq, dk, dv, dbias, dmask = torch.ops.attnopt.attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, *ctx.params,
        needs_bias_grad, needs_mask_grad,
    )
    return (
        dq, dk, dv, None, None, None,
        dbias if needs_bias_grad else None,
        dmask if needs_mask_grad else None,
        *([None] * len(ctx.params)),
    )


attention.register_autograd(_backward, setup_context=_setup_context)
