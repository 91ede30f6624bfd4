"""Host time per attention call: what attnopt adds over launching the chosen kernel directly.

Each site of an optimized model (``compiler="eager"``) calls the ``attnopt.ops.SiteCall`` that the
rewrite made for it: an inference call goes straight to the kernel chosen at rewrite time, a
training call runs the ``attnopt::attention`` op's body and autograd without its dispatch. On
shapes so small that the kernel takes a few microseconds (and, on a GPU, the device keeps up with the
host), the time per call is host time. Columns, per kernel:

* ``direct``: the kernel itself: ``F.scaled_dot_product_attention`` with the backend already
  selected (SDPA kernels), ``kernel.forward`` with a prebuilt spec (the others);
* ``site``: the site's call under ``torch.no_grad()``, what an optimized model runs in inference;
* ``op``: ``torch.ops.attnopt.attention``, what a training step or a compiled graph runs;
* ``site - direct``: the host work attnopt adds per inference call (target: at most 15 us).

On CUDA, the Triton kernels are timed twice, in both tables: through Triton's own launch, and as
``... (bound launch)`` with the compiled kernel's launcher bound once per call signature
(``kernels/launch.py``, on unless ``ATTNOPT_BOUND_LAUNCH=0``). ``--kernels`` keeps some kernels' rows only.

A second table times one training call, forward and backward (the output's gradient given, no
optimizer): ``direct`` is SDPA under autograd with the backend selected (SDPA kernels) or
``kernel.forward`` then ``kernel.backward`` on a prebuilt spec (the others); ``site`` the site's call
under autograd (the op's body and autograd as an ``autograd.Function``, without the op's dispatch);
``op`` the ``attnopt::attention`` op under autograd, what a compiled graph's training step runs.

    python benchmarks/dispatch.py                   # CUDA when available, else CPU
    python benchmarks/dispatch.py --device cpu --out benchmarks/results/dispatch_cpu.md
    python benchmarks/dispatch.py --kernels sdpa_cudnn triton_flash triton_decode --calls 300 --repeats 3
    python benchmarks/dispatch.py --kernels sdpa_cudnn triton_flash --profile 25   # where a site's host time goes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import platform
import pstats
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import launch, registry
from attnopt.ops import SiteCall, spec_from_args

#: SDPA kernels and the backend their direct call pins (None: whatever SDPA picks on the CPU)
SDPA_BACKENDS = {
    "sdpa_cpu": None,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
#: the bound launch's setting as this process started (``ATTNOPT_BOUND_LAUNCH``), restored after the rows
BOUND_DEFAULT = launch.BOUND
KERNELS = {"cuda": ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "triton_flash", "triton_decode", "flex"),
           "cpu": ("sdpa_cpu", "reference")}


@dataclass(frozen=True)
class Case:
    name: str
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool
    align: str
    #: a padded batch of two (BERT's call: key padding added as ``finfo.min``, ``fill="finite_added"``)
    padded: bool = False

    @property
    def batch(self) -> int:
        return 2 if self.padded else 1

    @property
    def fill(self) -> str:
        return "finite_added" if self.padded else "-inf"


#: a prefill tile, a decode step and an encoder's padded batch per device: on the CPU tiny enough that the
#: kernel is a few us
CASES = {
    "cuda": (Case("prefill causal", 4, 4, 64, 64, 64, True, "top_left"),
             Case("decode GQA", 8, 2, 1, 256, 64, True, "bottom_right"),
             Case("padded encoder", 4, 4, 64, 64, 64, False, "top_left", padded=True),
             Case("padded decode GQA", 16, 4, 1, 4097, 128, True, "bottom_right", padded=True)),
    "cpu": (Case("prefill causal", 2, 2, 16, 16, 16, True, "top_left"),
            Case("decode GQA", 4, 2, 1, 64, 16, True, "bottom_right"),
            Case("padded encoder", 2, 2, 16, 16, 16, False, "top_left", padded=True)),
}
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}


def per_call_us(calls_of: dict, device: torch.device, calls: int = 1000, repeats: int = 5,
                contexts: dict | None = None) -> dict:
    """``{name: microseconds}``: per callable, the median over ``repeats`` of the mean wall time of ``calls``
    back-to-back calls. The callables take turns in each repeat, so that load from elsewhere on the
    machine slows them alike. ``contexts``: per name, a context manager factory entered around its
    timed calls (outside the timing)."""
    contexts = contexts or {}
    for name, fn in calls_of.items():
        with contexts.get(name, contextlib.nullcontext)():
            for _ in range(50):
                fn()
    # on the CPU everything runs on this thread: its CPU time leaves out the time other processes take
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    times = {name: [] for name in calls_of}
    for _ in range(repeats):
        for name, fn in calls_of.items():
            with contexts.get(name, contextlib.nullcontext)():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = clock()
                for _ in range(calls):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((clock() - start) / calls * 1e6)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def direct_call(name: str, q, k, v, spec):
    """The kernel without attnopt, and the SDPA backend to select around the timed calls (once, as a model
    does): SDPA as a model calls it (a padding mask built once, as a model builds it once per forward for
    every layer), or the kernel's ``forward`` on a prebuilt spec. None where no direct SDPA call computes the
    spec (SDPA's ``is_causal`` is top-left)."""
    if name not in SDPA_BACKENDS:
        kernel = registry.get(name)
        return (lambda: kernel.forward(q, k, v, spec, 0)), None
    mask = None
    if spec.key_padding is not None:  # HF's (1 - mask) * finfo.min, [B, 1, 1, Nk]
        mask = (~spec.key_padding[:, None, None, :]).to(q.dtype) * torch.finfo(q.dtype).min
    hides_nothing = spec.band_hides_nothing()
    if spec.causal and spec.align.value != "top_left" and not hides_nothing:
        return None, None
    causal = spec.causal and not hides_nothing
    gqa = spec.group_size > 1
    if gqa and name == "sdpa_efficient":  # its fused kernel takes equal head counts only (torch 2.11):
        # the model's own repeat_kv, made once here so that only SDPA is timed
        k, v = (t.repeat_interleave(spec.group_size, dim=1) for t in (k, v))
        gqa = False

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale,
                                              enable_gqa=gqa)

    return call, SDPA_BACKENDS[name]


