"""``masks.alibi_slopes``: every ALiBi form is still read, and a constant mask that is not ALiBi (an HF model's
causal mask of 0 and ``finfo.min``) is turned down from its first row, before its whole grid is copied."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt.passes.masks import alibi_slopes


class _Float64Outputs(TorchDispatchMode):
    """The largest float64 tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


def _finite_causal(n: int, dtype=torch.bfloat16) -> torch.Tensor:
    i = torch.arange(n)
    keep = i[None, :] <= i[:, None]
    return torch.zeros(n, n, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


def test_a_finite_causal_mask_is_turned_down_without_copying_its_grid():
    n = 512
    for value in (_finite_causal(n), _finite_causal(n, torch.float32).expand(2, 4, n, n)):
        with _Float64Outputs() as seen:
            assert alibi_slopes(value, (2, 4, n, n)) is None
        assert seen.largest <= 4 * n  # one row per head, not the [Nq, Nk] grid in float64


def test_a_mask_affine_on_its_first_row_only_is_still_compared_in_full():
    """The first row is a necessary condition only: a grid whose later rows break the pattern is not ALiBi."""
    n, slopes = 16, torch.tensor([0.5, 0.25])
    j = torch.arange(n, dtype=torch.float32)
    value = (slopes[:, None, None] * (j[None, None, :] - j[None, :, None]))[None].clone()  # [1, 2, n, n]
    assert alibi_slopes(value, (1, 2, n, n)) == [0.5, 0.25]
    value[0, 1, 5, 3] += 1.0
    assert alibi_slopes(value, (1, 2, n, n)) is None


@settings(max_examples=150, deadline=None)
@given(heads=st.integers(1, 4), q_len=st.integers(1, 24), kv_len=st.integers(2, 40), one_row=st.booleans(),
       form=st.sampled_from(["j - i", "-|j - i|", "j"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       data=st.data())
def test_every_alibi_form_is_read(heads, q_len, kv_len, one_row, form, dtype, data):
    """Whatever its slopes, per-row offsets (invisible to the softmax), form and dtype: the slopes come back."""
    slopes = torch.tensor(data.draw(st.lists(st.sampled_from([0.5, 0.25, 0.125, 1 / 64, 2 ** -8, 0.0625]),
                                             min_size=heads, max_size=heads)), dtype=torch.float64)
    rows = 1 if one_row else q_len
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(kv_len, dtype=torch.float64)[None, :]
    distance = {"j - i": j - i, "-|j - i|": -(j - i).abs(), "j": j.expand(rows, kv_len)}[form]
    offsets = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, -3.0, 7.5]), min_size=rows, max_size=rows)),
                           dtype=torch.float64)
    value = (slopes[:, None, None] * distance[None] + offsets[None, :, None])[None].to(dtype)
    found = alibi_slopes(value, (2, heads, q_len, kv_len))
    assert found is not None
    torch.testing.assert_close(torch.tensor(found, dtype=torch.float64), slopes, rtol=1e-6, atol=1e-9)
