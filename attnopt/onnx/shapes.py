"""Symbolic shapes of an ONNX graph's values, as the SymInts a dynamo graph with dynamic shapes holds.

Each symbolic input dim (``batch``, ``seq``) is one symbol of a ShapeEnv. ONNX
Runtime's symbolic shape inference names every other value's dims in those
symbols (``seq``, ``seq + 1``) or as unknowns. A dim becomes:

* an int where inference proves it static;
* an expression in the input symbols where inference derives it and the
  expression agrees with the size observed on the example inputs;
* a fresh symbol otherwise (an unknown, a broadcast inference could not
  resolve, a disagreement with the example): nothing can be proven from it.

So ``Nk - Nq`` is the number 0 only when both lengths are the same input dim,
and a mask built from ``Range(0, seq)`` keeps its symbolic length.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile

import onnx
import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

Dim = int | str | None  # static size, symbolic expression, unknown


class SymbolicShapes:
    """Maps value names to shapes of ints and SymInts sharing one ShapeEnv."""

    def __init__(self, model: onnx.ModelProto, sizes: dict[str, int]):
        self.env = ShapeEnv()
        self.symbols = {name: self._symbol(size, name) for name, size in sizes.items()}
        self._unknown: dict[str, sympy.Expr] = {}
        self.dims = inferred_dims(model)

    def _symbol(self, hint: int, name: str) -> sympy.Expr:
        # DYNAMIC: two dims with equal hints are still different symbols; sizes 0 and 1 are not specialized
        return self.env.create_symbol(hint, ConstantSource(f"onnx_dim_{name}"), dynamic_dim=DimDynamic.DYNAMIC,
                                      do_not_specialize_zero_one=True)

    def shape(self, name: str, observed: tuple[int, ...]) -> tuple:
        """The shape of value ``name``, whose size on the example inputs was ``observed``."""
        declared = self.dims.get(name)
        if declared is None or len(declared) != len(observed):
            declared = [None] * len(observed)
        return tuple(self._dim(d, size, f"{name}/{axis}") for axis, (d, size) in enumerate(zip(declared, observed)))

    def _dim(self, declared: Dim, size: int, where: str):
        if isinstance(declared, int):
            return size if declared == size else self._fresh(where, size)
        if isinstance(declared, str):
            expr = self._parse(declared)
            if expr is None:  # an unknown of inference's own: the same name is the same size
                return self._unknown_dim(declared, size, where)
            if expr.is_Integer:
                return int(expr) if int(expr) == size else self._fresh(where, size)
            hint = expr.xreplace({s: self.env.var_to_val[s] for s in expr.free_symbols})
            if hint == size:
                return self.env.create_symintnode(expr, hint=size)
        return self._fresh(where, size)

    def _parse(self, text: str) -> sympy.Expr | None:
        names = {n: s for n, s in self.symbols.items()}
        try:
            expr = sympy.sympify(text, locals={n: sympy.Symbol(n) for n in names})
        except (sympy.SympifyError, SyntaxError, TypeError):
            return None
        if not all(str(s) in names for s in expr.free_symbols):
            return None
        return expr.xreplace({sympy.Symbol(n): s for n, s in names.items()})

    def _unknown_dim(self, name: str, size: int, where: str):
        if name not in self._unknown:
            self._unknown[name] = self._symbol(size, name)
        symbol = self._unknown[name]
        if self.env.var_to_val[symbol] != size:
            return self._fresh(where, size)
        return self.env.create_symintnode(symbol, hint=size)

    def _fresh(self, where: str, size: int):
        return self.env.create_symintnode(self._symbol(size, f"fresh_{where}"), hint=size)


def inferred_dims(model: onnx.ModelProto) -> dict[str, list[Dim]]:
    """Every value's dims by ONNX Runtime's symbolic shape inference, else as the model declares them."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return _declared_dims(model.graph)
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # unresolved broadcasts are logged: they stay unknown here
    try:
        # where inference stays incomplete it saves the model to the working directory before raising
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
    except Exception:  # an op it does not know: ONNX's own inference (``model`` holds its value_info)
        inferred = model
    finally:
        logger.setLevel(level)
    return _declared_dims(inferred.graph)


def _declared_dims(graph: onnx.GraphProto) -> dict[str, list[Dim]]:
    dims = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return dims


def is_symbolic(size) -> bool:
    return isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None
