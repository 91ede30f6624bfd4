"""attnopt: find the attention in a PyTorch model and replace it with exact fused kernels."""

from attnopt import kernels, passes  # noqa: F401
from attnopt import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.functional import attention

__all__ = ["attention"]
__version__ = "0.1.0"
