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
Subtracting a per-row maximum from the query features' exponent and a
per-head maximum from the keys' cancels in the ratio and keeps exp finite.

The features are seeded (``seed``), so forward, backward and calibration agree.
The backward is autograd of these torch ops, recomputed (``approx_base``).
``lse`` is not defined by this approximation: NaN.
"""

from __future__ import annotations

import math

import torch

from .approx_base import nan_lse, recompute_grads, tensor_reasons
from .registry import Grads, Kernel, register
from .spec import Align, AttentionSpec

CHUNK = 128
#: PyTorch-op throughput assumed for the cost model, CPU and GPU
CPU_FLOPS, GPU_FLOPS = 5e10, 1e14
EPS = 1e-6


def orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """``[m, d]`` Gaussian rows, orthogonal within each block of d, with chi-distributed norms."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        gaussian = torch.randn(d, d, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


def _features(x: torch.Tensor, w: torch.Tensor, stabilize_dims: tuple[int, ...]) -> torch.Tensor:
    """``phi(x)`` [..., N, m] for x [..., N, D] (already scaled by sqrt(scale))."""
    proj = x @ w.T  # [..., N, m]
    exponent = proj - (x * x).sum(-1, keepdim=True) / 2
    exponent = exponent - exponent.detach().amax(dim=stabilize_dims, keepdim=True)
    return torch.exp(exponent) / math.sqrt(w.shape[0])


class PerformerKernel(Kernel):
    name = "approx_performer"
    exact = False
    summary = "approximate (Performer FAVOR+): positive orthogonal random features, O(N) time and memory"

    def __init__(self, n_features: int = 128, seed: int = 0):
        self.n_features, self.seed = n_features, seed

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = tensor_reasons(spec, allowed=("causal",))
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """Differentiable FAVOR+ attention ``[B, Hq, Nq, Dv]`` in float32 (float64 for float64)."""
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        w = orthogonal_features(self.n_features, spec.head_dim, self.seed).to(q.device, cdtype)
        root = math.sqrt(spec.scale)
        b, hkv, g = spec.batch, spec.kv_heads, spec.group_size
        q_g = (q.to(cdtype) * root).reshape(b, hkv, g, spec.q_len, spec.head_dim)  # [B, Hkv, G, Nq, D]
        phi_q = _features(q_g, w, stabilize_dims=(-1,))
        phi_k = _features(k.to(cdtype)[:, :, None] * root, w, stabilize_dims=(-2, -1))  # [B, Hkv, 1, Nk, m]
        v_c = v.to(cdtype)[:, :, None]  # [B, Hkv, 1, Nk, Dv]
        if not spec.causal:
            kv = phi_k.transpose(-1, -2) @ v_c  # [B, Hkv, 1, m, Dv]
            num = phi_q @ kv
            den = phi_q @ phi_k.sum(-2)[..., None]
            out = num / (den + EPS)
        else:
            out = self._causal(phi_q, phi_k, v_c)
        return out.reshape(b, spec.q_heads, spec.q_len, spec.v_head_dim)

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
            outs.append(num / (den + EPS))
            state = state + fk.transpose(-1, -2) @ vc
            total = total + fk.sum(-2)[..., None]
        return torch.cat(outs, dim=-2)

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        with torch.no_grad():
            out = self.attend(q, k, v, spec).to(q.dtype)
        return out, nan_lse(q, spec)

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        dq, dk, dv, _, _ = recompute_grads(self.attend, grad_out, q, k, v, spec, False, False)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


register(PerformerKernel())
