"""Launching an autotuned Triton kernel with little host time: the tuned configuration remembered, and
(when ``BOUND`` is on) the compiled kernel called through its launcher, bound once per call signature.

``kernel[grid](*args)`` spends tens of microseconds of host time before the GPU sees anything: the
autotuner's bookkeeping, then Triton's binder, which specializes each of some 56 arguments again on
every call. A decode step's kernel takes less GPU time than that.

``launch`` remembers the autotuner's choice per tuning key (after its first call the configuration goes
straight to the JIT function). With ``BOUND`` it goes further: per *call signature* (each argument's
type; a tensor's dtype and 16-byte alignment; every other argument's value) it keeps the compiled kernel
and the order in which Triton hands the arguments to its launcher, and later calls of that signature
call the launcher directly. The signature keys each runtime argument as Triton's own specialization does, or finer: an integer by
its type (int32 or int64 range), equality to 1 and divisibility by 16, a float by its type only, a bool by
its value. So a bound kernel is always the one Triton would have picked, and a decode step whose cache grows
by one key each call stays on the bound path (its lengths are new values, not new specializations).
Constexpr arguments are keyed by value, as Triton compiles one kernel per value.

How Triton passes arguments to its launcher differs between versions (all of them, or only the
non-constexpr ones). It is not guessed: the first call of a signature goes through Triton's own path
while the launcher is watched, and the arguments it received are compared with the call's, each tensor
by identity. A kernel whose launch does not match either way, or that runs with Triton's launch hooks
(profilers) set, keeps Triton's path. Under the interpreter (``TRITON_INTERPRET=1``) nothing compiles
and nothing is bound.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import operator
import os
from collections import OrderedDict

import torch

log = logging.getLogger("attnopt")

#: call the compiled kernel through its bound launcher; ``ATTNOPT_BOUND_LAUNCH=0`` keeps Triton's own launch.
#: On by default since the whole GPU suite passed with it (H200, Triton 3.6) and it cut an inference launch
#: from 84 to 74 us of host time (``benchmarks/results/dispatch.md``)
BOUND = os.environ.get("ATTNOPT_BOUND_LAUNCH", "1") != "0"
#: bound call signatures kept (lengths that change every call would otherwise grow it without end)
SIGNATURES = 256

#: (id of the autotuned kernel, its tuning key, argument dtypes) -> (the kernel, the configuration its autotuner
#: chose); keyed by id since an autotuner hashes its JIT function's source digest
_TUNED: dict = {}
#: (the JIT function's ``_Kernel.id``, device, configuration, call signature) -> _Bound
_BOUND: OrderedDict = OrderedDict()


class _Bound:
    """A compiled kernel, how its launcher takes the arguments, and the configuration's meta-parameters."""

    __slots__ = ("run", "compiled", "order", "config", "pick")

    def __init__(self, run, compiled, order: list[int], config: dict):
        # the compiled kernel is held: its module stays loaded while the launcher may call its function
        self.run, self.compiled, self.order, self.config = run, compiled, order, config
        #: the launcher's arguments out of a call's values, as a tuple (in C: a list comprehension over seventy
        #: arguments cost 4 us)
        self.pick = _getter(order)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel (``triton.autotune`` around ``triton.jit``) or a
    plain ``triton.jit`` function (its launch options, such as ``num_warps``, among the keyword arguments)."""
    fn = getattr(kernel, "fn", None)
    if fn is None or not hasattr(kernel, "keys"):  # a JIT function: the options given are its configuration
        if not BOUND or _interpreted():  # (an interpreted function has no parameters to read)
            kernel[grid](*args, **kwargs)
            return
        fn, state = kernel, _state(kernel)
        params = state.param_names
        config = {name: value for name, value in kwargs.items() if name not in params}
    else:
        # the tuning keys hold every switch the configuration depends on; of the dtypes only the inputs'
        # matters (a term's dtype changes the compiled code, which the JIT keys on, not the best tile shape)
        key = (id(kernel), tuple([kwargs[name] for name in kernel.keys]), args[0].dtype)
        tuned = _TUNED.get(key)
        if tuned is None or tuned[0] is not kernel:
            kernel[grid](*args, **kwargs)
            _TUNED[key] = (kernel, kernel.best_config.all_kwargs())
            return
        config = tuned[1]
        kwargs.update(config)
        state = None if not BOUND or _interpreted() else _state(fn)
    if state is None or state.unbindable:
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    names = state.names
    try:
        values = [*args, *[kwargs[name] for name in names[len(args):]]]
    except KeyError as missing:  # a parameter left to its default: Triton's binder fills it in
        _unbindable(fn, f"parameter {missing} is not passed")
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    driver = _driver()
    device = driver.get_current_device()  # Triton keeps compiled kernels per device
    signature = (state.id, device, tuple(sorted(config.items())), *_signature(fn, values, state))
    bound = _BOUND.get(signature)
    if bound is None:
        _bind(fn, grid, args, kwargs, values, signature, config)  # launches through Triton
        return
    _BOUND.move_to_end(signature)
    if _hooks():
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    g = grid(bound.config) if callable(grid) else grid
    compiled = bound.compiled
    bound.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, driver.get_current_stream(device),
              compiled.function, compiled.packed_metadata, None, None, None, *bound.pick(values))


class _Kernel:
    """What the launches of one JIT function share, found once: its parameters, the layouts of its calls, and
    whether its launch could be bound. Kept by the function's ``id`` with the function itself (so the id is never
    another's while kept): a JIT function hashes by its source's digest, behind a lock, which a launch that looks
    it up in a few dictionaries paid for about 25 times (``benchmarks/host_cost.py --detail``)."""

    __slots__ = ("fn", "id", "names", "constexprs", "param_names", "layouts", "unbindable")

    def __init__(self, fn):
        self.fn, self.id = fn, next(_IDS)
        self.names = [p.name for p in fn.params]
        self.constexprs = frozenset(i for i, p in enumerate(fn.params) if p.is_constexpr)
        self.param_names = frozenset(self.names)
        self.layouts: dict = {}  # argument types -> the getters of ``_layout`` and the layout's id
        self.unbindable = False


def _state(fn) -> _Kernel:
    state = _KERNELS.get(id(fn))
    if state is None or state.fn is not fn:
        state = _KERNELS[id(fn)] = _Kernel(fn)
    return state


def unbindable(fn) -> bool:
    """Whether ``fn``'s launches keep Triton's own path (its launch could not be bound)."""
    state = _KERNELS.get(id(fn))
    return state is not None and state.fn is fn and state.unbindable


def _signature(fn, values: list, state: _Kernel | None = None) -> tuple:
    """What of ``values`` decides the kernel Triton compiles, as a short tuple: the arguments' types (as the id of
    their layout), the non-tensor arguments' specializations (``_specialization``; constexprs by value: as the id
    of that specialization, looked up by the arguments' exact values, which the layers of a forward and the calls
    of a decode step repeat) and each tensor's dtype and 16-byte alignment. Specializing 78 arguments one by one
    costs about 27 us of host time per launch; two equal signatures mean equal specializations, as before."""
    state = state or _state(fn)
    types = tuple(map(type, values))
    layout = state.layouts.get(types)
    if layout is None:
        layout = state.layouts[types] = _layout(fn, types)
    tensors_of, scalars_of, positions, layout_id = layout
    scalars = scalars_of(values)
    key = (layout_id, scalars)
    special = _SCALARS.get(key)
    if special is None:
        constexprs = state.constexprs
        found = tuple([v if i in constexprs else _specialization(v) for i, v in zip(positions, scalars)])
        special = _SCALARS[key] = _intern(found)
        while len(_SCALARS) > SIGNATURES:
            _SCALARS.popitem(last=False)
    return layout_id, special, tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors_of(values)])


def _layout(fn, types: tuple) -> tuple:
    """``(the tensors of a call, its other arguments, their positions, an id)`` as getters, for calls of ``fn``
    with these argument ``types``."""
    tensors = [i for i, kind in enumerate(types) if issubclass(kind, torch.Tensor)]
    scalars = [i for i, kind in enumerate(types) if not issubclass(kind, torch.Tensor)]
    return _getter(tensors), _getter(scalars), tuple(scalars), next(_IDS)


def _intern(special: tuple) -> int:
    """An id for a specialization: the same id for equal ones while it is kept, and never an id given to another
    (ids are not reused, so a forgotten specialization only costs a new id and a new binding)."""
    found = _SPECIAL_IDS.get(special)
    if found is None:
        if len(_SPECIAL_IDS) > 4 * SIGNATURES:
            _SPECIAL_IDS.clear()
        found = _SPECIAL_IDS[special] = next(_IDS)
    return found


def _getter(positions: list[int]):
    """A function giving the tuple of a list's items at ``positions`` (``itemgetter``, made to return a tuple for
    zero or one position too)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        only = positions[0]
        return lambda values: (values[only],)
    return lambda values: ()


