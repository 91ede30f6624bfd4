"""Building a call's tile lists: PyTorch (``block_map.tile_state`` + ``TileLists.from_state``) against the one
Triton kernel (``triton_tile_lists.build``, with ``mask_any_all`` for a dense mask's grain), both uncached, as a new
batch's padding, documents or mask build them.

    python benchmarks/tile_lists_build.py [--out benchmarks/results/tile_lists_build.md]

For each case (causal + left padding, packed documents, window + documents, a dense boolean mask with causal;
B 4, 16 heads, the kernels' tiles: the forward's 128 x 128 map and the backward's transposed one) both builds are
first checked equal field by field, then timed: "host us" is one build's host time with the GPU idle before it
(median of 20), "total us" the time until its results are on the device (median of 20, synchronized). The
lists are what ``triton_flash``'s forward and backward and ``flex`` read; a training step of a new batch builds
two maps (the forward's, the backward's transposed one) once for all the layers sharing its terms.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from attnopt.kernels import block_map, triton_tile_lists
from attnopt.kernels.spec import Align, AttentionSpec, Window

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from host_cost import idle_host_and_total_us  # noqa: E402


def case_spec(name: str, n: int, device: str) -> AttentionSpec:
    b, h = 4, 16
    q = torch.empty(b, h, n, 128, device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    if name == "causal + left padding":
        pads = torch.randint(0, n // 2, (b, 1), generator=g)
        keep = torch.arange(n)[None, :] >= pads
        return AttentionSpec.from_tensors(q, q, q, causal=True, key_padding=keep.to(device))
    ids = torch.sort(torch.randint(0, 16, (b, n), generator=g), dim=1).values.to(device)
    if name == "documents (16 per row)":
        return AttentionSpec.from_tensors(q, q, q, causal=True, q_doc=ids, kv_doc=ids)
    if name == "window 1024 + documents":
        return AttentionSpec.from_tensors(q, q, q, causal=True, window=Window(1024, 0), q_doc=ids, kv_doc=ids)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & (torch.rand(b, 1, 1, n, generator=g) > 0.01)
    return AttentionSpec.from_tensors(q, q, q, align=Align.TOP_LEFT, mask=mask.to(device))


def torch_build(spec, transposed):
    devices, block_map.KERNEL_DEVICES = block_map.KERNEL_DEVICES, set()  # the dense mask's grain by PyTorch too
    try:
        state = block_map.tile_state(spec, 128, 128)
    finally:
        block_map.KERNEL_DEVICES = devices
    return block_map.TileLists.from_state(state.transpose(-1, -2) if transposed else state)


def kernel_build(spec, transposed):
    extra = None if spec.mask is None else block_map._state(*block_map._mask_any_all(spec.mask, 128, 128))
    return block_map.TileLists(*triton_tile_lists.build(spec, 128, 128, transposed, extra))


def new_mask() -> None:
    block_map._GRAINS.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--cases", nargs="+", default=None, metavar="TEXT",
                        help="only the cases whose name contains one of these (\"dense\", \"documents\")")
    args = parser.parse_args()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B 4, 16 heads, 128 x 128 tiles; "
             "medians of 20 uncached builds", "",
             "| case | N | map | PyTorch host us | PyTorch total us | kernel host us | kernel total us | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in ("causal + left padding", "documents (16 per row)", "window 1024 + documents",
                 "dense bool mask (causal, 1% keys dropped)"):
        if args.cases and not any(c in name for c in args.cases):
            continue
        for n in args.lengths:
            spec = case_spec(name, n, "cuda")
            for transposed in (False, True):
                want, got = torch_build(spec, transposed), kernel_build(spec, transposed)
                for field in ("partial_count", "partial_index", "full_count", "full_index", "full_run"):
                    assert torch.equal(getattr(want, field), getattr(got, field)), (name, n, transposed, field)
                # a new mask each time: its grain is not kept from one build to the next
                t_host, t_total = idle_host_and_total_us(lambda: torch_build(spec, transposed), 20, new_mask)
                k_host, k_total = idle_host_and_total_us(lambda: kernel_build(spec, transposed), 20, new_mask)
                lines.append(f"| {name} | {n} | {'backward (transposed)' if transposed else 'forward'} | "
                             f"{t_host:.0f} | {t_total:.0f} | {k_host:.0f} | {k_total:.0f} | "
                             f"{t_total / k_total:.1f}x |")
                print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
