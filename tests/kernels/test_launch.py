"""The bound Triton launch: replays exactly what Triton hands its launcher, rebinds when a call's
specialization changes, and keeps Triton's path whenever it cannot tell.

Triton's compiled kernels need a GPU; here a stand-in JIT function launches the way Triton does (a
launcher called with ``(grid x, y, z, stream, function, metadata, launch metadata, hooks, *arguments)``),
in each of the two conventions Triton versions use. The GPU test runs the real kernels both ways.
"""

from types import SimpleNamespace

import pytest
import torch

from attnopt.kernels import launch


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Compiled:
    """A compiled kernel whose launcher sits behind a ``run`` property (newer Triton) or is ``run`` itself."""

    def __init__(self, property_slot: bool, record: list):
        self.function, self.packed_metadata = object(), object()
        launcher = lambda *a: record.append(a)  # noqa: E731
        if property_slot:
            self._run = launcher
        else:
            self.__dict__["run"] = launcher


class _PropertyCompiled(_Compiled):
    @property
    def run(self):
        return self._run


class _JIT:
    """Triton's JIT function as far as ``launch`` sees it: params, and run() with the launch convention."""

    PARAMS = [("Q", False), ("Nq", False), ("scale", False), ("flag", False), ("BLOCK_M", True), ("D", True)]

    def __init__(self, all_args: bool, property_slot: bool):
        self.params = [_Param(n, c) for n, c in self.PARAMS]
        self.all_args, self.property_slot = all_args, property_slot
        self.compiled: dict = {}
        self.launched: list = []  # what the launcher received, from any path
        self.triton_launches = 0
        self.hooks = (None, None)  # older Triton; 3.6 passes two (empty) HookChains

    def key(self, values):
        """Triton's specialization: pointers by dtype and alignment, integers by 1 and divisibility by 16."""
        def special(v):
            if isinstance(v, torch.Tensor):
                return v.dtype, v.data_ptr() % 16 == 0
            if type(v) is int:
                return int, v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31)
            return type(v) if type(v) is float else v
        return tuple(v if p.is_constexpr else special(v) for p, v in zip(self.params, values))

    def run(self, *args, grid, warmup, **kwargs):
        values = [*args, *[kwargs[p.name] for p in self.params[len(args):]]]
        kind = _PropertyCompiled if self.property_slot else _Compiled
        compiled = self.compiled.setdefault(self.key(values), kind(self.property_slot, self.launched))
        if warmup:
            return compiled
        self.triton_launches += 1
        g = grid(kwargs) if callable(grid) else grid
        tail = values if self.all_args else [v for p, v in zip(self.params, values) if not p.is_constexpr]
        compiled.run(g[0], g[1], 1, 7, compiled.function, compiled.packed_metadata, None, *self.hooks, *tail)
        return compiled


class HookChain:
    """Triton 3.6's launch hooks: a chain passed on every launch, empty unless a profiler added a hook."""

    def __init__(self, *calls):
        self.calls = list(calls)


class _Autotuned:
    keys = ["D"]

    def __init__(self, fn):
        self.fn = fn
        self.best_config = SimpleNamespace(all_kwargs=lambda: {"BLOCK_M": 64, "num_warps": 4})

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn.run(*args, grid=grid, warmup=False, **{**kwargs, "BLOCK_M": 64})


@pytest.fixture
def bound(monkeypatch):
    monkeypatch.setattr(launch, "BOUND", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch, "_driver", lambda: SimpleNamespace(get_current_device=lambda: 0,
                                                                   get_current_stream=lambda device: 7))
    monkeypatch.setattr(launch, "_hooks", lambda: False)
    launch.forget()
    yield
    launch.forget()


