"""attnopt's runtime: the AttentionSpec contract, the kernel registry and the kernels."""

from . import reference  # noqa: F401  (registers the reference kernel)
from . import approx_bigbird, approx_local_global, approx_performer, flex, sdpa  # noqa: F401  (register themselves)

try:
    import triton  # noqa: F401
except ImportError:  # the Triton kernels are optional: the reference kernel runs anywhere
    triton = None
if triton is not None:
    from . import triton_decode, triton_flash  # noqa: F401
from .naive import naive_attention
from .registry import Kernel, all_kernels, get, register
from .spec import Align, AttentionSpec, Fill, Window

__all__ = [
    "Align", "AttentionSpec", "Fill", "Kernel", "Window", "all_kernels", "get", "naive_attention", "register",
]
