"""attnopt's runtime: the AttentionSpec contract, the kernel registry and the kernels."""

from . import reference  # noqa: F401  (registers the reference kernel)
from .naive import naive_attention
from .registry import Kernel, all_kernels, get, register
from .spec import Align, AttentionSpec, Fill, Window

__all__ = [
    "Align", "AttentionSpec", "Fill", "Kernel", "Window", "all_kernels", "get", "naive_attention", "register",
]
