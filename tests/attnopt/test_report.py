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


def _seen(graph: int, replaced: bool, q_len: int, kv_len: int, reason: str, where: str = "h.0.attn") -> Site:
    return Site(where=where, node="softmax", graph=graph, replaced=replaced, reason=reason,
                kernel="sdpa_cpu" if replaced else None, mask_terms=("key_padding",), q_heads=4, kv_heads=4,
                q_len=q_len, kv_len=kv_len, dtype="torch.float32")


def test_one_row_per_site_with_the_graphs_and_shapes_it_was_seen_in():
    """A generate() loop and a switch to training: each module's site in four graphs is one row."""
    sites = []
    for graph, (replaced, q, kv, reason) in enumerate([
        (True, 9, 9, "fastest"), (True, 1, 10, "fastest"), (False, 9, 9, "dropout on empty rows"), (True, 1, 11, "fastest"),
    ]):
        sites += [_seen(graph, replaced, q, kv, reason, where) for where in ("h.0.attn", "h.1.attn")]
    report = Report(sites=sites, graphs=4)
    rows = report.rows()
    assert [r.where for r in rows] == ["h.0.attn", "h.1.attn"]
    assert rows[0].graphs == (0, 1, 2, 3) and rows[0].shapes == ((9, 9), (1, 10), (1, 11))
    assert not rows[0].replaced  # left alone in the training graph
    text = str(report)
    assert "0 of 2 attention site(s) replaced in 4 graph(s); 2 more in some graphs only" in text, text
    table = [line for line in text.splitlines() if "h.0.attn" in line]
    assert len(table) == 1, text
    assert "9 x 9, 1 x 10, 1 x 11" in table[0] and "0-3" in table[0]
    assert "graphs 0-1, 3: fastest; graph 2: dropout on empty rows" in table[0]


def test_two_sites_of_one_module_in_one_graph_stay_two_rows():
    sites = [_seen(g, True, 8, 8, "fastest") for g in (0, 1) for _ in range(2)]
    rows = Report(sites=sites, graphs=2).rows()
    assert len(rows) == 2 and all(r.graphs == (0, 1) for r in rows)


def test_generate_gives_one_row_per_layer():
    transformers = pytest.importorskip("transformers")
    import warnings

    import attnopt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                         attn_implementation="eager", pad_token_id=0)
        torch.manual_seed(0)
        model = attnopt.optimize(transformers.GPT2LMHeadModel(config).eval())
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    report = model.attnopt_report
    assert report.graphs >= 2 and len(report.sites) >= 4, str(report)
    assert [r.where for r in report.rows()] == ["transformer.h.0.attn", "transformer.h.1.attn"], str(report)
    assert all((6, 6) in r.shapes and any(q == 1 for q, _ in r.shapes) for r in report.rows()), str(report)
    assert sum("transformer.h.0.attn" in line for line in str(report).splitlines()) == 1, str(report)


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        return torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1) @ v


def test_a_train_eval_switch_gives_one_row_per_site():
    import attnopt

    model = attnopt.optimize(_SelfAttention().eval())
    x = torch.randn(2, 6, 16)
    model(x)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)
    report = model.attnopt_report
    assert len(report.sites) == report.graphs >= 2, str(report)  # grad mode (and training) recompile
    (row,) = report.rows()
    assert row.graphs == tuple(range(report.graphs)) and row.replaced
    assert f"1 of 1 attention site(s) replaced in {report.graphs} graph(s)" in str(report)
