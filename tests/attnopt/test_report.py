"""The report fits the machine: CUDA-only kernels in one line on a CPU machine, reasons in plain words."""

import pytest
import torch

from attnopt.report import GraphMemory, Report, Site

FILL_REASON = ("rows with no visible key give 0 in SDPA but the uniform average of v in the original "
               "(finite_added fill), and this call's mask (key_padding) may mask a whole row")


def _report() -> Report:
    rejected = (
        ("sdpa_cpu", (FILL_REASON,)),
        ("sdpa_flash", ("runs on cuda only, this call is on cpu", FILL_REASON)),
        ("triton_flash", ("meant for cuda; on cpu only when forced by name (kernel='triton_flash')",)),
    )
    sites = [
        Site(where=f"layers.{i}.attn", node="softmax", graph=0, replaced=True, reason="measured 2.0x faster",
             kernel="reference", mask_terms=("causal", "key_padding"), q_heads=4, kv_heads=4, q_len=64, kv_len=64,
             dtype="torch.float32", bytes_before=1 << 20, bytes_after=1 << 16, rejected_kernels=rejected,
             candidate_times=(("reference", 1e-3, True), ("original", 2e-3, True)))
        for i in range(2)
    ]
    return Report(sites=sites, graphs=1, memory=[GraphMemory(0, 2 << 20, 1 << 20, None, False)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only machine prints")
def test_cuda_only_kernels_are_one_line_on_a_cpu_machine():
    text = str(_report())
    assert "x sdpa_flash" not in text and "x triton_flash" not in text
    lines = [line for line in text.splitlines() if "sdpa_flash" in line]
    assert len(lines) == 1 and "triton_flash" in lines[0] and "CUDA only" in lines[0], text
    assert "x sdpa_cpu" in text  # a CPU kernel's reasons stay, site by site
    assert "sites 0-1: reference" in text


def test_reasons_are_plain_words_and_the_details_keep_everything():
    report = _report()
    short, full = str(report), report.details(full=True)
    assert "finite_added" not in short
    assert "give 0 in SDPA but the uniform average of v in the original, and" in short
    assert "(finite_added fill)" in full
    assert "x sdpa_flash" in full and "x triton_flash" in full and "not run on this machine" not in full


def test_measured_and_estimated_times_are_marked():
    text = str(_report())
    assert "reference                   1.000 ms measured" in text
    assert "original                    2.000 ms measured" in text
