import pytest

import attnopt
from attnopt.config import Options, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20),
        ("1.5TB", 1_500_000_000_000), ("24 gb", 24 * 10**9), ("100", 100), ("64KiB", 65536), (1 << 30, 1 << 30),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["24 parsecs", "GB", "-1GB", "24G B", "", "1e9", "0"])
def test_bad_sizes_are_value_errors_that_show_the_format(text):
    with pytest.raises(ValueError, match="max_mem"):
        parse_bytes(text)


@pytest.mark.parametrize("value", [24.5, True, [24], b"24GB"])
def test_non_size_types_are_type_errors(value):
    with pytest.raises(TypeError, match="max_mem"):
        parse_bytes(value)


def test_optimize_rejects_bad_budget_before_touching_the_model():
    import torch

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="24 parsecs"):
        attnopt.optimize(model, max_mem="24 parsecs")


def test_unknown_options_are_named():
    with pytest.raises(TypeError, match="fast_mode"):
        Options.build(fast_mode=True)


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="no_such_kernel"):
        Options.build(kernel="no_such_kernel")


def test_optimize_takes_modules_only():
    with pytest.raises(TypeError, match="nn.Module"):
        attnopt.optimize(lambda x: x)


def test_no_kernel_error_is_exported():
    from attnopt.passes import plan

    assert attnopt.NoKernelError is plan.NoKernelError and "NoKernelError" in attnopt.__all__
    assert issubclass(attnopt.NoKernelError, ValueError)


def test_forcing_a_kernel_that_cannot_run_raises_no_kernel_error():
    import torch
    import torch.nn.functional as F

    class Causal(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(attnopt.NoKernelError, match="sdpa_flash"):  # a CUDA kernel, on a CPU float32 call
        attnopt.optimize(Causal(), kernel="sdpa_flash", tune=False)(torch.randn(1, 2, 8, 16))
