"""``approx_performer``: Performer's FAVOR+ positive random features, causal and non-causal.

softmax attention is ``D^-1 A V`` with ``A[i, j] = exp(s * q_i . k_j)``. FAVOR+
(Choromanski et al., 2021) writes ``exp(x . y) = E[phi(x) . phi(y)]`` with the
positive features ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``, ``W`` m orthogonal
Gaussian rows, so that (with ``x = sqrt(s) q``, ``y = sqrt(s) k``)

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j)

costs O(N m D) time and O(N m) memory. Causal attention restricts both sums to
``j <= i``: queries are processed in chunks of ``CHUNK`` rows carrying running
prefix sums ``S = sum phi(k) v^T`` [m, Dv] and ``z = sum phi(k)`` [m]; inside a
chunk the [c, c] lower triangle of ``phi(q) phi(k)^T`` is formed explicitly.
Key padding drops the padded keys' features from both sums. Subtracting a
per-row maximum from the query features' exponent and a per-head maximum (over
kept keys) from the keys' cancels in the ratio and keeps exp finite.

The estimator's variance falls with the number of features ``m`` and with
their independence: each kv head draws its own block-orthogonal ``W`` (errors
of different heads do not add up coherently after the output projection). The
features are drawn for each call from a generator seeded by the kernel's
``seed`` and the call's seed, so forward, backward and calibration see the same
ones. The backward is autograd of these torch ops, recomputed (``approx_base``).
``lse`` is not defined by this approximation: NaN.
"""

from __future__ import annotations

import functools
import math

import torch

from .approx_base import Approximate, nan_lse, recompute_grads, tensor_reasons
from .fills import fill_empty_rows
from .registry import Grads, register
from .spec import Align, AttentionSpec, key_padding_keep

CHUNK = 128
#: PyTorch-op throughput assumed for the cost model, CPU and GPU
CPU_FLOPS, GPU_FLOPS = 3e10, 1e14
#: the smallest denominator: a row whose kept keys' features all underflow gives 0, not NaN
TINY = 1e-30


