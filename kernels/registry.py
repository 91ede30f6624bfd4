"""The kernel contract and the registry that the op and the planner look kernels up in.

A kernel is one object that says what it can compute (``not_supported_reasons``),
what it costs (``cost``, ``memory_bytes``) and computes it (``forward``,
``backward``). Adding a kernel is one file that subclasses ``Kernel`` and one
``register`` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .spec import AttentionSpec

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


#: the tiers of ``Kernel.compiles``: nothing (ATen's kernels, small Triton kernels such as the decode kernel: well
#: under a second); one large Triton kernel per specialization (``triton_flash``'s forward: 1.4-1.7 s each on an
#: H200 with a cold Triton cache, more with its backward); inductor (FlexAttention: seconds for a forward, minutes
#: for a training call's backward, and inductor's own start in a fresh process)
COMPILES_NOTHING, COMPILES_TRITON, COMPILES_INDUCTOR = 0, 1, 2


class Kernel:
    """Base class of attention kernels. Subclasses set ``name`` and ``exact`` and override the rest."""

    name: str = ""
    exact: bool = True
    #: one line for reports: what the kernel is
    summary: str = ""
    #: devices the kernel is meant for (None: any). Elsewhere the planner uses it only when forced
    #: by name: Triton kernels run on CPU tensors in Triton's interpreter, which is for tests.
    devices: tuple[str, ...] | None = None
    #: what its first call per shape family compiles, as a tier (``COMPILES_*``): the planner times a kernel on
    #: a GPU only where its estimate leads every kernel of a lower tier (``passes/tuning.py``)
    compiles: int = 0

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        """Every reason this kernel cannot compute ``spec``; empty when it can."""
        raise NotImplementedError

    def memory_bytes(self, spec: AttentionSpec) -> int:
        """Transient device memory of one forward beyond inputs and output (workspace)."""
        raise NotImplementedError

    def saved_bytes(self, spec: AttentionSpec) -> int:
        """Memory kept for the backward beyond inputs and output (log-sum-exp by default)."""
        return 4 * spec.batch * spec.q_heads * spec.q_len

    def cost(self, spec: AttentionSpec) -> float:
        """Estimated seconds for one forward; only compared between kernels."""
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq])``; ``seed`` drives dropout.

        ``lse`` is the natural-log log-sum-exp of each row's scores, float32
        (float64 for float64 inputs), ``-inf`` for rows with no visible key.
        """
        raise NotImplementedError

    def infer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """The output of ``forward`` without dropout, for an inference call that needs nothing else (no
        log-sum-exp); kernels override it where that saves host work per call."""
        return self.forward(q, k, v, spec, 0)[0]

    def prepare(self, spec: AttentionSpec) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec],
                                                       torch.Tensor]:
        """``infer`` for calls of ``spec``'s shapes and terms, with what the spec alone decides resolved once:
        a site calls ``prepare`` once per call shape and the result on every call with that shape (and
        ``spec``, or a spec that differs only in its tensor terms' values). Kernels override it where
        deciding per call costs host time (mask handling, launch configuration); the default is ``infer``."""
        return self.infer

    def backward(
        self,
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        spec: AttentionSpec,
        seed: int,
        needs_bias_grad: bool,
        needs_mask_grad: bool,
    ) -> Grads:
        """Return ``(dq, dk, dv, dbias or None, dmask or None)``, dropout regenerated from ``seed``."""
        raise NotImplementedError

    def train_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``forward``'s ``(out, lse)`` and a residual: what this kernel's ``train_backward`` takes from the
        forward besides them (found once per call, not looked up again in the backward). A training call that
        keeps the residual with its saved tensors calls these two; the default keeps nothing."""
        return (*self.forward(q, k, v, spec, seed), None)

    def train_backward(self, residual, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec, seed: int, needs_bias_grad: bool,
                       needs_mask_grad: bool) -> Grads:
        """``backward`` of a ``train_forward`` call, with its residual."""
        return self.backward(grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad)

    def autograd_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                         seed: int) -> torch.Tensor | None:
        """A training call's output recorded by autograd through torch's own differentiable ops (a backward
        of C++ nodes: no Python backward, which on CUDA costs a hand-off to autograd's device thread per
        call), equal to what ``train_forward`` and ``train_backward`` give; None where this kernel has no
        such call for ``spec`` (then the call takes those two). Its backward is not differentiable again:
        callers take it only where a double backward is not supported anyway (dropout). The default: none."""
        return None

    def __repr__(self) -> str:
        return f"<kernel {self.name}{'' if self.exact else ' (approximate)'}>"


_KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    assert kernel.name and kernel.name not in _KERNELS, f"kernel name {kernel.name!r} missing or taken"
    _KERNELS[kernel.name] = kernel
    return kernel


def get(name: str) -> Kernel:
    kernel = _KERNELS.get(name) or _ALIASES.get(name) or _configured(name)
    if kernel is None:
        known = ", ".join(sorted(_KERNELS)) or "none"
        raise ValueError(f"unknown attention kernel {name!r}: registered kernels are {known}")
    return kernel


def _configured(name: str) -> Kernel | None:
    """A kernel named ``family[key=value,...]`` (an approximate kernel's calibrated settings, as graphs
    name it), made from its registered family: the name alone rebuilds it in a fresh process."""
    match = re.fullmatch(r"(\w+)\[([^\]]*)\]", name)
    family = _KERNELS.get(match.group(1)) if match else None
    if family is None or not hasattr(family, "with_settings"):
        return None
    settings = {}
    for item in match.group(2).split(","):
        key, _, value = item.partition("=")
        if not key or not value.lstrip("-").isdigit():
            return None
        settings[key] = int(value)
    try:
        made = family.with_settings(**settings)
    except TypeError:  # a setting this family does not have
        return None
    made.name = name
    return register(made)


def all_kernels() -> list[Kernel]:
    return list(_KERNELS.values())


class Deferred(Kernel):
    """A replaced site's kernel while its choice waits for a timing: every call goes to ``target``.

    ``torch.compile(backend="attnopt")`` rewrites a site before inductor compiles the graph and bakes the kernel's
    name into it. Where the fastest candidate would first have to compile its Triton code to be timed, the site
    names one of these instead, with the fastest kernel already timed as its target; the compiling kernel is
    compiled in the background while inductor compiles the graph and timed after it, and the target is set once,
    before the graph's first call (``attnopt.backend``). Not a candidate of the planner (``all_kernels`` leaves it
    out): only ``get`` finds it, by the name the graph holds."""

    compiles = COMPILES_NOTHING

    def __init__(self, name: str, target: Kernel):
        self.name = name
        self.target = target

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.target.exact

    @property
    def summary(self) -> str:  # type: ignore[override]
        return f"{self.target.name}, timed again after the compile"

    def not_supported_reasons(self, spec):
        return self.target.not_supported_reasons(spec)

    def memory_bytes(self, spec):
        return self.target.memory_bytes(spec)

    def saved_bytes(self, spec):
        return self.target.saved_bytes(spec)

    def cost(self, spec):
        return self.target.cost(spec)

    def forward(self, q, k, v, spec, seed):
        return self.target.forward(q, k, v, spec, seed)

    def infer(self, q, k, v, spec):
        return self.target.infer(q, k, v, spec)

    def prepare(self, spec):
        return self.target.prepare(spec)

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad):
        return self.target.backward(grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad)

    def train_forward(self, q, k, v, spec, seed):
        return self.target.train_forward(q, k, v, spec, seed)

    def train_backward(self, residual, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad):
        return self.target.train_backward(residual, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad,
                                          needs_mask_grad)

    def autograd_forward(self, q, k, v, spec, seed):
        return self.target.autograd_forward(q, k, v, spec, seed)

    def __repr__(self) -> str:
        return f"<kernel {self.name} -> {self.target.name}>"


#: the ``Deferred`` kernels of this process, by name (``deferred_<n>``, numbered in the order they are made)
_ALIASES: dict[str, Deferred] = {}


def deferred(target: str) -> Deferred:
    """A new ``Deferred`` kernel whose calls go to the kernel ``target`` until it is set to another."""
    alias = Deferred(f"deferred_{len(_ALIASES)}", get(target))
    _ALIASES[alias.name] = alias
    return alias
