"""``torch.ops.attnopt.attention``: the one op that rewritten graphs call.

It is a ``torch.library.custom_op`` so that torch.compile, torch.export and the
ONNX exporter see one opaque node with a fake (shape) implementation; its
backward is a second opaque op. Both dispatch to a named kernel from
``attnopt.kernels`` ("auto" asks the planner at run time).

The forward returns ``(out, lse, seed)``: the log-sum-exp and the dropout seed
are what a kernel's backward needs to recompute the probabilities.

Every output is contiguous, in a dtype fixed by the inputs, whatever layout the
kernel chose: inductor checks the real outputs' strides against the fake
implementations' (``assert_size_stride``), and q/k/v are often strided views
(``qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)``).

With ``create_graph=True`` (gradient penalties, double backward) the backward is
computed by autograd through the oracle ``kernels.naive.naive_attention``, whose
gradient the kernels' backward equals, so that it can be differentiated again.

A graph run as Python (``compiler="eager"``) calls a ``SiteCall`` per site
instead: the op's static arguments and kernel resolved at rewrite time. Its
inference calls run the kernel directly on a call plan made once per call shape;
the others call the op, which stays what autograd, torch.compile, export and
the ONNX exporter see.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from attnopt.kernels import registry
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window, with_fields
from attnopt.kernels.term_cache import capturing


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


def op_args(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, kernel: str) -> tuple:
    """The op's 17 arguments for a call of ``spec`` (its terms and settings) on ``q``, ``k``, ``v``: the inverse
    of ``spec_from_args``."""
    window = spec.window
    return (q, k, v, spec.key_padding, spec.q_doc, spec.kv_doc, spec.bias, spec.mask, spec.scale, spec.causal,
            spec.align.value, None if window is None else window.left, None if window is None else window.right,
            spec.softcap, spec.dropout_p, spec.fill.value, kernel)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as the fake implementations describe it: contiguous, in ``dtype`` (no copy when it already is)."""
    return t.to(dtype).contiguous()


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no call at all when it already is (a training call would make six that do nothing)."""
    return t if t.dtype == dtype else t.to(dtype)


@contextlib.contextmanager
def _autograd_available():
    """Let a kernel's backward use autograd (SDPA and Performer recompute their forward under it).

    A custom op's implementation runs below the Autograd dispatch keys (torch excludes them for
    the op's duration), where ``torch.enable_grad()`` alone records nothing. This lifts that
    exclusion for the kernel call, as torch's own higher-order ops do around a nested autograd.
    """
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS):
        yield


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


#: whether any autocast is on: the common answer (no) without parsing a device string per call
_any_autocast = torch._C._is_any_autocast_enabled


def _without_autocast(device_type: str):
    """Kernels compute in their inputs' dtypes (float32 accumulation), never in an enclosing autocast's:
    under bfloat16 autocast a float32 finfo.min mask would be rounded to -inf inside the kernel."""
    if _any_autocast() and torch.is_autocast_enabled(device_type):
        return torch._C._DisableAutocast()  # a C++ guard: a torch.autocast object costs several times its host time
    return contextlib.nullcontext()


def _kernel_for(spec: AttentionSpec, kernel: str):
    if kernel == "auto":
        from attnopt.passes.plan import choose

        return registry.get(choose(spec).kernel)
    return named_kernel(spec, kernel)


def named_kernel(spec: AttentionSpec, name: str):
    """The kernel ``name``, refused with its reasons when it cannot compute ``spec``'s function (a dropout it
    does not apply, a mask it does not take): a named kernel never computes something else silently."""
    kernel = registry.get(name)
    reasons = kernel.not_supported_reasons(spec)
    if reasons:
        raise ValueError(f"kernel {name!r} cannot compute this attention call: {'; '.join(reasons)}. Name another "
                         "kernel, or pass kernel='auto' to let attnopt choose one that can")
    return kernel


def _context_parallel():
    """The entered ``attnopt.distributed.ContextParallel`` scope, or None (not imported: no scope)."""
    scope = sys.modules.get("attnopt.distributed.scope")
    return None if scope is None else scope.active()


def _attention_impl(
    q: Tensor, k: Tensor, v: Tensor,
    key_padding: Optional[Tensor], q_doc: Optional[Tensor], kv_doc: Optional[Tensor],
    bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, align: str, window_left: Optional[int], window_right: Optional[int],
    softcap: Optional[float], dropout_p: float, fill: str, kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    cp = _context_parallel()
    if cp is not None:  # the sequence is sharded over ranks: this rank's queries against every rank's keys
        return cp.op_forward(q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                             window_right, softcap, dropout_p, fill, kernel)
    terms = (key_padding, q_doc, kv_doc, bias, mask)
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device,
           tuple(_term_key(t) for t in terms),
           scale, causal, align, window_left, window_right, softcap, dropout_p, fill, kernel)
    plan = _OP_PLANS.get(key) if kernel != "auto" else None
    if plan is not None:
        template, chosen = plan
        return _run_forward(q, k, v, _with_terms(template, *terms), chosen)
    spec = spec_from_args(
        q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left, window_right,
        softcap, dropout_p, fill,
    )
    chosen = _kernel_for(spec, kernel)
    if kernel != "auto":
        if len(_OP_PLANS) >= _OP_PLANS_KEPT:
            _OP_PLANS.clear()
        _OP_PLANS[key] = (_with_terms(spec, None, None, None, None, None), chosen)
    return _run_forward(q, k, v, spec, chosen)


#: per call signature of the op (shapes, dtypes and devices of its tensors, its other arguments): the spec
#: without tensor terms and the named kernel, checked once (``named_kernel``); each call adds its own terms.
#: A compiled graph calls the op per layer and step, and building and checking a spec cost about a fifth of
#: the op's host time (``benchmarks/dispatch.py``'s op column). Dropped whole past ``_OP_PLANS_KEPT``
#: signatures (a decoder's cache grows by one key per step).
_OP_PLANS: dict[tuple, tuple] = {}
_OP_PLANS_KEPT = 256


def _run_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, kernel) -> tuple[Tensor, Tensor, Tensor]:
    """The op's outputs ``(out, lse, seed)`` from its spec and kernel object, contiguous, as the op's fake
    implementation describes them."""
    out, lse, seed, _ = _train_forward(q, k, v, spec, kernel, residual=False)
    # made on the device: a CUDA graph may capture this op, and capture forbids host-to-device copies
    seed_tensor = q.new_zeros((1,), dtype=torch.int64)
    if seed:
        seed_tensor.fill_(seed)
    return _dense(out, q.dtype), _dense(lse, _lse_dtype(q)), seed_tensor


def _train_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, kernel, residual: bool = True,
                   seed: int | None = None) -> tuple[Tensor, Tensor, int, object]:
    """The kernel's ``(out, lse)`` in the op's dtypes, the call's dropout seed as a host int and (``residual``)
    the kernel's residual for its ``train_backward``. A caller that keeps both beside the saved tensors
    (``_EagerAttention``) hands the backward the seed without a seed tensor and without reading one back from
    the device (a host sync per layer), and what the kernel found in the forward (its mask) without a second
    lookup. ``seed``: the call's, when its caller drew it."""
    seed = _draw_seed(spec.dropout_p) if seed is None else seed
    with _without_autocast(q.device.type):
        if residual:
            out, lse, kept = kernel.train_forward(q, k, v, spec, seed)
        else:
            (out, lse), kept = kernel.forward(q, k, v, spec, seed), None
    # the log-sum-exp goes to this kernel's own backward only: as the kernel made it (the CPU kernel's is a
    # transposed view, which a contiguous copy per call would cost host time for)
    return _cast(out, q.dtype), _cast(lse, _lse_dtype(q)), seed, kept


