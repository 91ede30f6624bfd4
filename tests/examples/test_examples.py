"""Every example in ``examples/``, run in-process at its tiny default: what it prints must stay true.

Each example's ``main(argv)`` returns what it printed as data (the largest difference
from the original, the sites found and replaced, the tokens, the losses), and these
tests hold it to the example's claims. ``--no-tune`` ranks kernels by their cost models
(deterministic, no timing); ``--replace-all`` replaces every site a kernel supports, so
that the equalities below are checked on attnopt's kernels and not on the original code
the planner keeps at tiny sizes (that choice is tested once, at the end).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

# the examples run with the planner's defaults, as users run them (tests/conftest.py)
pytestmark = pytest.mark.keeps_original

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def run(name: str, *argv: str):
    """Import ``examples/<name>.py`` by path and return ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(f"attnopt_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        return module.main(list(argv))
    finally:
        sys.modules.pop(spec.name, None)


def test_hf_llama_same_logits_and_tokens_as_eager_and_sdpa(capsys):
    pytest.importorskip("transformers")
    r = run("hf_llama", "--no-tune", "--replace-all", "--repeat", "1")
    assert r.found == ["causal+key_padding+gqa"] * 2, r.found
    assert r.replaced == len(r.reasons) >= 4, r.reasons  # prefill and decode graphs, every site
    assert r.max_diff < 1e-5
    assert r.tokens_equal_original and r.tokens_equal_sdpa
    assert all(rate > 0 for rate in r.tokens_per_s.values())
    out = capsys.readouterr().out
    assert "would be replaced (dry run)" in out and "same tokens as SDPA: True" in out


def test_long_context_fits_max_mem_exactly_and_approximates_under_tol(capsys):
    r = run("long_context", "--no-tune", "--repeat", "1")
    # 1. as written over the budget, the exact plan within it, same output
    assert r.before > r.budget >= r.after
    assert "original" not in r.exact_kernels
    assert r.max_diff < 1e-5
    # 2. a tighter budget: no exact plan, and the error says exact=False would fit
    assert r.exact_error is not None and "exact=False" in r.exact_error and "(fits;" in r.exact_error
    assert r.approx_kernels and all(k.startswith("approx_") for k in r.approx_kernels), r.approx_kernels
    assert r.approx_after <= r.tight
    assert all(e is not None and e < 0.05 for e in r.site_errors), r.site_errors
    assert 0 < r.output_error < 0.05
    assert "APPROXIMATE" in capsys.readouterr().out


@pytest.fixture(scope="module")
def packed():
    return run("train_packed", "--no-tune", "--replace-all", "--compiler", "eager", "--repeat", "1")


def test_train_packed_loss_curve_equals_the_original(packed):
    assert packed.trained and packed.replaced == len(packed.found) == 2, packed.reasons
    assert len(packed.losses_attnopt) == len(packed.losses_original) == 8
    assert packed.losses_original[0] != packed.losses_original[-1]  # the weights did change
    assert packed.max_loss_diff < 1e-5


def test_train_packed_mask_is_read_as_causal_documents(packed):
    assert packed.found == ["causal+document"] * 2


def test_onnx_pipeline_export_and_fuse(capsys):
    for needed in ("transformers", "onnxruntime", "onnxscript"):
        pytest.importorskip(needed)
    r = run("onnx_pipeline", "--repeat", "1")
    assert r.export_attention_nodes == r.export_sites == 2
    assert r.export_max_diff < 1e-5
    assert r.plain_softmax_nodes == 2
    assert r.fuse_replaced == r.fuse_sites == r.fused_attention_nodes == 2
    assert r.fused_softmax_nodes == 0
    assert r.fuse_max_diff < 1e-5 and r.fuse_vs_torch < 1e-5
    assert "attnopt onnx fuse" in capsys.readouterr().out


def test_custom_attention_is_read_as_window_alibi_softcap():
    r = run("custom_attention", "--no-tune", "--replace-all", "--repeat", "1")
    assert r.found == ["causal+window+bias+softcap"] * 2, r.found
    assert all(any("ALiBi" in note and "0.25, 0.0625" in note for note in notes) for notes in r.notes), r.notes
    assert r.replaced == 2
    assert r.max_diff < 1e-5


def test_custom_attention_keeps_the_original_where_it_is_faster():
    """At 64 tokens the code as written is the faster plan: the example says so, and the output is untouched."""
    r = run("custom_attention", "--no-tune", "--length", "64", "--window", "16", "--repeat", "1")
    assert r.found == ["causal+window+bias+softcap"] * 2
    assert r.replaced == 0 and all(reason.startswith("original") for reason in r.reasons), r.reasons
    assert r.max_diff == 0.0