@functools.lru_cache(maxsize=32)
def orthogonal_features(m: int, d: int, seed: int, heads: int = 1) -> torch.Tensor:
    """``[heads, m, d]`` Gaussian rows, orthogonal within each block of d, with chi-distributed norms (CPU, float64)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-m // d)
    gaussian = torch.randn(heads, blocks, d, d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)  # orthonormal columns per block
    w = q.transpose(-1, -2).reshape(heads, blocks * d, d)[:, :m]
    norms = torch.randn(heads, m, d, generator=gen, dtype=torch.float64).norm(dim=-1)
    return w * norms[..., None]


def _features(x: torch.Tensor, w: torch.Tensor, stabilize_dims: tuple[int, ...],
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """``phi(x)`` [..., N, m] for x [..., N, D] (already scaled by sqrt(scale)); rows not in ``keep`` are 0."""
    proj = x @ w.transpose(-1, -2)  # [..., N, m]
    exponent = proj - (x * x).sum(-1, keepdim=True) / 2
    if keep is not None:
        exponent = exponent.masked_fill(~keep, float("-inf"))
    top = exponent.detach().amax(dim=stabilize_dims, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no kept row at all
    return torch.exp(exponent - top) / math.sqrt(w.shape[-2])


class PerformerKernel(Approximate):
    name = family = "approx_performer"
    summary = "approximate (Performer FAVOR+): positive orthogonal random features, O(N) time and memory"

    def __init__(self, n_features: int = 128, seed: int = 0):
        self.n_features, self.seed = n_features, seed

    def settings(self) -> dict[str, int]:
        return {"n_features": self.n_features, "seed": self.seed}

    def search_space(self, spec: AttentionSpec) -> list[dict[str, int]]:
        return [{"n_features": m, "seed": self.seed} for m in (64, 128, 256) if m < spec.kv_len]

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = tensor_reasons(spec, allowed=("causal", "key_padding"))
        if spec.causal and (spec.q_len != spec.kv_len or spec.align != Align.TOP_LEFT):
            reasons.append("causal only for self-attention (Nq == Nk, top-left)")
        if spec.dropout_p > 0.0:
            reasons.append(f"dropout not supported (dropout_p={spec.dropout_p})")
        return reasons

    def memory_bytes(self, spec: AttentionSpec) -> int:
        m = self.n_features
        features = spec.batch * (spec.q_heads + spec.kv_heads) * spec.q_len * m * 4 * 2  # exponent + exp
        state = spec.batch * spec.q_heads * m * (spec.v_head_dim + 1) * 4
        chunk = spec.batch * spec.q_heads * CHUNK * CHUNK * 4 * 2 if spec.causal else 0
        return features + state + chunk

    def saved_bytes(self, spec: AttentionSpec) -> int:
        return 0  # the backward recomputes from q, k, v

    def cost(self, spec: AttentionSpec) -> float:
        m = self.n_features
        flops = 2.0 * spec.batch * spec.q_heads * (spec.q_len + spec.kv_len) * m * (spec.head_dim + spec.v_head_dim)
        if spec.causal:
            flops += 2.0 * spec.batch * spec.q_heads * spec.q_len * CHUNK * (m + spec.v_head_dim)
        return flops / (GPU_FLOPS if spec.device.type == "cuda" else CPU_FLOPS)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
               call_seed: int = 0) -> torch.Tensor:
        """Differentiable FAVOR+ attention ``[B, Hq, Nq, Dv]`` in float32 (float64 for float64)."""
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, hkv, g = spec.batch, spec.kv_heads, spec.group_size
        seed = (self.seed * 1_000_003 + call_seed) % (1 << 62)
        w = orthogonal_features(self.n_features, spec.head_dim, seed, hkv).to(q.device, cdtype)
        w = w[None, :, None]  # [1, Hkv, 1, m, D]
        root = math.sqrt(spec.scale)
        keep = None
        if spec.key_padding is not None:
            keep = key_padding_keep(spec.key_padding, spec.kv_len)[:, None, None, :, None]  # [B, 1, 1, Nk, 1]
        q_g = (q.to(cdtype) * root).reshape(b, hkv, g, spec.q_len, spec.head_dim)  # [B, Hkv, G, Nq, D]
        phi_q = _features(q_g, w, stabilize_dims=(-1,))
        phi_k = _features(k.to(cdtype)[:, :, None] * root, w, stabilize_dims=(-2, -1), keep=keep)  # [B, Hkv, 1, Nk, m]
        v_c = v.to(cdtype)[:, :, None]  # [B, Hkv, 1, Nk, Dv]
        if not spec.causal:
            kv = phi_k.transpose(-1, -2) @ v_c  # [B, Hkv, 1, m, Dv]
            num = phi_q @ kv
            den = phi_q @ phi_k.sum(-2)[..., None]
            out = num / den.clamp_min(TINY)
        else:
            out = self._causal(phi_q, phi_k, v_c)
        out = out.reshape(b, spec.q_heads, spec.q_len, spec.v_head_dim)
        if keep is None:
            return out
        return fill_empty_rows(out, self._empty_rows(spec), v, spec)

    @staticmethod
    def _empty_rows(spec: AttentionSpec) -> torch.Tensor:
        """``[B, Hq, Nq]``: rows whose padding (and causal band) leaves no key."""
        kept = key_padding_keep(spec.key_padding, spec.kv_len)  # [B, Nk]
        if spec.causal:
            first = torch.where(kept.any(-1), kept.int().argmax(-1), spec.kv_len)  # first kept key [B]
            rows = torch.arange(spec.q_len, device=kept.device)[None] < first[:, None]  # [B, Nq]
        else:
            rows = (~kept.any(-1))[:, None].expand(spec.batch, spec.q_len)
        return rows[:, None].expand(spec.batch, spec.q_heads, spec.q_len)

    @staticmethod
    def _causal(phi_q, phi_k, v_c) -> torch.Tensor:
        state = phi_q.new_zeros((*phi_k.shape[:-2], phi_k.shape[-1], v_c.shape[-1]))  # [B, Hkv, 1, m, Dv]
        total = phi_q.new_zeros((*phi_k.shape[:-2], phi_k.shape[-1], 1))  # [B, Hkv, 1, m, 1]
        n = phi_q.shape[-2]
        tril = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=phi_q.device).tril()
        outs = []
        for c0 in range(0, n, CHUNK):
            c1 = min(c0 + CHUNK, n)
            fq, fk, vc = phi_q[..., c0:c1, :], phi_k[..., c0:c1, :], v_c[..., c0:c1, :]
            local = (fq @ fk.transpose(-1, -2)) * tril[: c1 - c0, : c1 - c0]  # [B, Hkv, G, c, c]
            num = fq @ state + local @ vc
            den = fq @ total + local.sum(-1, keepdim=True)
            outs.append(num / den.clamp_min(TINY))
            state = state + fk.transpose(-1, -2) @ vc
            total = total + fk.sum(-2)[..., None]
        return torch.cat(outs, dim=-2)

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        with torch.no_grad():
            out = self.attend(q, k, v, spec, seed).to(q.dtype)
        return out, nan_lse(q, spec)

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        def attend(q, k, v, spec):
            return self.attend(q, k, v, spec, seed)

        dq, dk, dv, _, _ = recompute_grads(attend, grad_out, q, k, v, spec, False, False)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


register(PerformerKernel())
