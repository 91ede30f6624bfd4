"""``optimize`` and ``explain``: the user-facing entry points of the pass."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import re
import types

import torch
from torch._dynamo import eval_frame

from attnopt.backend import Backend, _given, compile_with, report_of
from attnopt.passes import pipeline, trial
from attnopt.passes.pipeline import settle_ready, waiting
from attnopt.config import Options
from attnopt.passes.graph import dotted_path
from attnopt.report import Fallback, Report


def optimize(model: torch.nn.Module, *, max_mem: int | str | None = None, exact: bool = True, **options):
    """Replace every attention ``model`` computes with attnopt's kernels, in place; return ``model``.

    Ownership is that of ``nn.Module.compile()``: there is one model. ``optimize`` sets
    ``model.forward`` to the model's forward compiled by torch.compile with attnopt's backend
    and returns the same object (same class, parameters, buffers and call signature; hooks
    still run around the forward). Keep ``copy.deepcopy(model)`` from before the call where
    the original code is still wanted. Each graph captured on a call is rewritten and run as
    is (``compiler="eager"``, the default: fast start) or through inductor
    (``compiler="inductor"``). What was found is in ``model.attnopt_report`` after the first call.

    The options stay attached to the model:

    * ``.eval()``, ``.train()``, ``.half()``, ``.to()``, ``load_state_dict`` act on it as on any
      module; what the captured graphs depend on (dtype, device, training) recompiles them.
    * ``copy.deepcopy(model)`` is an independent module optimized afresh with the same options:
      its own compiled forward and report (empty until its first call), its own weights.
    * ``pickle`` / ``torch.save(model)`` store the module and the options, not the compiled
      code; loading it (``torch.load(..., weights_only=False)``, with attnopt importable)
      optimizes it afresh, as ``deepcopy`` does. ``state_dict()`` holds the weights only.

    Options: ``max_mem`` (bytes, or "24GB" = 24·10^9 / "24GiB" = 24·2^30),
    ``exact`` (False allows approximate kernels), ``kernel`` (force one kernel by
    name), ``compiler``, ``mode`` (inductor's, with ``compiler="inductor"``), ``dynamic`` (passed to
    torch.compile), ``tol``, ``tune``, ``cache_dir``, ``keep_original`` (False replaces every supported
    site, even where the original code is faster), ``verify`` (compare each graph's rewrite with the
    original on its first inputs; see ``attnopt.Options``).
    Calling ``optimize`` again replaces the previous options and report.

    Every optimized model is captured on its own, however many are optimized in one process. When
    part of the forward runs without attnopt (dynamo runs a frame eagerly, or a graph break splits
    an attention), ``model.attnopt_report`` says where and why and an ``attnopt.AttnoptWarning`` is
    raised, once for each place.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize takes a torch.nn.Module, got {type(model).__name__}")
    _install(model, Options.build(max_mem=max_mem, exact=exact, **options), Report())
    return model


def settle(model, timeout: float | None = None) -> bool:
    """Finish what an optimized model left to its background: on the GPU, a site whose fastest kernel compiles
    Triton code (``triton_flash``) starts on the fastest kernel that compiles nothing, while that one compiles in
    a thread; the first call after the compile times it and switches the site if it is faster. ``settle`` waits
    for those compiles (at most ``timeout`` seconds in all; None: until they end) and times and switches the sites
    now, so that the next call runs the final kernels: call it before measuring a model, or before a CUDA graph
    capture. ``model``: a model returned by ``optimize``, or by ``torch.compile(..., backend="attnopt")``, after its
    first call (a compiled graph settles its sites before its own first call). True when no site is left to
    settle."""
    return pipeline.settle(report_of(model), timeout)


def explain(model, args=(), kwargs=None, *, max_mem: int | str | None = None, exact: bool = True, **options) -> Report:
    """Run ``model(*args, **kwargs)`` once and report what ``optimize`` would do; nothing is changed:
    the model keeps its forward, and buffers the forward writes (a step counter) are restored."""
    if not callable(model):
        raise TypeError(f"explain takes a module or function, got {type(model).__name__}")
    opts = Options.build(max_mem=max_mem, exact=exact, **options)
    report = Report()
    root = model if isinstance(model, torch.nn.Module) else None

    def backend(gm, example_inputs):  # named: torch.compile would take a partial's repr, the model's with it
        return _backend(gm, example_inputs, options=opts, report=report, dry_run=True, root=root)

    # the forward runs once: whatever it writes into the module's buffers (a step counter) is put back
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, torch.nn.Module) else []
    try:
        _watched(torch.compile(model, backend=backend, dynamic=opts.dynamic, **_ISOLATED), report)(*args, **(kwargs or {}))
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
    return report