#: ``attnopt::attention``: the body above as an opaque op that autograd, tracers and exporters see
attention = torch.library.custom_op("attnopt::attention", mutates_args=())(_attention_impl)


def _draw_seed(dropout_p: float) -> int:
    """The dropout seed of one call, from torch's CPU generator (``torch.manual_seed`` reproduces it); 0 without
    dropout. With dropout under CUDA graph capture it would be frozen into every replay: refused."""
    if dropout_p == 0.0:
        return 0
    if capturing():
        raise RuntimeError(
            f"attention dropout (p={dropout_p}) cannot be captured in a CUDA graph: its seed is drawn on the host "
            "for every call, and a replay would repeat one dropout mask. Capture the model in eval mode (dropout "
            "off), or compile it without CUDA graphs (mode='default' or 'max-autotune-no-cudagraphs')"
        )
    return int(torch.randint(1, 1 << 62, (1,), dtype=torch.int64))


@attention.register_fake
def _attention_fake(q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left,
                    window_right, softcap, dropout_p, fill, kernel):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    seed = q.new_empty((1,), dtype=torch.int64)
    return out, lse, seed


def _attention_backward_impl(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
    key_padding: Optional[Tensor], q_doc: Optional[Tensor], kv_doc: Optional[Tensor],
    bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, align: str, window_left: Optional[int], window_right: Optional[int],
    softcap: Optional[float], dropout_p: float, fill: str, kernel: str,
    needs_bias_grad: bool, needs_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cp = _context_parallel()
    if cp is not None:
        return cp.op_backward(grad_out, q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, scale,
                              causal, align, window_left, window_right, softcap, dropout_p, fill, kernel,
                              needs_bias_grad, needs_mask_grad)
    spec = spec_from_args(
        q, k, v, key_padding, q_doc, kv_doc, bias, mask, scale, causal, align, window_left, window_right,
        softcap, dropout_p, fill,
    )
    return _run_backward(grad_out, q, k, v, out, lse, seed, spec, _kernel_for(spec, kernel), needs_bias_grad,
                         needs_mask_grad)


def _run_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
                  spec: AttentionSpec, kernel, needs_bias_grad: bool, needs_mask_grad: bool):
    """The backward op's outputs ``(dq, dk, dv, dbias, dmask)`` from the call's spec and kernel object, as its
    fake implementation describes them (contiguous; an empty tensor for a gradient not asked for). ``seed``:
    the forward's seed tensor (read only with dropout)."""
    bias, mask = spec.bias, spec.mask
    seed = int(seed.item()) if spec.dropout_p > 0.0 else 0
    with _autograd_available(), _without_autocast(q.device.type):
        dq, dk, dv, dbias, dmask = kernel.backward(
            grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad
        )
    return (
        _dense(dq, q.dtype), _dense(dk, k.dtype), _dense(dv, v.dtype),
        q.new_empty((0,)) if dbias is None else _dense(dbias, bias.dtype),
        q.new_empty((0,)) if dmask is None else _dense(dmask, mask.dtype),
    )


