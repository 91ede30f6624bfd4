"""``approx_local_global``: Longformer-style attention, an imposed local window plus global tokens.

The approximation replaces the spec's attention with attention restricted to

    keep'(i, j) = keep(i, j) and (|j - i - offset| <= window  or  j < n_global  or  i < n_global)

(``keep`` is the spec's own mask: causal, padding, documents... are all kept).
The first ``n_global`` tokens see everything and are seen by everyone, as
Longformer's global attention on [CLS]-like tokens.

Computation (shared with ``approx_bigbird`` through ``GatheredKernel``): the
queries are cut into blocks of ``c`` rows, and each block gathers the ``K`` keys
it may see (its band's span, the global keys), so that the work is a batch of
small dense problems ``[B * blocks, H, c, K]`` that the exact kernel solves with
the spec's terms evaluated on the gathered positions only. For a window the
block is the window's width and ``K = c + band + n_global``: time and memory are
O(N * (window + n_global)), never a mask across all N keys. Global query rows
are one more dense problem over all keys, O(n_global * N).

The backward is the exact kernel's backward on every block's problem, its key
and value gradients added back to their positions (``index_add_``): the exact
gradient of the approximate function. ``lse`` is each row's log-sum-exp over
the keys it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import registry
from .approx_base import Approximate, configured, terms_at
from .registry import Grads, register
from .spec import AttentionSpec

#: query rows per block, at least (a narrower window still gets blocks of this height)
MIN_BLOCK = 32
#: float32 score elements of one batch of blocks ``[B * blocks, H, c, K]``: 512K = 2 MiB
GROUP_ELEMENTS = 1 << 19
#: the exact kernel each block's problem runs on, by device, first supported wins
SUB_KERNELS = {"cpu": ("sdpa_cpu", "reference"), "cuda": ("sdpa_efficient", "reference")}
#: cost model, fitted on the 2-core CPU (benchmarks/approx.py): seconds per gathered score (products,
#: softmax, mask) and per gathered key row copied, and a fixed cost per batch of blocks
CPU_SCORE_S, CPU_GATHER_BYTES_S, CPU_GROUP_S = 2.0e-9, 2e9, 3e-4
GPU_SCORE_S, GPU_GATHER_BYTES_S, GPU_GROUP_S = 2e-12, 1e12, 5e-5


@dataclass(frozen=True)
class Layout:
    """Query ``rows [nb, c]`` see keys ``cols [nb, K]``; -1 marks no row / no key.

    ``imposed [nb, c, K]`` (None: all) is the approximation's own pattern inside the gathered keys.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    imposed: torch.Tensor | None = None