#: call keys (``_OptimizedForward._call_key``) kept for calls that run the model's own forward
UNTOUCHED_CALLS = 256


class _OptimizedForward:
    """``model.forward`` after ``optimize``: the model's forward compiled with attnopt's backend.

    Set on the instance, so the class is untouched and ``nn.Module.__call__`` still runs the hooks
    around it (in eager mode, as before ``optimize``). Being part of the module's ``__dict__``, it
    travels with ``deepcopy`` and pickle, options and report included, and its ``__reduce__``
    optimizes the copy afresh: the compiled callable holds dynamo's caches, which are neither
    copied nor pickled.
    """

    def __init__(self, module: torch.nn.Module, options: Options, report: Report, original=None, prefix: str = ""):
        self.module, self.options, self.report, self.prefix = module, options, report, prefix
        #: an instance-level forward the user had set before ``optimize`` (None: the class's forward)
        self.original = original
        #: call keys whose calls run the model's own forward (``_call_key``), and (sites counted, any replaced)
        self._untouched: set = set()
        self._replaced = (-1, True)
        forward = types.MethodType(_own_code(type(module).forward), module) if original is None else original
        self.plain = forward

        def backend(gm, example_inputs):  # a function, not a partial: torch.compile names a backend by its
            # __name__ or else its repr, and the module's repr fails while a deepcopy or unpickling rebuilds it
            return _backend(gm, example_inputs, options=options, report=report, prefix=prefix, root=module)

        self.compiled = _watched(torch.compile(forward, backend=backend, dynamic=options.dynamic, **_ISOLATED), report)
        # name, docstring and signature of the forward it replaces (inspect.signature follows __wrapped__)
        functools.update_wrapper(self, types.MethodType(type(module).forward, module) if original is None else original)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced as part of an enclosing optimized forward: its graph
            return self.plain(*args, **kwargs)
        key = self._call_key(args, kwargs)
        if key is not None and key in self._untouched and not self._replaced_any():
            return self.plain(*args, **kwargs)
        settle_ready(self.report)  # sites whose compiling kernel is now compiled: timed, switched if faster
        tried = trial.running(self.report)
        if tried is not None and not waiting(self.report):  # the first inference calls choose between finalists
            out = tried.run(self.compiled, args, kwargs)
        else:
            out = self.compiled(*args, **kwargs)
        _mark_static_caches((*args, *kwargs.values()))
        if key is not None and not self._replaced_any() and len(self._untouched) < UNTOUCHED_CALLS:
            self._untouched.add(key)
        return out

    def _replaced_any(self) -> bool:
        """Whether any site of any graph captured so far runs a kernel (recounted when sites are added)."""
        sites = self.report.sites
        if self._replaced[0] != len(sites):
            self._replaced = (len(sites), any(s.replaced for s in sites))
        return self._replaced[1]

    def _call_key(self, args: tuple, kwargs: dict):
        """What picks the graphs of a call, as far as a call of the model's own code could differ: each argument
        (a tensor's shape, dtype, device and whether it requires grad; a plain value itself), the grad mode,
        autocast, the module's training flag and its first parameter's dtype and device. None for a call with
        another kind of argument (a cache object, a list): such calls always go through the compiled forward.

        A call whose key an earlier call had, while no site of any graph runs a kernel (every site left as it
        was: the original measured fastest, or not safe to replace), runs the model's own forward: its graphs
        hold the original code only, and running that code as written skips dynamo's frame, guards and the
        graphs run as Python (3-10% of a small step, ``benchmarks/results/padded_training.md``). The output is
        the original's by construction. Once a site anywhere runs a kernel, every call goes through the
        compiled forward again."""
        parts = [torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"),
                 self.module.training]
        first = next(iter(self.module.parameters()), None)
        if first is not None:
            parts.append((first.dtype, first.device))
        for name, value in [*((None, a) for a in args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                if type(value) is not torch.Tensor:
                    return None
                parts.append((name, tuple(value.shape), value.dtype, value.device, value.requires_grad))
            elif value is None or isinstance(value, (bool, int, float, str)):
                parts.append((name, type(value), value))
            else:
                return None
        return tuple(parts)

    def __reduce__(self):
        return _reoptimize, (self.module, self.options, self.report, self.original, self.prefix)


#: tensors of a Hugging Face cache layer that its eager first call marks as static addresses (``StaticLayer``
#: and the layers built like it, ``transformers/cache_utils.py``), by attribute: one tensor, or a list of them
_STATIC_CACHE_TENSORS = ("keys", "values", "cumulative_length", "indexer_keys", "indexer_cumulative_length",
                         "conv_states", "recurrent_states")


def _mark_static_caches(values) -> None:
    """Mark the tensors of compilable Hugging Face cache layers as static addresses, as their eager first call
    does.

    A static cache allocates its tensors on its first ``update`` and marks them with
    ``torch._dynamo.mark_static_address`` unless dynamo is tracing. Inside an optimized forward that first
    call (the prefill) is traced, so the marks are skipped, and the decode step that ``generate()`` compiles
    with CUDA graphs then finds its cache "mutated inputs" and runs without them. A mark only tells
    cudagraphs that the address stays fixed (it re-records if it moves); values are untouched.
    """
    for value in values:
        caches = [value, getattr(value, "self_attention_cache", None), getattr(value, "cross_attention_cache", None)]
        for cache in caches:
            for layer in getattr(cache, "layers", None) or ():
                if not (getattr(layer, "is_compileable", False) and getattr(layer, "is_initialized", False)):
                    continue
                for name in _STATIC_CACHE_TENSORS:
                    found = getattr(layer, name, None)
                    for tensor in found if isinstance(found, (list, tuple)) else (found,):
                        if isinstance(tensor, torch.Tensor) and not hasattr(tensor, "_dynamo_static_input_type"):
                            torch._dynamo.mark_static_address(tensor)


#: whether ``written_forward`` runs: a capture of the code as written, in which ``_EagerInInference`` breaks no graph
#: (``torch.compiler.is_exporting`` cannot tell: torch 2.11 answers True while dynamo compiles any frame)
_WRITTEN = [False]


@contextlib.contextmanager
def written_forward(module: torch.nn.Module):
    """``module``'s forward as written while the block runs: an optimized module's (``optimize``) instance-level
    forward is set aside, for a capture of the code itself (``attnopt.onnx.export`` rewrites it again)."""
    current = module.__dict__.get("forward")
    optimized = isinstance(current, _OptimizedForward)
    if optimized and current.original is None:
        del module.__dict__["forward"]
    elif optimized:
        module.forward = current.original
    _WRITTEN[0] = True
    try:
        yield
    finally:
        _WRITTEN[0] = False
        if optimized:
            module.forward = current


def _reoptimize(module: torch.nn.Module, options: Options, report: Report, original=None,
                prefix: str = "") -> _OptimizedForward:
    """Unpickling or deep-copying an optimized module: optimize the copy afresh with the same options.

    Runs while the copy's state is being rebuilt (its ``__dict__`` may still be empty); ``report``
    is the copy's ``attnopt_report`` as that state will set it, emptied here so that it describes
    the copy's own captures only.
    """
    report.__init__()
    return _OptimizedForward(module, options, report, original, prefix)


#: modules whose eager forward takes a fused fast path in inference that torch.compile skips while it traces:
#: ``torch._native_multi_head_attention`` (it reads ``is_causal`` and fully padded rows its own way) and the
#: encoder's nested tensors (padded rows 0). Under ``optimize`` their inference calls run eagerly (``_EagerInInference``)
FAST_PATH_MODULES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoder)


class _EagerInInference:
    """``forward`` of a ``FAST_PATH_MODULES`` module under ``optimize``: a call in inference (the module in eval, no
    gradient needed) runs the module's own forward eagerly (a graph break), where PyTorch picks its fast path as
    without ``optimize``; a call that trains or needs gradients is traced and rewritten (PyTorch's slow path)."""

    def __init__(self, module: torch.nn.Module, where: str, report: Report):
        self.module, self.where, self.report = module, where, report

    def __call__(self, *args, **kwargs):
        module = self.module
        if (not module.training and _may_take_fast_path(module, args, kwargs) and not _needs_grad(module, args, kwargs)
                and not _WRITTEN[0]):
            return _eagerly(self, *args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    def note(self) -> None:
        """Say once in the report (and a warning) that this module's inference calls run as PyTorch runs them."""
        kind = type(self.module).__name__
        self.report.add_fallback(Fallback(
            f"{self.where or 'the model'} (nn.{kind})",
            f"nn.{kind} in inference (eval, no gradient) runs as PyTorch runs it, unoptimized: its fused fast path, "
            "which torch.compile skips, treats rows without keys (and MultiheadAttention an is_causal hint) its own "
            "way; trained or with gradients it is rewritten"))


def _may_take_fast_path(module: torch.nn.Module, args, kwargs) -> bool:
    """False where PyTorch's conditions already rule its fast path out, so the traced code is what eager runs:
    a MultiheadAttention that is not ``batch_first`` or not self-attention (query, key and value one tensor), an
    encoder built without nested tensors."""
    if isinstance(module, torch.nn.TransformerEncoder):
        return getattr(module, "use_nested_tensor", True)
    qkv = [*args[:3], *(kwargs.get(name) for name in ("query", "key", "value")[len(args[:3]):])]
    return module.batch_first and len(qkv) == 3 and qkv[0] is qkv[1] and qkv[1] is qkv[2]


def _needs_grad(module: torch.nn.Module, args, kwargs) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


@torch._dynamo.disable
def _eagerly(wrapper: _EagerInInference, *args, **kwargs):
    wrapper.note()
    return type(wrapper.module).forward(wrapper.module, *args, **kwargs)


def _install(module: torch.nn.Module, options: Options, report: Report) -> None:
    for where, part in module.named_modules():
        current = part.__dict__.get("forward")
        if isinstance(part, FAST_PATH_MODULES) and (current is None or isinstance(current, _EagerInInference)):
            part.forward = _EagerInInference(part, where, report)
    for name, part in (("", module), *_called_apart(module)):
        original = part.__dict__.get("forward")
        if isinstance(original, _OptimizedForward):  # optimized again: start from what the first call replaced
            original = original.original
        part.forward = _OptimizedForward(part, options, report, original, f"{name}." if name else "")
    module.attnopt_report = report
    _generate_compiles_with_attnopt(module, options, report)


def _generate_compiles_with_attnopt(module: torch.nn.Module, options: Options, report: Report) -> None:
    """Hugging Face ``generate()`` compiles the decode step itself for compilable caches (a static cache on
    a GPU: ``torch.compile(model.__call__, backend="inductor", mode="reduce-overhead")``). Traced inside that
    compilation the optimized forward is its plain code, so the decode step would run the attention as
    written. Its compile configuration gets attnopt's backend instead: the same inductor compilation, with
    the rewrite (``compiler="inductor"``, the model's other options, its report). A backend the user chose
    is left alone."""
    config = getattr(module, "generation_config", None)
    if config is None or not hasattr(config, "compile_config"):
        return
    from transformers import CompileConfig

    current = config.compile_config
    if current is not None and not (current.backend == "inductor" or isinstance(current.backend, Backend)):
        return
    given = _given(options)
    given.update(compiler="inductor", mode=None)  # the mode is the compile configuration's own
    attnopt_config = copy.copy(current) if current is not None else CompileConfig()
    attnopt_config.backend = Backend(report=report, **given)
    config.compile_config = attnopt_config


def _called_apart(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Submodules that callers run on their own, not only through ``module``'s forward: a Hugging Face
    encoder-decoder's encoder, which ``generate()`` calls once before decoding. Each gets its own
    optimized forward (same options, same report); inside ``module``'s forward it is traced as plain code."""
    get_encoder = getattr(type(module), "get_encoder", None)
    if get_encoder is None:
        return []
    try:
        encoder = module.get_encoder()
    except Exception:  # a model whose get_encoder needs more than the model (or has no encoder): nothing apart
        return []
    if not isinstance(encoder, torch.nn.Module) or encoder is module:
        return []
    return [(name, sub) for name, sub in module.named_modules() if sub is encoder][:1]


#: each torch.compile of a model keeps its own compiled entries (torch >= 2.13): the frames a graph break
#: resumes in, shared by every instance of a class, then count against one model's recompile limit only
_ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}

#: where dynamo lists, during a call, the frames it declines to compile (None: a torch without it)
_TLS = eval_frame.dynamo_tls if hasattr(getattr(eval_frame, "dynamo_tls", None), "skip_reasons") else None
_RECOMPILE_LIMIT = "compilation failed with a custom frame execution strategy"
#: dynamo's skip reasons (``eval_frame.add_skip_reason``) meaning a frame of the model runs eagerly
_EAGER = {
    _RECOMPILE_LIMIT: (
        "dynamo reached its recompile limit (torch._dynamo.config.recompile_limit = {limit}) for this code: "
        "calls that none of its compiled versions accepts (a new dtype, device, train/eval state or "
        "shape) now run it eagerly, unoptimized; avoid the recompiles (dynamic=True where shapes "
        "change) or raise the limit"
    ),
    "an error was suppressed during compilation": (
        "dynamo could not compile this frame (a graph break it cannot resume from, e.g. inside a loop or "
        "a with-block) and runs it eagerly: attention computed in its own code is not optimized (the functions "
        "it calls are compiled on their own, and their attention is in this report); TORCH_LOGS=graph_breaks "
        "shows the break"
    ),
}
_SKIP = re.compile(r"^(?P<name>\S+) \((?P<file>.+):(?P<line>\d+)\): (?P<reason>.*)$", re.DOTALL)


def _note_eager_frames(skipped: list[str], report: Report) -> None:
    """Record in ``report`` (warning once) each frame dynamo declined to compile during a call, when that
    frame runs the user's code eagerly (frames of torch itself and frames without tensors are skipped by design)."""
    for entry in skipped:
        found = _SKIP.match(entry)
        if found is None:
            continue
        reason = found["reason"]
        why = _EAGER.get(reason)  # not "no ops traced" and the like: frames with nothing to optimize
        if why is not None:
            report.add_fallback(Fallback(f"{found['name']} ({found['file']}:{found['line']})",
                                         why.format(limit=torch._dynamo.config.recompile_limit)))


def _own_code(fn):
    """``fn`` with a code object of its own, so that its dynamo cache belongs to one module.

    Dynamo keeps compiled entries on the code object of the frame it compiles; a ``forward``
    shared by every instance of a class would put all optimized instances (each with its own
    backend) under one recompile limit, and past 8 the rest would silently run eager.
    """
    if not isinstance(fn, types.FunctionType):
        return fn
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    own.__qualname__, own.__module__ = fn.__qualname__, fn.__module__
    own.__dict__.update(fn.__dict__)
    return own


#: dynamo guards the hooks of the submodules it inlines: a hook registered on a layer after the first call
#: recompiles and runs, as it runs on the original (torch.compile skips those guards by default)
_HOOK_GUARDS = torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)


def _watched(compiled, report: Report):
    """``compiled`` as the user calls it: attnopt's own errors (a budget no plan fits, bad options) raised as
    themselves, not wrapped by dynamo; the frames dynamo runs eagerly during a call recorded in ``report``; the
    submodules' hooks guarded (``_HOOK_GUARDS``)."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        breaks = dict(torch._dynamo.utils.counters["graph_break"]) if not report.graphs else None
        with _HOOK_GUARDS:
            out = _call_noting_eager_frames(compiled, report, args, kwargs)
        if breaks is not None and not report.graphs and not report.fallbacks:  # a call that returned
            _note_nothing_captured(compiled, breaks, report)
        return out

    return call


def _call_noting_eager_frames(compiled, report: Report, args, kwargs):
    """``compiled(*args, **kwargs)``, recording in ``report`` the frames dynamo ran eagerly meanwhile."""
    if _TLS is None:  # a torch without dynamo's skip reasons: the recompile limit read off its counters
        limits = _recompile_limits()
        try:
            return _raising_own_errors(compiled, args, kwargs)
        finally:
            if _recompile_limits() > limits:
                why = _EAGER[_RECOMPILE_LIMIT].format(limit=torch._dynamo.config.recompile_limit)
                report.add_fallback(Fallback(f"{_where(compiled)} or code it calls", why))
    outer, _TLS.skip_reasons = _TLS.skip_reasons, []  # empty after the call once the model is warm
    try:
        return _raising_own_errors(compiled, args, kwargs)
    finally:
        skipped, _TLS.skip_reasons = _TLS.skip_reasons, outer
        if skipped:
            _note_eager_frames(skipped, report)
            if outer is not None:
                outer.extend(skipped)


def _recompile_limits() -> int:
    """How many times dynamo has met its recompile limit in this process (its ``unimplemented`` counters)."""
    return sum(count for reason, count in torch._dynamo.utils.counters["unimplemented"].items()
               if reason.startswith("Dynamo recompile limit exceeded"))


def _where(compiled) -> str:
    """The compiled forward as a report names code: "forward (model.py:42)"."""
    fn = getattr(compiled, "__wrapped__", compiled)
    fn = getattr(fn, "forward", fn)
    code = getattr(fn, "__code__", None)
    return (f"{getattr(fn, '__name__', type(fn).__name__)}"
            + (f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""))


def _note_nothing_captured(compiled, before: dict, report: Report) -> None:
    """A call that ran without dynamo handing attnopt any graph: the whole forward ran as written. Recorded (and
    warned once) with the graph breaks dynamo counted during the call, the likely cause."""
    after = torch._dynamo.utils.counters["graph_break"]
    new = [reason for reason, count in after.items() if count > before.get(reason, 0)]
    where = _where(compiled)
    why = "dynamo captured no graph from this call, so the model ran as written and nothing was optimized"
    if new:
        first = next((line.strip() for line in new[0].splitlines() if line.strip().startswith("Explanation:")),
                     (new[0].strip().splitlines() or ["(no reason given)"])[0])
        why += (f"; a graph break left it no tensor work to capture ({len(new)} kind(s) of break in the call; "
                f"the first: {first.removeprefix('Explanation: ')}; TORCH_LOGS=graph_breaks shows where)")
    report.add_fallback(Fallback(where, why))


def _raising_own_errors(compiled, args, kwargs):
    try:
        return compiled(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        inner = getattr(err, "inner_exception", None)
        if isinstance(inner, (ValueError, TypeError, NotImplementedError)):
            raise inner.with_traceback(None) from None
        raise


def _backend(gm, example_inputs, *, options: Options, report: Report, dry_run: bool = False, prefix: str = "",
             root: torch.nn.Module | None = None):
    """attnopt's backend for the forward of ``root`` (a submodule optimized apart when ``prefix`` names it): the
    graph compiled, its sites named from the model's root."""
    first = len(report.sites)
    compiled = compile_with(gm, example_inputs, options, report, dry_run=dry_run, settles_at_calls=True)
    owner = _frame_owner(gm, example_inputs, root) if root is not None else None
    if prefix or owner:
        report.sites[first:] = [_named_from_root(s, prefix, owner) for s in report.sites[first:]]
    return compiled


@dataclasses.dataclass(frozen=True)
class _Owner:
    """The submodule whose forward a graph runs, when it is not the optimized module itself (a frame dynamo resumes
    after a graph break inside that forward): ``path``, the one whose call the graph was captured on, and ``others``,
    the other modules of its class, whose calls run the same code."""

    root: torch.nn.Module
    kind: str
    path: str
    others: tuple[str, ...]


def _frame_owner(gm, example_inputs, root: torch.nn.Module) -> _Owner | None:
    """The submodule of ``root`` whose forward ``gm`` runs, found from the graph's lifted parameters and buffers
    (their sources name them from the frame's locals, their identity from ``root``); None when it is ``root``
    itself, when no parameter says, or when they disagree."""
    names: dict[int, list[str]] = {}  # a tensor's names: tied weights have several
    for name, t in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    prefixes = None  # the owner's path (with its dot) that every lifted tensor agrees on
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        local = id(value) in names and isinstance(name, str) and name.startswith("L[")  # from the frame's locals
        relative = dotted_path(name) if local else ""
        if not relative:
            continue
        these = {full[: len(full) - len(relative)] for full in names[id(value)]
                 if full == relative or full.endswith("." + relative)}
        prefixes = these if prefixes is None else prefixes & these
    if not prefixes or len(prefixes) != 1 or "" in prefixes:
        return None
    path = prefixes.pop().rstrip(".")
    kind = type(root.get_submodule(path))
    others = tuple(name for name, module in root.named_modules() if type(module) is kind and name and name != path)
    return _Owner(root, kind.__name__, path, others)


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _named_from_root(site, prefix: str, owner: _Owner | None):
    """``site`` with its module path from the model's root: ``prefix`` (a submodule optimized apart), then the
    submodule whose call the graph's frame was captured on, with a note naming the other modules of its class that
    have the same attention (``decoder.block.0`` captured, ``encoder.block.0`` too when its call passes dynamo's
    guards)."""
    where, notes = site.where, site.notes
    if owner is not None:
        inner = "" if where == "(top level)" else where
        where = f"{owner.path}.{inner}" if inner else owner.path
        alike = [p for p in owner.others if not inner or _has_submodule(owner.root, f"{p}.{inner}")]
        if alike:
            notes = (*notes, f"captured on {prefix}{owner.path}'s call ({owner.kind}.forward resumed after a graph "
                             f"break); it is also the code of {', '.join(prefix + p for p in alike)}, whose calls "
                             "run this graph where they pass dynamo's guards, and a graph of their own where not")
    return dataclasses.replace(site, where=prefix + where, notes=notes)