#: ids of layouts and specializations, never reused
_IDS = itertools.count()
#: id of a JIT function -> its ``_Kernel``
_KERNELS: dict = {}
#: (layout id, non-tensor arguments) -> the id of their specializations; bounded like ``_BOUND``
_SCALARS: OrderedDict = OrderedDict()
#: specialization -> its id
_SPECIAL_IDS: dict = {}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers (``triton.cdiv`` is a constexpr function in newer Triton, which costs
    microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for host integers ``n >= 1`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _specialization(value):
    """What Triton compiles a runtime argument's kernel for (or finer): a tensor's dtype and 16-byte alignment;
    an integer's type (int32, int64 or uint64 by its range), equality to 1 and divisibility by 16; a float's
    type (Triton passes every float as float32); anything else (bool, None) as it is."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if type(value) is int:
        return (int, value == 1, value % 16 == 0, -(1 << 31) <= value < (1 << 31), -(1 << 63) <= value < (1 << 63))
    if type(value) is float:
        return float
    return value


def _bind(fn, grid, args, kwargs, values, signature, config) -> None:
    """Triton's own launch of this call, with its launcher watched: what it receives decides the binding."""
    compiled = fn.run(*args, grid=grid, warmup=True, **kwargs)
    seen: list = []
    holder, attr = _launcher_slot(compiled)
    inner = getattr(holder, attr)

    def watch(*launch_args):
        seen.append(launch_args)
        return inner(*launch_args)

    setattr(holder, attr, watch)
    try:
        fn.run(*args, grid=grid, warmup=False, **kwargs)
    finally:
        setattr(holder, attr, inner)
    why = None
    if getattr(fn, "pre_run_hooks", None):
        why = "it has pre-run hooks, which Triton runs on every launch"
    elif len(seen) != 1:
        why = f"its launcher was called {len(seen)} times for one launch"
    else:
        order = _order(seen[0], values, fn, compiled)
        if isinstance(order, str):
            why = order
        else:
            _BOUND[signature] = _Bound(inner, compiled, order, config)
            while len(_BOUND) > SIGNATURES:
                _BOUND.popitem(last=False)
    if why is not None:
        _unbindable(fn, why)


def _unbindable(fn, why: str) -> None:
    _state(fn).unbindable = True
    log.info("attnopt: %s keeps Triton's launch path: %s", getattr(fn, "__name__", fn), why)


def _order(launch_args: tuple, values: list, fn, compiled) -> list[int] | str:
    """Indices into ``values`` of the arguments Triton handed its launcher after the fixed prefix
    ``(grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook)``;
    or why the launch does not fit that form."""
    prefix = 9
    if (len(launch_args) < prefix or launch_args[4] != compiled.function
            or launch_args[5] is not compiled.packed_metadata):
        return "its launcher's arguments do not start with (grid, stream, function, packed metadata, ...)"
    if not (_no_hook(launch_args[7]) and _no_hook(launch_args[8])):
        return "launch hooks are set"
    tail = launch_args[prefix:]
    every = list(range(len(values)))
    runtime = [i for i in every if i not in _params(fn)[1]]
    for order in (every, runtime):
        if len(order) == len(tail) and all(_same(tail[j], values[i]) for j, i in enumerate(order)):
            return order
    return f"it passed {len(tail)} arguments, neither all {len(every)} nor the {len(runtime)} non-constexpr ones in order"


def _same(passed, value) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(passed, torch.Tensor):
        return passed is value
    return type(passed) is type(value) and passed == value


def _launcher_slot(compiled) -> tuple[object, str]:
    """Where the compiled kernel keeps its launcher: ``run`` itself, or the ``_run`` behind a ``run`` property
    (newer Triton). Reading ``run`` first loads the kernel, as a launch would."""
    compiled.run  # noqa: B018  (loads the module and makes the launcher)
    if isinstance(inspect.getattr_static(type(compiled), "run", None), property):
        return compiled, "_run"
    return compiled, "run"


def _params(fn) -> tuple[list[str], frozenset[int]]:
    """The JIT function's parameter names, in order, and the indices of its constexpr parameters."""
    state = _state(fn)
    return state.names, state.constexprs


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _driver():
    global _DRIVERS
    if _DRIVERS is None:  # imported once: an import statement per launch cost microseconds
        from triton.runtime import driver

        _DRIVERS = driver
    return _DRIVERS.active


#: Triton's driver registry, once a launch has imported it
_DRIVERS = None


def _hooks() -> bool:
    """Whether Triton's launch hooks (a profiler's) are set: they then get Triton's own launch path."""
    runtime = _runtime_knobs()
    if runtime is not None:
        return not (_no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook))
    from triton.compiler import CompiledKernel

    return not (_no_hook(getattr(CompiledKernel, "launch_enter_hook", None))
                and _no_hook(getattr(CompiledKernel, "launch_exit_hook", None)))


def _runtime_knobs():
    """``triton.knobs.runtime`` (where the launch hooks are set), found once; None in a Triton without knobs."""
    global _RUNTIME
    if _RUNTIME is False:
        import triton

        knobs = getattr(triton, "knobs", None)
        _RUNTIME = None if knobs is None else knobs.runtime
    return _RUNTIME


#: ``_runtime_knobs``' answer (False: not asked yet)
_RUNTIME = False


def _no_hook(hook) -> bool:
    """No launch hook: None (older Triton), or an empty chain of hooks (Triton 3.6 passes its ``HookChain``
    objects on every launch, empty unless a profiler added to them). A bound launch passes None for either."""
    return hook is None or (type(hook).__name__ == "HookChain" and not getattr(hook, "calls", True))


def forget() -> None:
    """Drop every remembered configuration and bound launch: the next call of each kernel tunes again (after
    its autotune configurations were changed)."""
    _TUNED.clear()
    _BOUND.clear()
    _KERNELS.clear()
    _SCALARS.clear()
    _SPECIAL_IDS.clear()