def _call(kernel, q, n=64, scale=0.125, flag=True, d=32):
    launch.launch(kernel, lambda meta: (n // meta["BLOCK_M"], 2), q, n, scale=scale, flag=flag, D=d)


@pytest.mark.parametrize("hooks", ["none", "empty_chains"])
@pytest.mark.parametrize("property_slot", [True, False], ids=["run_property", "run_attribute"])
@pytest.mark.parametrize("all_args", [True, False], ids=["all_arguments", "runtime_arguments"])
def test_a_bound_call_hands_the_launcher_what_triton_would(bound, all_args, property_slot, hooks):
    fn = _JIT(all_args, property_slot)
    if hooks == "empty_chains":
        fn.hooks = (HookChain(), HookChain())
    kernel = _Autotuned(fn)
    q = torch.zeros(64)
    _call(kernel, q)  # tunes
    _call(kernel, q)  # Triton's path, watched: binds
    assert fn.triton_launches == 2
    _call(kernel, q)
    assert fn.triton_launches == 2, "the bound call went through Triton's binder"
    watched, first = fn.launched[-2:]
    assert first[:6] == watched[:6] and first[9:] == watched[9:]
    # new values of the same specialization (a float, a length divisible by 16): still the bound launcher, handed
    # the new values, with the grid computed from them
    _call(kernel, q, n=128, scale=0.5)
    assert fn.triton_launches == 2, "a new value of the same specialization went through Triton's binder"
    second = fn.launched[-1]
    assert second[9:] == ((q, 128, 0.5, True, 64, 32) if all_args else (q, 128, 0.5, True))
    assert second[:4] == (2, 2, 1, 7)  # the grid from the configuration's BLOCK_M, the current stream


@pytest.mark.parametrize("change", ["misaligned", "divisibility", "one", "int64", "dtype", "constexpr", "bool", "type",
                                    "device"])
def test_a_new_specialization_goes_through_triton_again(bound, change, monkeypatch):
    fn = _JIT(True, True)
    kernel = _Autotuned(fn)
    q = torch.zeros(64)
    for _ in range(3):
        _call(kernel, q)
    assert fn.triton_launches == 2
    other = dict(q=q, n=64, flag=True, d=32)
    if change == "misaligned":
        other["q"] = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
        assert other["q"].data_ptr() % 16 != 0
    elif change == "divisibility":
        other["n"] = 65
    elif change == "one":
        other["n"] = 1
    elif change == "int64":  # past int32: Triton passes it as int64
        other["n"] = 1 << 36
    elif change == "dtype":
        other["q"] = torch.zeros(64, dtype=torch.float16)
    elif change == "constexpr":
        other["d"] = 64  # also a new tuning key: tuned first
        _call(kernel, q, d=64)
    elif change == "bool":
        other["flag"] = False
    elif change == "device":  # Triton keeps its compiled kernels per current device
        monkeypatch.setattr(launch, "_driver", lambda: SimpleNamespace(get_current_device=lambda: 1,
                                                                       get_current_stream=lambda device: 9))
    else:  # 1 == True, but Triton types them apart (i32 against i1)
        other["flag"] = 1
    launches = fn.triton_launches
    _call(kernel, other["q"], n=other["n"], flag=other["flag"], d=other["d"])
    assert fn.triton_launches == launches + 1
    assert fn.launched[-1][9] is other["q"]


def test_a_launch_that_does_not_match_keeps_tritons_path(bound, monkeypatch, caplog):
    fn = _JIT(True, True)

    def reordered(*args, grid, warmup, **kwargs):  # a launcher convention this module does not know
        compiled = _JIT.run(fn, *args, grid=grid, warmup=True, **kwargs)
        if warmup:
            return compiled
        fn.triton_launches += 1
        compiled.run(1, 2, 1, 7, compiled.function, compiled.packed_metadata, None, None, None, kwargs["D"], *args)
        return compiled

    monkeypatch.setattr(fn, "run", reordered)
    kernel = _Autotuned(fn)
    q = torch.zeros(64)
    with caplog.at_level("INFO", logger="attnopt"):
        for _ in range(4):
            _call(kernel, q)
    assert fn.triton_launches == 4 and launch.unbindable(fn)
    assert "keeps Triton's launch path" in caplog.text


def test_hooks_and_the_switch_keep_tritons_path(bound, monkeypatch):
    fn = _JIT(True, True)
    kernel = _Autotuned(fn)
    q = torch.zeros(64)
    for _ in range(2):
        _call(kernel, q)
    monkeypatch.setattr(launch, "_hooks", lambda: True)  # a profiler's launch hooks
    _call(kernel, q)
    assert fn.triton_launches == 3
    monkeypatch.setattr(launch, "_hooks", lambda: False)
    monkeypatch.setattr(launch, "BOUND", False)
    _call(kernel, q)
    assert fn.triton_launches == 4


def test_signatures_kept_are_bounded(bound, monkeypatch):
    monkeypatch.setattr(launch, "SIGNATURES", 3)
    fn = _JIT(True, True)
    kernel = _Autotuned(fn)
    _call(kernel, torch.zeros(64))
    for d in range(8):  # a tensor per dtype: a new signature each
        _call(kernel, torch.zeros(64, dtype=[torch.float32, torch.float16, torch.bfloat16, torch.float64][d % 4]))
    assert len(launch._BOUND) == 3


def test_a_hook_in_the_chain_keeps_tritons_path(bound):
    """A profiler's hook added to Triton 3.6's chain: its launches are Triton's, so the hook runs."""
    fn = _JIT(True, True)
    fn.hooks = (HookChain(print), HookChain())
    kernel = _Autotuned(fn)
    q = torch.zeros(64)
    for _ in range(4):
        _call(kernel, q)
    assert fn.triton_launches == 4 and launch.unbindable(fn)
    assert launch._no_hook(None) and launch._no_hook(HookChain()) and not launch._no_hook(HookChain(print))


@pytest.mark.parametrize("setting, bound", [(None, True), ("1", True), ("0", False)])
def test_bound_launch_is_on_unless_turned_off(setting, bound):
    """On by default (the GPU suite passed with it); ``ATTNOPT_BOUND_LAUNCH=0`` keeps Triton's own launch."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATTNOPT_BOUND_LAUNCH"}
    if setting is not None:
        env["ATTNOPT_BOUND_LAUNCH"] = setting
    code = "from attnopt.kernels import launch; print(launch.BOUND)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(bound)


_ALIGNED, _MISALIGNED = torch.zeros(64), torch.zeros(65)[1:]
_HALF = torch.zeros(64, dtype=torch.float16)


def _scalars():
    from hypothesis import strategies as st

    return st.one_of(
        st.sampled_from([0, 1, 2, 15, 16, 17, 32, 4096, 4097, (1 << 31) - 1, 1 << 31, 1 << 36, -1, -16]),
        st.sampled_from([0.0, 0.125, 1.0, -2.5]), st.booleans(), st.none(), st.sampled_from(["ieee", "tf32"]))


def _scalar_or_tensor():
    from hypothesis import strategies as st

    return st.one_of(_scalars(), st.sampled_from([_ALIGNED, _MISALIGNED, _HALF]))


def test_the_signature_tells_calls_apart_as_the_per_argument_specialization_does():
    """``_signature`` (specializations looked up by the exact non-tensor values) tells two calls apart exactly
    when the per-argument specialization does: every argument's type, a constexpr's value, an integer's range,
    equality to 1 and divisibility by 16, a tensor's dtype and alignment."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    fn = _JIT(True, True)
    fn.params = [_Param(f"a{i}", i >= 4) for i in range(6)]  # the last two are constexprs

    def specialized(values):
        constexprs = launch._params(fn)[1]
        return (tuple(map(type, values)),
                *[v if i in constexprs else launch._specialization(v) for i, v in enumerate(values)])

    # tensors are runtime arguments; constexprs (the last two) are plain values
    values = st.tuples(*[_scalar_or_tensor()] * 4, _scalars(), _scalars()).map(list)

    @settings(max_examples=1000, deadline=None)
    @given(values, st.integers(0, 5), _scalar_or_tensor(), _scalars())
    def check(a, where, other, other_scalar):
        b = list(a)
        b[where] = other if where < 4 else other_scalar  # calls that differ in one argument: where one detail
        # must tell them apart
        assert (launch._signature(fn, a) == launch._signature(fn, b)) == (specialized(a) == specialized(b))
        assert launch._signature(fn, a) == launch._signature(fn, list(a))  # looked up: the same answer

    base = [_ALIGNED, 16, 0.5, True, 64, "tf32"]
    for where, other in ((0, _MISALIGNED), (0, _HALF), (1, 17), (1, 1), (1, 1 << 36), (3, 1), (3, False), (4, 32),
                         (5, "ieee"), (1, 32), (2, 1.5)):  # the last two: the same specialization
        changed = list(base)
        changed[where] = other
        assert (launch._signature(fn, base) == launch._signature(fn, changed)) == (
            specialized(base) == specialized(changed)), (where, other)
    check()


class _HashedJIT(_JIT):
    """A JIT function that hashes as Triton's does (its source's digest, behind a lock): counted."""

    hashes = 0

    def __hash__(self):
        type(self).hashes += 1
        return 1


class _HashedAutotuned(_Autotuned):
    hashes = 0

    def __hash__(self):
        type(self).hashes += 1
        return 2


def test_a_bound_launch_hashes_neither_the_kernel_nor_its_autotuner(bound):
    """Looked up by identity: hashing a JIT function costs a lock and a digest, which a launch paid about 25
    times before (``benchmarks/host_cost.py --detail``)."""
    fn = _HashedJIT(True, True)
    kernel = _HashedAutotuned(fn)
    q = torch.zeros(64)
    for _ in range(3):  # tune, bind, then bound
        _call(kernel, q)
    _HashedJIT.hashes = _HashedAutotuned.hashes = 0
    for _ in range(5):
        _call(kernel, q)
    assert fn.triton_launches == 2 and len(fn.launched) == 8  # then five bound launches
    assert _HashedJIT.hashes == 0 and _HashedAutotuned.hashes == 0
