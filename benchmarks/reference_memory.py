"""Peak memory and time of the reference kernel against eager attention and SDPA on CPU.

    python benchmarks/reference_memory.py [--lengths 1024 2048 4096 8192 16384] [--out results/reference_memory.md]

Causal self-attention, B=1, H=4, D=64, float32, random inputs. Eager is
``softmax(q @ k^T / sqrt(d) masked by tril) @ v``, materializing the [N, N]
scores; SDPA is ``F.scaled_dot_product_attention(is_causal=True)`` (PyTorch's CPU
flash kernel); attnopt is ``attnopt.attention(causal=True, kernel="reference")``.
"""

import argparse
import math
import pathlib

import torch
import torch.nn.functional as F

import attnopt
from attnopt.measure import measure
from attnopt.report import format_bytes


def eager(q, k, v):
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def reference(q, k, v):
    return attnopt.attention(q, k, v, causal=True, kernel="reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; causal, B=1, H=4, D=64, float32",
        "",
        "| N | eager peak | eager time | SDPA peak | SDPA time | attnopt peak | attnopt time | max diff vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with torch.no_grad():
        for n in args.lengths:
            q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
            row = [str(n)]
            outs = {}
            for name, fn in (("eager", eager), ("sdpa", sdpa), ("attnopt", reference)):
                outs[name] = fn(q, k, v)
                m = measure(lambda fn=fn: fn(q, k, v), repeat=1, warmup=0)
                row += [format_bytes(m.peak_bytes), f"{m.seconds * 1e3:.0f} ms"]
            row.append(f"{(outs['attnopt'] - outs['eager']).abs().max().item():.1e}")
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
            del outs
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