#: ``attnopt::attention_backward``: the body above as an opaque op (what a traced backward records)
attention_backward = torch.library.custom_op("attnopt::attention_backward", mutates_args=())(
    _attention_backward_impl)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, seed, key_padding, q_doc, kv_doc, bias, mask, scale,
                             causal, align, window_left, window_right, softcap, dropout_p, fill, kernel,
                             needs_bias_grad, needs_mask_grad):
    dbias = bias.new_empty(bias.shape) if needs_bias_grad else q.new_empty((0,))
    dmask = mask.new_empty(mask.shape) if needs_mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dmask


_TENSOR_INPUTS = 8  # q, k, v, key_padding, q_doc, kv_doc, bias, mask


def _setup_context(ctx, inputs, output):
    tensors, params = inputs[:_TENSOR_INPUTS], inputs[_TENSOR_INPUTS:]
    out, lse, seed = output
    ctx.save_for_backward(*tensors, out, lse, seed)
    ctx.params = params


def _backward(ctx, grad_out, _grad_lse, _grad_seed, needs_input_grad=None, seed=None):
    """The op's gradients. ``needs_input_grad``: the op's inputs' flags when ``ctx`` is not the op's;
    ``seed``: the seed tensor when ``ctx`` saved none."""
    q, k, v, key_padding, q_doc, kv_doc, bias, mask, out, lse, saved_seed = _saved(ctx)
    seed = saved_seed if seed is None else seed
    needs_input_grad = ctx.needs_input_grad if needs_input_grad is None else needs_input_grad
    needs_bias_grad = bias is not None and needs_input_grad[6]
    needs_mask_grad = mask is not None and mask.is_floating_point() and needs_input_grad[7]
    if torch.is_grad_enabled():  # the engine enables grad mode in a backward iff create_graph=True
        dq, dk, dv, dbias, dmask = _differentiable_grads(ctx, grad_out, needs_bias_grad, needs_mask_grad)
    else:
        # the op takes its output's gradient contiguous, as its fake implementation says
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