def case_inputs(case: Case, device: torch.device, dtype: torch.dtype):
    """q, k, v of a case (random), a generator to draw more from, the op's five term tensors (key padding,
    documents, bias, mask; a padded case's second row keeps its first three quarters of keys) and its static
    arguments."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(case.batch, case.q_heads, case.q_len, case.head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(case.batch, case.kv_heads, case.kv_len, case.head_dim, generator=g).to(device, dtype)
            for _ in range(2))
    terms = [None] * 5
    if case.padded:
        keep = torch.ones(case.batch, case.kv_len, dtype=torch.bool, device=device)
        keep[1, 3 * case.kv_len // 4:] = False
        terms[0] = keep
    return q, k, v, g, tuple(terms), (case.head_dim ** -0.5, case.causal, case.align, None, None, None)


def rows(device: torch.device, dtype: torch.dtype, calls: int = 1000, repeats: int = 5,
         kernels: tuple[str, ...] | None = None) -> list[tuple]:
    table = []
    for case in CASES[device.type]:
        q, k, v, _, terms, static = case_inputs(case, device, dtype)
        tensors = (q, k, v, *terms)
        spec = spec_from_args(*tensors, *static, 0.0, case.fill)
        for name, bound in variants(device, kernels):
            if registry.get(name).not_supported_reasons(spec):
                continue
            launch.BOUND = bound
            site = SiteCall(name, *static, case.fill)  # as the rewrite makes it
            direct, backend = direct_call(name, q, k, v, spec)
            calls_of = {
                "site": lambda: site(*tensors, 0.0),
                "op": lambda: torch.ops.attnopt.attention.default(*tensors, *static, 0.0, case.fill, name),
            }
            contexts = {}
            if direct is not None:
                calls_of["direct"] = direct
            if backend is not None:  # selected around the direct calls only: the site selects its own
                contexts["direct"] = lambda: sdpa_kernel([backend])
            with torch.no_grad():
                us = per_call_us(calls_of, device, calls, repeats, contexts)
            direct_us = us.get("direct", float("nan"))
            label = f"{name} (bound launch)" if bound else name
            table.append((case.name, label, direct_us, us["site"], us["op"], us["site"] - direct_us))
    launch.BOUND = BOUND_DEFAULT
    return table


def variants(device: torch.device, kernels: tuple[str, ...] | None = None) -> list[tuple[str, bool]]:
    """(kernel, bound launch) pairs of ``kernels`` (default: all of the device's): the Triton kernels twice on
    CUDA, through Triton's launch and bound (``kernels/launch.py``)."""
    return [(name, bound) for name in KERNELS[device.type] if kernels is None or name in kernels
            for bound in ((False, True) if device.type == "cuda" and name.startswith("triton") else (False,))]


def training_rows(device: torch.device, dtype: torch.dtype, calls: int = 1000, repeats: int = 5,
                  kernels: tuple[str, ...] | None = None) -> list[tuple]:
    """Per case and kernel: (case, kernel, direct, site, op) microseconds of one forward + backward."""
    table = []
    for case in CASES[device.type]:
        q, k, v, g, terms, static = case_inputs(case, device, dtype)
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        grad = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(device, dtype)
        spec = spec_from_args(q, k, v, *terms, *static, 0.0, case.fill).with_(requires_grad=True)
        for name, bound in variants(device, kernels):
            kernel = registry.get(name)
            if kernel.not_supported_reasons(spec):
                continue
            launch.BOUND = bound
            site = SiteCall(name, *static, case.fill)
            direct, backend = direct_call(name, q, k, v, spec)
            if name in SDPA_BACKENDS and direct is not None:
                sdpa_call = direct
                direct = lambda: torch.autograd.backward(sdpa_call(), grad)  # noqa: E731
            elif name not in SDPA_BACKENDS:
                def direct(kernel=kernel):
                    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
                    return kernel.backward(grad, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
            calls_of = {
                "site": lambda: torch.autograd.backward(site(q, k, v, *terms, 0.0)[0], grad),
                "op": lambda: torch.autograd.backward(torch.ops.attnopt.attention.default(
                    q, k, v, *terms, *static, 0.0, case.fill, name)[0], grad),
            }
            contexts = {}
            if direct is not None:
                calls_of["direct"] = direct
            if backend is not None:
                contexts["direct"] = lambda: sdpa_kernel([backend])
            us = per_call_us(calls_of, device, calls, repeats, contexts)
            label = f"{name} (bound launch)" if bound else name
            table.append((case.name, label, us.get("direct", float("nan")), us["site"], us["op"]))
    launch.BOUND = BOUND_DEFAULT
    return table


def profile_sites(device: torch.device, dtype: torch.dtype, kernels: tuple[str, ...] | None, top: int,
                  calls: int = 300) -> str:
    """cProfile of ``calls`` site calls per case and kernel (bound launch where there is one), inference and
    training (forward + backward), as text: the ``top`` functions by own time."""
    out = []
    for case in CASES[device.type]:
        q, k, v, g, terms, static = case_inputs(case, device, dtype)
        grad = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(device, dtype)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        spec = spec_from_args(q, k, v, *terms, *static, 0.0, case.fill)
        for name in (n for n in KERNELS[device.type] if kernels is None or n in kernels):
            if registry.get(name).not_supported_reasons(spec):
                continue
            site = SiteCall(name, *static, case.fill)
            for label, call in (("inference", lambda: site(q, k, v, *terms, 0.0)),
                                ("training", lambda: torch.autograd.backward(site(qg, kg, vg, *terms, 0.0)[0], grad))):
                with torch.no_grad() if label == "inference" else contextlib.nullcontext():
                    for _ in range(50):
                        call()
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(calls):
                        call()
                    profiler.disable()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out.append(f"### {case.name}, {name}, {label} ({calls} calls)\n")
                out.append("| own us per call | with callees | calls per call | function |\n|---|---|---|---|")
                stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive, calls, own, cumulative, ..)
                for (file, line, func), (_, n, own, cum, _) in sorted(stats.items(), key=lambda s: -s[1][2])[:top]:
                    where = func if file == "~" else f"{'/'.join(file.split('/')[-2:])}:{line} {func}"
                    out.append(f"| {own / calls * 1e6:.1f} | {cum / calls * 1e6:.1f} | {n / calls:g} | `{where}` |")
                out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: host time, not the kernel's parallelism, is measured)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--kernels", nargs="+", metavar="NAME", help="only these kernels' rows (default: all)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of the tables: each site call's N costliest functions (cProfile, own time)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    if args.threads < 1 or args.calls < 1 or args.repeats < 1:
        parser.error(f"--threads {args.threads}, --calls {args.calls}, --repeats {args.repeats}: each must be >= 1")
    unknown = sorted(set(args.kernels or ()) - set(KERNELS[device.type]))
    if unknown:
        parser.error(f"--kernels {unknown}: not timed on {device.type}; choose from {list(KERNELS[device.type])}")
    kernels = tuple(args.kernels) if args.kernels else None
    torch.set_num_threads(args.threads)
    dtype = DTYPES[device.type]
    if args.profile:
        print(profile_sites(device, dtype, kernels, args.profile))
        return
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    shapes = "; ".join(f"{c.name}: B={c.batch}, H={c.q_heads}/{c.kv_heads}, Nq={c.q_len}, Nk={c.kv_len}, "
                       f"D={c.head_dim}" + (", key padding (fill finite_added)" if c.padded else "")
                       for c in CASES[device.type])
    lines = [f"{name}, torch {torch.__version__}, {dtype}; host microseconds per call, medians of "
             f"{args.repeats} x {args.calls} calls", "", f"Shapes: {shapes}.", "",
             "| case | kernel | direct | site (inference) | op (training / compiled) | site - direct |",
             "|---|---|---|---|---|---|"]
    for case, kernel, direct, site, op, extra in rows(device, dtype, args.calls, args.repeats, kernels):
        lines.append(f"| {case} | {kernel} | {direct:.1f} | {site:.1f} | {op:.1f} | {extra:+.1f} |")
    lines += ["", "One training call, forward + backward (host microseconds, same method):", "",
              "| case | kernel | direct | site (training) | op (training) | site - direct |", "|---|---|---|---|---|---|"]
    for case, kernel, direct, site, op in training_rows(device, dtype, max(1, args.calls // 4), args.repeats, kernels):
        lines.append(f"| {case} | {kernel} | {direct:.1f} | {site:.1f} | {op:.1f} | {site - direct:+.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
