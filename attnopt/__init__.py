"""attnopt: find the attention in a PyTorch model and replace it with exact fused kernels.

    model = attnopt.optimize(model, max_mem="24GB", exact=True)
    print(attnopt.explain(model, (x,)))
    compiled = torch.compile(model, backend="attnopt")
    print(attnopt.report_of(compiled))
"""

from attnopt import kernels, passes  # noqa: F401
from attnopt import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.api import explain, optimize, settle
from attnopt.backend import Backend, report_of
from attnopt.config import Options, parse_bytes
from attnopt.functional import attention
from attnopt.passes.plan import ApproximationWarning, MemoryBudgetError, NoKernelError
from attnopt.report import AttnoptWarning, Fallback, Report, Site

__all__ = [
    "ApproximationWarning", "AttnoptWarning", "Backend", "Fallback", "MemoryBudgetError", "NoKernelError", "Options", "Report", "Site",
    "attention", "explain", "optimize", "parse_bytes", "report_of", "settle",
]
__version__ = "0.1.0"
