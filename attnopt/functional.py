"""``attnopt.attention``: the public functional form of the op, with its argument checks."""

from __future__ import annotations

import math
import warnings

import torch

from attnopt import ops  # (also registers torch.ops.attnopt.attention)
from attnopt.kernels import registry
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    fill: Fill | str = Fill.SAFE,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of q ``[B, Hq, Nq, D]`` over k ``[B, Hkv, Nk, D]`` and v ``[B, Hkv, Nk, Dv]``.

    * ``causal``: False, True / "top_left" (query i sees keys 0..i, as SDPA's
      ``is_causal``) or "bottom_right" (query i sees keys 0..i + Nk - Nq, as with
      a KV cache; with Nq > Nk the first Nq - Nk queries see no key and get ``fill``,
      with a warning).
    * ``window=(left, right)``: query i sees keys ``d - left .. d + right`` around
      its diagonal key ``d`` (aligned as ``causal`` says; top-left when not causal).
    * ``key_padding_mask``: bool ``[B, Nk]``, True = keep (or int lengths ``[B]``).
    * ``attn_mask``: bool (True = keep) or additive float, broadcastable to ``[B, Hq, Nq, Nk]``.
    * ``bias``: additive float, broadcastable likewise (may require grad).
    * ``document_ids``: int ``[B, N]`` for self-attention, or a ``(q_ids, kv_ids)`` pair:
      queries see keys of their own document only.
    * ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the masks.
    * ``fill``: what a row with no visible key gives: "safe" zero (as SDPA), "-inf"
      NaN (as an eager softmax), "-inf_added" the same NaN with the gradient of an *added* ``-inf`` mask,
      "finite" the mean of v (as a ``finfo.min`` fill), "finite_added" the same mean with the gradient of an
      *added* ``finfo.min`` mask.
    * ``kernel``: a registered kernel name, or "auto" to let the planner choose.
    """
    _check_tensors(q, k, v)
    if causal not in (False, True, "top_left", "bottom_right"):
        raise ValueError(f"causal={causal!r} is not allowed: use False, True, 'top_left' or 'bottom_right'")
    align = Align.BOTTOM_RIGHT if causal == "bottom_right" else Align.TOP_LEFT
    window_term = _window(window)
    q_doc, kv_doc = _documents(document_ids)
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}: use bool (True = keep) or a float additive mask")
    if kernel != "auto":
        registry.get(kernel)
    try:
        fill = Fill(fill)
    except ValueError:
        raise ValueError(f"fill={fill!r} is not allowed: use 'safe', '-inf', '-inf_added', 'finite' or "
                         "'finite_added'") from None
    if causal == "bottom_right" and q.shape[2] > k.shape[2]:
        _warn_rows_before_first_key(q.shape[2], k.shape[2], fill)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    spec = AttentionSpec.from_tensors(
        q, k, v, scale=float(scale), causal=bool(causal), align=align, window=window_term,
        key_padding=key_padding_mask, q_doc=q_doc, kv_doc=kv_doc, bias=bias, mask=attn_mask,
        softcap=None if softcap is None else float(softcap), dropout_p=float(dropout_p), fill=fill,
    )
    spec.validate()
    args = ops.op_args(q, k, v, spec, kernel)
    if kernel != "auto" and ops._plain(q, k, v, bias, attn_mask):
        # a plain eager call of a named kernel: the op's body without its dispatch and per-call argument
        # binding (what an optimized model's sites run, attnopt/ops.py: SiteCall); tracers see the op
        chosen = ops.named_kernel(spec, kernel)
        if not ops._wants_grad(q, k, v, bias, attn_mask):
            return ops._run_forward(q, k, v, spec, chosen)[0]
        if q.device.type in ops.EAGER_TRAINING_DEVICES:
            return ops._eager_training(spec, chosen, args)
    return torch.ops.attnopt.attention(*args)[0]


_FILL_GIVES = {
    Fill.SAFE: "zeros", Fill.NEG_INF: "NaN", Fill.NEG_INF_ADDED: "NaN", Fill.FINITE: "the mean of v over all keys",
    Fill.FINITE_ADDED: "the mean of v over all keys",
}
#: (Nq, Nk, fill) already warned about: a model calls the same shape every step
_WARNED_BOTTOM_RIGHT: set[tuple[int, int, Fill]] = set()


def _warn_rows_before_first_key(q_len: int, kv_len: int, fill: Fill) -> None:
    """Bottom-right causal with more queries than keys: the first ``Nq - Nk`` rows see no key at all."""
    key = (int(q_len), int(kv_len), fill)
    if key in _WARNED_BOTTOM_RIGHT:
        return
    _WARNED_BOTTOM_RIGHT.add(key)
    empty = q_len - kv_len
    rows = "row 0 sees" if empty == 1 else f"rows 0..{empty - 1} see"
    warnings.warn(
        f"attnopt.attention(causal='bottom_right') with Nq={q_len} > Nk={kv_len}: query {rows} no key "
        f"(bottom-right alignment lets query i see keys 0..i + Nk - Nq = i - {empty}), so they get "
        f"fill={fill.value!r}: {_FILL_GIVES[fill]}. If queries and keys start at the same position, use "
        "causal=True (top-left).",
        UserWarning,
        stacklevel=3,
    )


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: attnopt.attention takes [B, H, N, D] tensors")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}: use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, Hkv, Nk]")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")


def _window(window) -> Window | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window={window!r} is not allowed: give (left, right), each an int >= 0 or None")
    if window[0] is None and window[1] is None:
        return None
    return Window(*window)


def _documents(document_ids):
    if document_ids is None:
        return None, None
    if isinstance(document_ids, torch.Tensor):
        return document_ids, document_ids
    q_doc, kv_doc = document_ids
    return q_doc, kv_doc