def _saved(ctx) -> tuple:
    """``ctx.saved_tensors``, with ``_EagerAttention``'s output in its place: as its forward made it, or made
    again where the model has written it in place since (the same kernel on the same inputs and dropout seed)."""
    saved = ctx.saved_tensors
    out = getattr(ctx, "out", None)
    if out is None:
        return saved
    if out._version != ctx.out_version:
        q, k, v = saved[:3]
        with torch.no_grad():
            out = _train_forward(q, k, v, ctx.spec, ctx.kernel, residual=False, seed=ctx.seed)[0]
    return (*saved[:8], out, *saved[9:])


def _differentiable_grads(ctx, grad_out, needs_bias_grad: bool, needs_mask_grad: bool):
    """``(dq, dk, dv, dbias, dmask)`` as differentiable functions of q, k, v, the terms and grad_out.

    For ``create_graph=True`` (gradient penalties, double backward). The kernels' backward is the
    vector-Jacobian product of the oracle ``naive_attention`` (tests/kernels check it against
    autograd through the oracle, fills included), so autograd through the oracle gives the same
    first derivatives and exact higher ones. Like an eager double backward it materializes the
    ``[B, H, Nq, Nk]`` scores, here in float64.
    """
    if _context_parallel() is not None:
        raise NotImplementedError(
            "double backward (create_graph=True) of context-parallel attention is not supported yet: compute "
            "gradient penalties outside the ContextParallel scope")
    q, k, v, key_padding, q_doc, kv_doc, bias, mask, _out, _lse, _seed = ctx.saved_tensors
    *spec_params, kernel = ctx.params
    spec = spec_from_args(q, k, v, key_padding, q_doc, kv_doc, bias, mask, *spec_params)
    function = _differentiable(spec, kernel)
    # one view per argument keeps the way back to the saved tensor for the next derivative, and keeps
    # q and k apart when they are the same tensor (self-attention on x, x, x)
    q_, k_, v_ = (t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True) for t in (q, k, v))
    bias_ = bias.view_as(bias) if needs_bias_grad else bias
    mask_ = mask.view_as(mask) if needs_mask_grad else mask
    out = function(q_, k_, v_, spec.with_(bias=bias_, mask=mask_))
    wrt = [q_, k_, v_] + [bias_] * needs_bias_grad + [mask_] * needs_mask_grad
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype), create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    dq, dk, dv, *terms = grads
    dbias = terms.pop(0) if needs_bias_grad else None
    dmask = terms.pop(0) if needs_mask_grad else None
    return dq, dk, dv, dbias, dmask


def _differentiable(spec: AttentionSpec, kernel: str):
    """The differentiable function whose vector-Jacobian product ``kernel``'s backward computes."""
    if spec.dropout_p > 0.0:
        raise NotImplementedError(
            f"double backward (create_graph=True) through attention with dropout (p={spec.dropout_p}) is not "
            "supported yet: the kernel's dropout mask cannot be regenerated through differentiable ops. Compute "
            "gradient penalties with dropout off (model.eval(), or dropout p=0)"
        )
    if kernel == "auto":  # the run-time choice is an exact kernel (choose's default): no need to plan it again
        return naive_attention
    chosen = registry.get(kernel)
    if chosen.exact:
        return naive_attention
    attend = getattr(chosen, "attend", None)  # approximate kernels with a differentiable forward
    if attend is None:
        raise NotImplementedError(
            f"double backward (create_graph=True) through the approximate kernel {chosen.name!r} is not supported "
            "yet: it has no differentiable forward. Optimize with exact=True for gradient penalties"
        )
    return attend


attention.register_autograd(_backward, setup_context=_setup_context)


