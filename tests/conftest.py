import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; the variable
# must be set before triton.jit decorates any kernel, i.e. before attnopt is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from attnopt.config import Options  # noqa: E402

# The suite is deterministic and writes no tuning cache: candidates are ranked by the cost models.
os.environ.setdefault("ATTNOPT_TUNE", "0")


@pytest.fixture(autouse=True)
def _replace_supported_sites(request, monkeypatch):
    """Most tests are about the rewrite, on shapes where the original code is faster: they see every
    supported site replaced (``keep_original=False``). Tests of the planner's keep-the-original policy
    are marked ``keeps_original`` and get the defaults."""
    if request.node.get_closest_marker("keeps_original") is not None:
        return
    build = Options.build

    def replacing(**given):
        given.setdefault("keep_original", False)
        return build(**given)

    monkeypatch.setattr(Options, "build", staticmethod(replacing))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models; dynamo's per-code caches must not carry over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
