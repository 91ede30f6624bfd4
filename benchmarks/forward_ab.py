"""The Triton forward kernel against an earlier version of itself and cuDNN, in one process.

    python benchmarks/forward_ab.py [--baseline 72ef187] [--out FILE]

Loads ``kernels/triton_flash_fwd.py`` as it was at the ``--baseline`` commit (``git show``) beside the
current one, runs both through the same launcher (``TritonFlashKernel.forward``, autotuned as usual) on the
shapes of ``benchmarks/kernels.py`` (bf16, d_model 2048, B*N = 16384) and prints, for each case, cuDNN's
time, both kernels' times, their ratios to cuDNN and their largest difference from cuDNN's output (checked
before timing, on fresh random inputs). ``triton.testing.do_bench`` medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import get
from attnopt.kernels import triton_flash as tf
from attnopt.kernels.launch import forget as forget_tuning
from attnopt.kernels.spec import AttentionSpec

#: (head dim, length, causal, q heads, kv heads)
CASES = [(128, 4096, True, 16, 16), (128, 4096, False, 16, 16), (64, 4096, True, 32, 32), (64, 4096, False, 32, 32),
         (128, 16384, True, 16, 16), (128, 4096, True, 32, 8), (128, 1024, True, 16, 16)]


def baseline_forward(rev: str):
    """``_attn_fwd`` of ``kernels/triton_flash_fwd.py`` at commit ``rev``."""
    root = pathlib.Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:kernels/triton_flash_fwd.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "triton_flash_fwd_baseline.py"
    path.write_text(source)  # Triton's JIT reads the kernel's source from its file
    spec = importlib.util.spec_from_file_location("triton_flash_fwd_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module._attn_fwd


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="72ef187", help="commit of the earlier forward kernel")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    kernel, current = get("triton_flash"), tf._attn_fwd
    versions = {"baseline": baseline_forward(args.baseline), "current": current}
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16; "
             f"baseline = kernels/triton_flash_fwd.py at {args.baseline}; milliseconds (do_bench medians)", "",
             "| case | cuDNN | baseline | current | baseline vs cuDNN | current vs cuDNN | max err baseline "
             "| max err current | current's tile config |", "|---|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for d, n, causal, hq, hkv in CASES:
        b = 16384 // n
        q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
            cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv))
        ms, err = {}, {}
        for name, fwd in versions.items():
            tf._attn_fwd = fwd
            forget_tuning()
            try:
                err[name] = (kernel.forward(q, k, v, spec, 0)[0].float() - ref.float()).abs().max().item()
                ms[name] = bench(lambda: kernel.forward(q, k, v, spec, 0))
            finally:
                tf._attn_fwd = current
        config = current.best_config
        lines.append(f"| D{d} N{n} {'causal' if causal else 'full'} {hq}/{hkv} | {cudnn:.3f} | {ms['baseline']:.3f} "
                     f"| {ms['current']:.3f} | {cudnn / ms['baseline']:.2f} | {cudnn / ms['current']:.2f} "
                     f"| {err['baseline']:.1e} | {err['current']:.1e} | {config.kwargs}, {config.num_warps} warps, "
                     f"{config.num_stages} stages |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
