import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; the variable
# must be set before triton.jit decorates any kernel, i.e. before attnopt is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models; dynamo's per-code caches must not carry over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
