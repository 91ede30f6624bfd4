"""Host time of one training call, forward then backward, as a training step interleaves them.

BERT fine-tuning (``bert_train.py``) showed a step bound by the host: the padded-encoder site's
training call cost more host time than SDPA's own forward and backward. This script times that
call on a shape so small that the device keeps up (so the time per call is host time), per SDPA
backend and dropout probability, against SDPA itself under autograd with the backend selected and
the model's additive padding mask built once (as a model builds it once per forward):

* ``site`` / ``SDPA``: forward then backward of one call, repeated;
* ``synced``: the same with ``torch.cuda.synchronize()`` after each call;
* ``calling thread``: the same under ``torch.autograd.set_multithreading_enabled(False)``, which runs
  the backward on the thread that called it instead of autograd's CUDA device thread. A backward
  written in Python (the site's ``autograd.Function``) pays for that hand-off in proportion to its
  Python work; SDPA's C++ backward barely does.

    python benchmarks/training_call.py --out benchmarks/results/training_call.md
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import registry
from attnopt.ops import SiteCall

BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_flash": SDPBackend.FLASH_ATTENTION}


def per_call_us(fn, calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[repeats // 2]


def rows(calls: int, repeats: int) -> list[tuple]:
    b, h, n, d = 2, 4, 64, 64
    g = torch.Generator().manual_seed(0)
    # HF's layout: [B, H, N, D] views of [B, N, H, D] projections, the output's gradient likewise
    q, k, v = (torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    grad = torch.randn(b, n, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    keep = torch.ones(b, n, dtype=torch.bool, device="cuda")
    keep[1, 3 * n // 4:] = False  # BERT's padded batch: every row keeps some keys
    additive = (~keep[:, None, None, :]).to(torch.bfloat16) * torch.finfo(torch.bfloat16).min
    static = (d ** -0.5, False, "top_left", None, None, None)
    table = []
    for p in (0.0, 0.1):
        for name, backend in BACKENDS.items():
            site = SiteCall(name, *static, "finite_added")
            spec = site._spec(q, k, v, keep, None, None, None, None)[0].with_(dropout_p=p, requires_grad=True)
            if registry.get(name).not_supported_reasons(spec):
                continue

            def through_site(site=site, p=p):
                torch.autograd.backward(site(q, k, v, keep, None, None, None, None, p)[0], grad)

            def through_sdpa(backend=backend, p=p):
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=p)
                torch.autograd.backward(out, grad)

            measured = []
            for fn in (through_site, through_sdpa):
                fn()

                def synced(fn=fn):
                    fn()
                    torch.cuda.synchronize()

                plain, after_sync = per_call_us(fn, calls, repeats), per_call_us(synced, calls, repeats)
                with torch.autograd.set_multithreading_enabled(False):
                    calling = per_call_us(fn, calls, repeats)
                measured.append((plain, after_sync, calling))
            table.append((name, p, *measured))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the hand-off to autograd's device thread is what it measures")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}; "
             f"B 2, 4 heads, N 64, D 64, bf16, key padding (finite_added); host us per forward + backward, "
             f"median of {args.repeats} x {args.calls} calls", "",
             "| kernel | dropout | site | SDPA | site synced | SDPA synced | site, calling thread | "
             "SDPA, calling thread |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {p} | " + " | ".join(f"{us:.0f}" for us in (s, d, s_sync, d_sync, s_thread, d_thread)) + " |"
              for name, p, (s, s_sync, s_thread), (d, d_sync, d_thread) in rows(args.calls, args.repeats)]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