class GatheredKernel(Approximate):
    """Base of the imposed-sparsity kernels: subclasses say which keys each block of queries sees."""

    def layouts(self, spec: AttentionSpec, device: torch.device) -> list[Layout]:
        """Disjoint groups of query rows with the keys they see; together they cover every row."""
        raise NotImplementedError

    def gathered_keys(self, spec: AttentionSpec) -> float:
        """Average keys gathered per query row, for memory and cost."""
        raise NotImplementedError

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.dropout_p > 0.0:
            reasons.append(f"dropout not supported (dropout_p={spec.dropout_p})")
        if spec.requires_grad and (spec.bias is not None or (spec.mask is not None and spec.mask.is_floating_point())):
            reasons.append("gradient of an additive bias or float mask not supported")
        if spec.q_len != spec.kv_len:
            reasons.append(f"self-attention only (Nq={spec.q_len} != Nk={spec.kv_len}): the window needs one sequence")
        return reasons

    def block_rows(self) -> int:
        """Query rows per block: the gathered keys are shared by this many rows."""
        raise NotImplementedError

    def memory_bytes(self, spec: AttentionSpec) -> int:
        keys = self.gathered_keys(spec)
        scores = min(GROUP_ELEMENTS, spec.batch * spec.q_heads * spec.q_len * keys)  # one batch of blocks
        rows = scores / (spec.q_heads * keys)  # its query rows (all batches)
        gathered = rows / self.block_rows() * spec.kv_heads * keys * (spec.head_dim + spec.v_head_dim)
        return int(3 * scores * 4 + gathered * spec.dtype.itemsize + rows * keys + 8 * spec.batch * spec.q_heads * spec.q_len)

    def cost(self, spec: AttentionSpec) -> float:
        keys = self.gathered_keys(spec)
        scores = spec.batch * spec.q_heads * spec.q_len * keys
        blocks = spec.batch * -(-spec.q_len // self.block_rows())
        gathered = blocks * spec.kv_heads * keys * (spec.head_dim + spec.v_head_dim) * spec.dtype.itemsize
        groups = max(1.0, scores / GROUP_ELEMENTS) + 1
        dims = (spec.head_dim + spec.v_head_dim) / 128
        if spec.device.type == "cuda":
            return scores * GPU_SCORE_S * dims + gathered / GPU_GATHER_BYTES_S + groups * GPU_GROUP_S
        return scores * CPU_SCORE_S * dims + gathered / CPU_GATHER_BYTES_S + groups * CPU_GROUP_S

    # ----------------------------------------------------------- the computation
    def _problems(self, q, k, v, spec: AttentionSpec, layout: Layout):
        """Each batch of blocks of ``layout``: ``(rows [nb, c], cols [nb, K], q, k, v, exact sub-spec)``, blocks
        folded into the batch."""
        nb, c = layout.rows.shape
        n_keys = layout.cols.shape[1]
        per_block = spec.batch * spec.q_heads * c * n_keys
        step = max(1, GROUP_ELEMENTS // max(1, per_block))
        for b0 in range(0, nb, step):
            rows, cols = layout.rows[b0:b0 + step], layout.cols[b0:b0 + step]
            imposed = None if layout.imposed is None else layout.imposed[b0:b0 + step]
            yield rows, cols, *self._problem(q, k, v, spec, rows, cols, imposed)

    @staticmethod
    def _problem(q, k, v, spec: AttentionSpec, rows, cols, imposed):
        nb, c = rows.shape
        n_keys = cols.shape[1]
        b, hq, hkv = spec.batch, spec.q_heads, spec.kv_heads
        safe_rows, safe_cols = rows.clamp(min=0), cols.clamp(min=0)
        q_g = q[:, :, safe_rows.flatten()].reshape(b, hq, nb, c, -1).transpose(1, 2).reshape(b * nb, hq, c, -1)
        k_g, v_g = (
            t[:, :, safe_cols.flatten()].reshape(b, hkv, nb, n_keys, -1).transpose(1, 2).reshape(b * nb, hkv, n_keys, -1)
            for t in (k, v)
        )
        keep, additive = terms_at(spec, safe_rows, safe_cols)  # [B|1, H|1, nb, c, K]
        valid = (cols >= 0)[:, None, :]  # [nb, 1, K]
        allowed = valid if imposed is None else valid & imposed
        keep = allowed[None, None] if keep is None else keep & allowed[None, None]
        # a padding row (-1) sees every gathered key: never an empty row whose fill would reach the gradients
        padding = (rows < 0)[:, :, None]  # [nb, c, 1]
        keep = (keep & ~padding) | (padding & valid)
        bias = None
        for term in additive:
            bias = term if bias is None else bias + term

        def fold(t):  # [B|1, H', nb, c, K] -> [B * nb, H', c, K]
            t = t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t
            t = t.expand(*t.shape[:2], nb, *t.shape[3:])
            return t.transpose(1, 2).reshape(b * nb, t.shape[1], *t.shape[3:])

        sub = AttentionSpec.from_tensors(
            q_g, k_g, v_g, scale=spec.scale, softcap=spec.softcap, mask=fold(keep),
            bias=None if bias is None else fold(bias), fill=spec.fill, requires_grad=False,
        )
        return q_g, k_g, v_g, sub

    @staticmethod
    def _sub_kernel(sub: AttentionSpec):
        for name in SUB_KERNELS.get(sub.device.type, ("reference",)):
            kernel = registry.get(name)
            if not kernel.not_supported_reasons(sub):
                return kernel
        return registry.get("reference")

    @staticmethod
    def _unfold(t: torch.Tensor, batch: int, rows: torch.Tensor) -> torch.Tensor:
        """``[B * nb, H, c, ...]`` back to ``[B, H, nb * c, ...]``."""
        nb, c = rows.shape
        return t.reshape(batch, nb, *t.shape[1:]).transpose(1, 2).reshape(batch, t.shape[1], nb * c, *t.shape[3:])

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        n = spec.q_len
        # one spare row at n receives what padding rows (-1) compute
        out = q.new_empty((spec.batch, spec.q_heads, n + 1, spec.v_head_dim))
        lse = q.new_empty((spec.batch, spec.q_heads, n + 1), dtype=torch.float64 if q.dtype == torch.float64
                          else torch.float32)
        for layout in self.layouts(spec, q.device):
            for rows, cols, q_g, k_g, v_g, sub in self._problems(q, k, v, spec, layout):
                out_g, lse_g = self._sub_kernel(sub).forward(q_g, k_g, v_g, sub, seed)
                at = torch.where(rows >= 0, rows, n).flatten()
                out.index_copy_(2, at, self._unfold(out_g.to(out.dtype), spec.batch, rows))
                lse.index_copy_(2, at, self._unfold(lse_g.to(lse.dtype), spec.batch, rows))
        return out[:, :, :n], lse[:, :, :n]

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        n, n_k = spec.q_len, spec.kv_len
        acc = torch.float64 if k.dtype == torch.float64 else torch.float32
        dq = torch.zeros((*q.shape[:2], n + 1, q.shape[3]), dtype=acc, device=q.device)
        dk = torch.zeros((*k.shape[:2], n_k + 1, k.shape[3]), dtype=acc, device=k.device)
        dv = torch.zeros((*v.shape[:2], n_k + 1, v.shape[3]), dtype=acc, device=v.device)
        zero = grad_out.new_zeros((*grad_out.shape[:2], 1, grad_out.shape[3]))
        grad_ext, out_ext = torch.cat([grad_out, zero], 2), torch.cat([out, zero.to(out.dtype)], 2)
        # the spare row (padding rows' target) has lse = +inf: its probabilities, and so its gradients, are 0
        lse_ext = torch.cat([lse, lse.new_full((*lse.shape[:2], 1), float("inf"))], 2)
        for layout in self.layouts(spec, q.device):
            for rows, cols, q_g, k_g, v_g, sub in self._problems(q, k, v, spec, layout):
                at = torch.where(rows >= 0, rows, n)
                nb, c = rows.shape

                def fold(t):  # [B, H, N + 1, ...] at rows -> [B * nb, H, c, ...]
                    picked = t[:, :, at.flatten()]
                    picked = picked.reshape(t.shape[0], t.shape[1], nb, c, *t.shape[3:]).transpose(1, 2)
                    return picked.reshape(t.shape[0] * nb, t.shape[1], c, *t.shape[3:])

                dq_g, dk_g, dv_g, _, _ = self._sub_kernel(sub).backward(
                    fold(grad_ext), q_g, k_g, v_g, fold(out_ext), fold(lse_ext), sub, seed, False, False,
                )
                dq.index_add_(2, at.flatten(), self._unfold(dq_g.to(acc), spec.batch, rows))
                to = torch.where(cols >= 0, cols, n_k).flatten()
                dk.index_add_(2, to, self._unfold(dk_g.to(acc), spec.batch, cols))
                dv.index_add_(2, to, self._unfold(dv_g.to(acc), spec.batch, cols))
        return dq[:, :, :n].to(q.dtype), dk[:, :, :n_k].to(k.dtype), dv[:, :, :n_k].to(v.dtype), None, None


class LocalGlobalKernel(GatheredKernel):
    name = family = "approx_local_global"
    summary = "approximate (Longformer): local window of +-window keys plus n_global global tokens"

    def __init__(self, window: int = 128, n_global: int = 16):
        self.window, self.n_global = window, n_global

    def settings(self) -> dict[str, int]:
        return {"window": self.window, "n_global": self.n_global}

    def search_space(self, spec: AttentionSpec) -> list[dict[str, int]]:
        n = spec.kv_len
        windows = [w for w in (64, 128, 256, 512) if 4 * w < n] or [max(1, n // 4)]
        return [{"window": w, "n_global": g} for w in windows for g in (1, 16) if g < n]

    def _span(self, spec: AttentionSpec) -> tuple[int, int]:
        """Key offsets ``(lo, hi)`` from the diagonal that the window and the spec's band leave."""
        lo, hi = spec.band()
        lo = -self.window if lo is None else max(lo, -self.window)
        hi = self.window if hi is None else min(hi, self.window)
        return lo, max(lo, hi)

    def block_rows(self) -> int:
        return max(MIN_BLOCK, self.window)

    def gathered_keys(self, spec: AttentionSpec) -> float:
        lo, hi = self._span(spec)
        keys = min(spec.kv_len, self.block_rows() + hi - lo + min(self.n_global, spec.kv_len))
        dense = min(self.n_global, spec.q_len) * spec.kv_len / max(1, spec.q_len)
        return keys + dense

    def layouts(self, spec: AttentionSpec, device: torch.device) -> list[Layout]:
        n, n_k, g = spec.q_len, spec.kv_len, min(self.n_global, spec.q_len, spec.kv_len)
        c = min(self.block_rows(), max(1, n))
        nb = -(-n // c)
        lo, hi = self._span(spec)
        off = spec.diagonal_offset
        rows = torch.arange(nb * c, device=device).reshape(nb, c)
        rows = torch.where((rows < n) & (rows >= g), rows, -1)
        starts = torch.arange(nb, device=device) * c + off + lo  # [nb]
        band = starts[:, None] + torch.arange(c + hi - lo, device=device)[None, :]  # [nb, c + hi - lo]
        band = torch.where((band >= g) & (band < n_k), band, -1)  # the global keys come separately
        cols = torch.cat([torch.arange(g, device=device).expand(nb, g), band], dim=1)
        rel = cols[:, None, :] - rows.clamp(min=0)[:, :, None] - off
        imposed = (cols[:, None, :] < g) | ((rel >= lo) & (rel <= hi))
        found = [Layout(rows, cols, imposed)]
        if g:
            found.append(Layout(torch.arange(g, device=device)[None], torch.arange(n_k, device=device)[None]))
        return found


register(LocalGlobalKernel())


def local_global(window: int, n_global: int) -> LocalGlobalKernel:
    """The registered local-global kernel with these settings."""
    return configured(registry.get("approx_local_global"), window=window, n_global=n_global)

