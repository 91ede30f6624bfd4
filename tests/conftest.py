import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; the variable
# must be set before triton.jit decorates any kernel, i.e. before attnopt is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