_is_compiling = torch.compiler.is_compiling  # the function dynamo folds to True while it traces
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]) -> bool:
    """Whether a call may skip the op's dispatch: plain tensors, nothing tracing it (dynamo, a dispatch mode
    such as fake tensors, functorch transforms), no context-parallel scope."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return False
    if (bias is not None and type(bias) is not Tensor) or (mask is not None and type(mask) is not Tensor):
        return False
    return (not _is_compiling() and _get_dispatch_mode() is None and not _functorch_wrapped(q)
            and _context_parallel() is None)


def _wants_grad(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or bias is not None and bias.requires_grad
                                        or mask is not None and mask.requires_grad)


#: devices whose training calls take ``_EagerAttention``: CUDA joins once the GPU tests have run this path
#: (tests/passes/test_training_steps.py, tests/attnopt and tests/passes/test_gpu_masks.py with -m gpu)
EAGER_TRAINING_DEVICES = ("cpu", "cuda")


class _EagerAttention(torch.autograd.Function):
    """``attnopt::attention`` with its registered autograd, for a plain call under autograd in a graph run
    as Python: the same body (``_attention_impl``), the same ``_setup_context`` and ``_backward``, without
    the custom ops' dispatch and argument binding per call (about 110 us of host time per training call
    on a CPU, ``benchmarks/dispatch.py``). Only the tensors a gradient can flow to are the function's
    inputs (``apply`` handles each input per call); the rest of the op's arguments come as one tuple."""

    @staticmethod
    def forward(ctx, call: tuple, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]):
        """``call``: ``(spec, kernel, key_padding, q_doc, kv_doc, params, seed)``, with ``spec`` the one
        ``spec_from_args`` makes of the op's arguments (the site's call plan's), ``kernel`` the kernel object,
        ``params`` the op's arguments after its tensors and ``seed`` the call's dropout seed. Returns the output
        only: the log-sum-exp is saved, and the seed kept as the host int it was drawn as (no seed tensor, no
        gradients to materialize for outputs nothing differentiates)."""
        spec, kernel, key_padding, q_doc, kv_doc, params, seed = call
        out, lse, seed, residual = _train_forward(q, k, v, spec, kernel, seed=seed)  # traced by nothing: no fake
        # the output is kept beside the saved tensors, not among them: the original's ``softmax(s) @ v`` saves
        # p and v, so a model may write the attention's output in place (``o += x``) and still differentiate.
        # The backward then makes it again (``_saved``); a detached alias shares its version counter
        _setup_context(ctx, (q, k, v, key_padding, q_doc, kv_doc, bias, mask, *params), (None, lse, None))
        ctx.spec, ctx.kernel, ctx.seed, ctx.residual = spec, kernel, seed, residual
        ctx.out, ctx.out_version = out.detach(), out._version
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, wants_q, wants_k, wants_v, wants_bias, wants_mask = ctx.needs_input_grad
        if torch.is_grad_enabled() or _is_compiling() or _get_dispatch_mode() is not None or type(grad_out) is not Tensor:
            # a double backward (create_graph=True), a backward traced (compiled autograd) or under a dispatch
            # mode: the op's backward, which takes the seed as a tensor
            flags = (wants_q, wants_k, wants_v, False, False, False, wants_bias, wants_mask)
            seed = torch.full((1,), ctx.seed, dtype=torch.int64, device=grad_out.device)
            dq, dk, dv, _, _, _, dbias, dmask = _backward(ctx, grad_out, None, None, flags, seed)[:8]
            return None, dq, dk, dv, dbias, dmask
        # the kernel's backward directly: its gradients as it made them (SDPA's laid out like q, k and v, so the
        # backward of an HF layer's transpose and view copies nothing), the seed as the forward drew it and the
        # forward's residual
        q, k, v, _, _, _, bias, mask, out, lse, _ = _saved(ctx)
        needs_bias_grad = bias is not None and wants_bias
        needs_mask_grad = mask is not None and mask.is_floating_point() and wants_mask
        with _without_autocast(q.device.type):
            dq, dk, dv, dbias, dmask = ctx.kernel.train_backward(
                ctx.residual, grad_out, q, k, v, out, lse, ctx.spec, ctx.seed, needs_bias_grad, needs_mask_grad)
        return (None, _cast(dq, q.dtype), _cast(dk, k.dtype), _cast(dv, v.dtype),
                _cast(dbias, bias.dtype) if needs_bias_grad else None,
                _cast(dmask, mask.dtype) if needs_mask_grad else None)


