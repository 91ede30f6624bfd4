"""``attnopt`` command line: ONNX pipelines for scripts.

    attnopt onnx fuse in.onnx -o out.onnx [--opset 23] [--verify] [--pack-qkv] [--dim batch=2 ...]
    attnopt onnx export package.module:factory -o out.onnx --input 2x16xfloat32 [--verify]

``export`` imports ``factory`` (a callable returning an ``nn.Module``, or the
module itself) and exports it on random inputs of the given shapes. Modules are
found as ``python -m`` finds them: the current directory first, then ``sys.path``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from attnopt import onnx as aonnx

    report = aonnx.OnnxReport()
    try:
        _check_paths(args)
        if args.pipeline == "fuse":
            import onnx

            model = aonnx.fuse(args.model, opset=args.opset, dims=_dims(args.dim), verify=args.verify,
                               pack_qkv=args.pack_qkv, target=args.target,
                               runtime_fusions=False if args.no_runtime_fusions else None, report=report)
            if not report.attention_nodes:
                raise ValueError(_nothing_fused(args.model, report))
            onnx.save(model, args.output)
        else:
            module = _load(args.model)
            inputs = tuple(_random_input(spec) for spec in args.input)
            aonnx.export(module, inputs, args.output, opset=args.opset, verify=args.verify, report=report)
    except (ValueError, TypeError) as err:
        print(f"attnopt: error: {err}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report)
    if args.verify and report.max_diff is not None and not report.max_diff <= args.tolerance:
        print(f"attnopt: verification failed: max difference {report.max_diff:.3g} > {args.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnopt", description="attnopt: attention compiler pass")
    parser.add_argument("--version", action="version", version=_version())
    tools = parser.add_subparsers(dest="tool", required=True)
    onnx_cmd = tools.add_parser("onnx", help="ONNX pipelines: fuse attention in a graph, export a torch model")
    pipelines = onnx_cmd.add_subparsers(dest="pipeline", required=True)
    fuse = pipelines.add_parser("fuse", help="replace decomposed attention in an ONNX file with Attention nodes")
    fuse.add_argument("model", help="input .onnx file")
    fuse.add_argument("--pack-qkv", action="store_true",
                      help="also merge the q/k/v projections of one input into one MatMul")
    fuse.add_argument("--target", choices=("onnx", "onnxruntime"), default="onnx",
                      help="onnxruntime: ONNX Runtime's com.microsoft.Attention / MultiHeadAttention where exact "
                           "(the standard Attention elsewhere) and its exact Gelu, BiasGelu and RMS-norm fusions; "
                           "the graph then runs on ONNX Runtime only")
    fuse.add_argument("--no-runtime-fusions", action="store_true",
                      help="with --target onnxruntime: fuse attention only, leave the rest of the graph")
    fuse.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                      help="size of a symbolic input dim for analysis and --verify (repeatable)")
    export = pipelines.add_parser("export", help="export a torch model with Attention nodes")
    export.add_argument("model", help="module:attribute, an nn.Module or a callable returning one")
    export.add_argument("--input", action="append", required=True, metavar="2x16xfloat32",
                        help="shape and dtype of one positional input, random values (repeatable)")
    for sub in (fuse, export):
        sub.add_argument("-o", "--output", required=True, help="output .onnx file")
        sub.add_argument("--opset", type=int, default=23, help="ONNX opset, 23 or higher (default 23)")
        sub.add_argument("--verify", action="store_true", help="run ONNX Runtime against the source")
        sub.add_argument("--tolerance", type=float, default=1e-4, help="largest difference --verify accepts")
        sub.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _nothing_fused(path: str, report) -> str:
    if not report.sites:
        return f"nothing to fuse in {path!r}: no softmax attention (softmax of a query-key product) was found"
    reasons = "; ".join(dict.fromkeys(s.reason for s in report.sites if s.reason))
    return f"nothing fused in {path!r}: {len(report.sites)} attention site(s) left alone ({reasons})"


def _dims(pairs: list[str]) -> dict[str, int]:
    dims = {}
    for pair in pairs:
        name, _, size = pair.partition("=")
        if not name or not size.isdigit():
            raise SystemExit(f"attnopt: --dim {pair!r} is not NAME=SIZE with a positive integer size")
        dims[name] = int(size)
    return dims


def _version() -> str:
    from attnopt import __version__

    return f"attnopt {__version__} (torch {torch.__version__})"


def _check_paths(args) -> None:
    """Missing input files and output folders as one-line errors, before any work."""
    if args.pipeline == "fuse" and not os.path.isfile(args.model):
        raise ValueError(f"input model {args.model!r} is not a file")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write -o {args.output!r}: folder {folder!r} does not exist")


def _load(target: str) -> torch.nn.Module:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model {target!r} is not 'package.module:attribute'")
    # a console script's sys.path starts at its own folder; ``python -m`` puts the current directory first
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise ValueError(f"no module named {err.name!r} in the current directory ({cwd}) or on sys.path "
                             f"(model {target!r})") from None
        raise ValueError(f"importing {module_name!r} failed: {err}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise ValueError(f"module {module_name!r} ({where}) has no attribute {attribute!r}")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{target} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _random_input(spec: str) -> torch.Tensor:
    *sizes, dtype_name = spec.split("x")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not all(s.isdigit() for s in sizes):
        raise ValueError(f"--input {spec!r} is not sizes and a dtype, e.g. 2x16x32xfloat32")
    shape = [int(s) for s in sizes]
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape) > 0.3
    return torch.randint(0, 2, shape, dtype=dtype)


if __name__ == "__main__":
    raise SystemExit(main())