def _eager_training(spec: AttentionSpec, kernel, args: tuple) -> Tensor:
    """The op's output for ``args`` (its 17 arguments) through ``_EagerAttention``: what a plain call under
    autograd runs in a graph run as Python, and ``attnopt.attention`` on plain tensors."""
    q, k, v, key_padding, q_doc, kv_doc, bias, mask = args[:_TENSOR_INPUTS]
    seed = _draw_seed(spec.dropout_p)
    if seed:
        # with dropout there is no double backward either way (``_differentiable_grads``): torch's own autograd
        # where the kernel's call has one, a backward of C++ nodes only
        with _without_autocast(q.device.type):
            out = kernel.autograd_forward(q, k, v, spec, seed)
        if out is not None:
            return out
    call = (spec, kernel, key_padding, q_doc, kv_doc, args[_TENSOR_INPUTS:], seed)
    return _EagerAttention.apply(call, q, k, v, bias, mask)


def _with_terms(template: AttentionSpec, key_padding, q_doc, kv_doc, bias, mask) -> AttentionSpec:
    """``template`` (a spec without tensor terms) with this call's terms, copied field by field: no
    dataclass construction, no validation per call (the call plan validated the terms of its first call)."""
    return with_fields(template, key_padding=key_padding, q_doc=q_doc, kv_doc=kv_doc, bias=bias, mask=mask)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _with_shapes(template: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> AttentionSpec:
    """``template`` with the shapes, dtype and device of q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]`` and
    v ``[B, Hkv, Nk, Dv]``, as ``AttentionSpec.from_tensors`` reads them, copied field by field: a call
    plan for a new shape (every call of a decoder whose cache grows) costs no dataclass construction."""
    spec = object.__new__(AttentionSpec)
    fields = spec.__dict__
    fields.update(template.__dict__)
    fields["batch"], fields["q_heads"], fields["q_len"], fields["head_dim"] = q.shape
    fields["kv_heads"], fields["kv_len"], fields["v_head_dim"] = k.shape[1], k.shape[2], v.shape[3]
    fields["dtype"], fields["device"] = q.dtype, q.device
    return spec


def _check_static(kernel: str, scale, causal, align: str, window_left, window_right, softcap, fill: str) -> None:
    """What ``spec_from_args`` would refuse in a site's static arguments, refused once when the call is built."""
    if not isinstance(kernel, str):
        raise TypeError(f"kernel={kernel!r} must be a registered kernel's name (a str), or 'auto'")
    if not _number(scale) or not isinstance(causal, bool):
        raise TypeError(f"scale={scale!r} must be a number and causal={causal!r} a bool")
    if align not in {a.value for a in Align}:
        raise ValueError(f"align={align!r} is not allowed: use one of {', '.join(a.value for a in Align)}")
    if fill not in {f.value for f in Fill}:
        raise ValueError(f"fill={fill!r} is not allowed: use one of {', '.join(f.value for f in Fill)}")
    if softcap is not None and not (_number(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be a positive number, or None for no cap")
    Window(window_left, window_right)  # refuses negative or non-int bounds with their names


def _term_key(term: Optional[Tensor]) -> Optional[tuple]:
    """What of a term a call plan is made for: its shape, dtype and device (None when absent)."""
    return None if term is None else (term.shape, term.dtype, term.device)


class SiteCall:
    """One replaced site's call, resolved when the graph is rewritten: what a graph run as Python
    (``compiler="eager"``) calls in place of ``attnopt::attention``.

    It holds the op's non-tensor arguments, checked once, and the kernel object, looked up once.
    Calling it with the site's tensors and dropout probability (a graph may read that at run time)
    returns ``(out,)``, the op's first output: the graph reads nothing else.

    An inference call (no gradient asked, no dropout, plain tensors, nothing tracing) runs the kernel
    directly: per call shape, a spec template (without tensor terms) is made and checked, and the
    kernel prepares its call (``Kernel.prepare``) once; each call then only adds its tensor terms to
    the template, when it has any. No op dispatch, no autograd wrapper, no contiguous copies or
    log-sum-exp that nothing reads, no spec construction, no lookup. A plain call under autograd
    (training) on a device of ``EAGER_TRAINING_DEVICES`` runs the op's body and its registered autograd
    as an ``autograd.Function`` (``_EagerAttention``), without the op's dispatch. Anything else (dynamo or export tracing, fake
    tensors, functorch transforms, tensor subclasses, a context-parallel scope, kernel ``"auto"``)
    calls ``attnopt::attention`` with the same arguments, so that tracers and exporters see the op.
    """

    #: the name of the call in the graph's generated code
    __name__ = "attention"
    #: call plans kept per site: a model whose key length grows every call (decoding with a growing
    #: cache) makes one per call, so the oldest are dropped together past this count
    MAX_SHAPES = 64

    def __init__(self, kernel: str, scale: float, causal: bool, align: str, window_left: Optional[int],
                 window_right: Optional[int], softcap: Optional[float], fill: str, rechoice=None):
        _check_static(kernel, scale, causal, align, window_left, window_right, softcap, fill)
        self.kernel_name = kernel
        #: None for "auto": the planner chooses per call, in the op
        self.kernel = None if kernel == "auto" else registry.get(kernel)
        #: ``passes.plan.Rechoice`` of a graph with a symbolic batch size or lengths: the kernel of each other
        #: shape bucket, chosen on its first call; None: ``kernel`` for every call
        self.rechoice = None if kernel == "auto" else rechoice
        #: (batch, q_len, kv_len buckets, training, dropout) -> (kernel, its name), for ``rechoice``
        self._bucket_kernels: dict[tuple, tuple] = {}
        self.static = (float(scale), causal, align, window_left, window_right,
                       None if softcap is None else float(softcap))
        self.fill = fill
        #: (shapes, dtype, device, which terms are absent) -> (spec template, prepared call, no terms)
        self._plans: dict[tuple, tuple] = {}
        #: the spec template of the first call, made by ``spec_from_args``; the others are copies of it
        self._first: AttentionSpec | None = None
        #: kernel name -> (kernel, call plans, bucket choices) of the kernels run before, kept by ``use``
        self._kept: dict[str, tuple] = {}
        #: calls so far (``passes.trial`` tells by it whether a call of the model ran this site)
        self.calls = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor], q_doc: Optional[Tensor],
                 kv_doc: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
                 dropout_p: float = 0.0) -> tuple[Tensor]:
        self.calls += 1
        plain = self.kernel is not None and _plain(q, k, v, bias, mask)
        training = plain and _wants_grad(q, k, v, bias, mask)
        if training and q.device.type in EAGER_TRAINING_DEVICES and 0.0 <= dropout_p < 1.0:
            # training in a graph run as Python
            spec = self._spec(q, k, v, key_padding, q_doc, kv_doc, bias, mask, prepared=False)[0]
            if dropout_p != 0.0:
                spec = with_fields(spec, dropout_p=float(dropout_p))
            kernel, name = self._kernel(spec, True)
            return (_eager_training(spec, kernel, (q, k, v, key_padding, q_doc, kv_doc, bias, mask, *self.static,
                                                   dropout_p, self.fill, name)),)
        if dropout_p != 0.0 or not plain or training:
            name = self.kernel_name
            if self.rechoice is not None and plain and 0.0 <= dropout_p < 1.0:
                spec = self._spec(q, k, v, key_padding, q_doc, kv_doc, bias, mask, prepared=False)[0]
                if dropout_p != 0.0:
                    spec = with_fields(spec, dropout_p=float(dropout_p))
                name = self._kernel(spec, training)[1]
            return (torch.ops.attnopt.attention.default(
                q, k, v, key_padding, q_doc, kv_doc, bias, mask, *self.static, dropout_p, self.fill, name,
            )[0],)
        spec, run = self._spec(q, k, v, key_padding, q_doc, kv_doc, bias, mask)
        if _any_autocast() and torch.is_autocast_enabled(q.device.type):
            with torch._C._DisableAutocast():
                return (run(q, k, v, spec),)
        return (run(q, k, v, spec),)

    def switch(self, kernel: str) -> None:
        """Run ``kernel`` from the next call on (a timing made after the rewrite chose it): the call plans
        prepared for the other kernels, and the shape buckets' choices made from them, are dropped. Between two
        calls only: a call's backward runs the kernel its forward ran (``_EagerAttention`` keeps the object, the
        op its name)."""
        self.use(kernel)
        self._kept.clear()

    def use(self, kernel: str) -> None:
        """Run ``kernel`` from the next call on, keeping the call plans of the kernel run until now, so that
        switching back costs a dictionary lookup (``passes.trial`` alternates a site's finalists over a model's calls).
        Between two calls only, as ``switch``."""
        if kernel == self.kernel_name:
            return
        kept = self._kept.pop(kernel, None)
        if kept is None:
            _check_static(kernel, *self.static, self.fill)
            kept = (registry.get(kernel), {}, {})
        self._kept[self.kernel_name] = (self.kernel, self._plans, self._bucket_kernels)
        self.kernel, self._plans, self._bucket_kernels = kept
        self.kernel_name = kernel

    def _spec(self, q, k, v, key_padding, q_doc, kv_doc, bias, mask, prepared: bool = True) -> tuple:
        """``(spec, prepared call)`` of this call from its call plan (made on the first call like it): the
        spec ``spec_from_args`` would make, without dropout. ``prepared=False`` (a training call, or one through
        the op): the prepared call may be None, since choosing the inference kernel of a new shape bucket times
        the inference candidates, which such a call does not run."""
        # each term's shape and dtype, not only whether it is present: what a kernel prepares may depend on them
        # (a mask with a head dim keeps query heads unpacked; an additive mask takes another kernel path)
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, _term_key(key_padding), _term_key(q_doc),
               _term_key(kv_doc), _term_key(bias), _term_key(mask))
        plan = self._plans.get(key)
        if plan is None or (prepared and plan[1] is None):
            plan = self._plan(key, plan, prepared, q, k, v, key_padding, q_doc, kv_doc, bias, mask)
        spec, run, bare = plan
        return (spec if bare else _with_terms(spec, key_padding, q_doc, kv_doc, bias, mask)), run

    def _plan(self, key: tuple, unprepared: Optional[tuple], prepared: bool, q, k, v, key_padding, q_doc, kv_doc,
              bias, mask) -> tuple:
        """The call plan for calls like this one: its spec without tensor terms (no tensor of this call
        kept), the kernel's prepared call (None until an inference call needs it, with ``prepared=False``),
        and whether there are no terms to add per call. ``unprepared``: this key's plan made without its
        prepared call."""
        if unprepared is not None:
            template, _, bare = unprepared
        else:
            if self._first is None:
                template = self._first = spec_from_args(q, k, v, None, None, None, None, None, *self.static, 0.0,
                                                        self.fill)
            else:
                template = _with_shapes(self._first, q, k, v)
            bare = all(term is None for term in key[5:])
        spec = template if bare else _with_terms(template, key_padding, q_doc, kv_doc, bias, mask)
        if unprepared is None:
            spec.validate()
        plan = (template, None, bare)
        if prepared:
            kernel = self._kernel(spec, False)[0]
            plan = (template, kernel.prepare(spec), bare)
            if self.rechoice is not None and capturing() and kernel is not self._bucket_kernels.get(
                    self._bucket_key(spec, False), (None,))[0]:
                return plan  # a capture's stand-in for a bucket not chosen yet: not this shape's plan
        if unprepared is None and len(self._plans) >= self.MAX_SHAPES:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _bucket_key(self, spec: AttentionSpec, training: bool) -> tuple:
        return self.rechoice.bucket(spec.batch, spec.q_len, spec.kv_len), training, spec.dropout_p != 0.0

    def _kernel(self, spec: AttentionSpec, training: bool) -> tuple:
        """(kernel, name) for calls like ``spec``: the planned one, or with ``rechoice`` the one chosen for the
        call's shape bucket (training calls and calls with dropout on their own: they time another path)."""
        if self.rechoice is None:
            return self.kernel, self.kernel_name
        key = self._bucket_key(spec, training)
        found = self._bucket_kernels.get(key)
        if found is None:
            if spec.requires_grad != training:  # the template is the first call's, which may not have been a training one
                spec = with_fields(spec, requires_grad=training)
            name = self.rechoice.kernel(spec, self.kernel_name)
            found = (registry.get(name), name)
            if not capturing():  # a capture's stand-in is not the bucket's measured choice
                self._bucket_kernels[key] = found
        return found

    def __repr__(self) -> str:
        scale, causal, align, left, right, softcap = self.static
        banded = causal or left is not None or right is not None
        terms = [f"scale={scale:g}", "causal" if causal else "", align if banded else "",
                 "" if left is None and right is None else f"window=({left}, {right})",
                 "" if softcap is None else f"softcap={softcap:g}", f"fill={self.fill}"]
        return f"<attention on {self.kernel_name}: {' '.join(t for t in terms if t)}>"
