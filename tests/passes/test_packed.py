"""Packed rows: several documents in one row, read as the ``document`` term without a dense mask.

Hugging Face models called with ``position_ids`` that restart per document and no ``attention_mask``
(the packing call of ``flash_attention_2`` training) build, for eager attention, a mask from the
positions: documents numbered ``cumsum(diff(pos) != 1)`` and causal ``pos[kv] <= pos[q]`` within them.
These sites read as ``causal+document`` (``window`` too for Mistral) and give the original's outputs
and gradients on every packing, including rows that are not packed and batches whose rows differ.
Hand-written models that pass cumulative lengths (``cu_seqlens``) are covered too, and comparisons
the algebra cannot prove stay dense (exact).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import reference, registry, sdpa, triton_flash
from attnopt.passes import plan

transformers = pytest.importorskip("transformers")

N = 24
LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")


def llama(config=transformers.LlamaConfig, model=transformers.LlamaForCausalLM, **extra):
    torch.manual_seed(0)
    return model(config(**LLAMA, **extra))


def positions(*rows: list[int]) -> torch.Tensor:
    """Position ids restarting at 0 for each document, one row per list of document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def call(model, ids, pos, **kwargs):
    return model(ids, position_ids=pos, use_cache=False, **kwargs)


def found(model) -> list[str]:
    return [s.found for s in model.attnopt_report.sites]


# ----------------------------------------------------------------- Hugging Face
def test_llama_packed_rows_read_as_causal_documents():
    model = llama().eval()
    ids, pos = torch.randint(0, 100, (1, N)), positions([5, 11, 8])
    report = attnopt.explain(model, (ids,), {"position_ids": pos, "use_cache": False})
    assert [s.mask_terms for s in report.sites] == [("causal", "document")] * 2, str(report)
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        got, expected = call(optimized, ids, pos).logits, call(original, ids, pos).logits
    assert found(optimized) == ["causal+document+gqa"] * 2
    assert all(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llama_without_position_ids_or_cache():
    """``use_cache=False`` and no positions: under tracing HF numbers documents from its own aranges too.
    Those constant aranges make one document per row, which the analysis evaluates away: plain causal."""
    model = llama().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    ids = torch.randint(0, 100, (2, N))
    with torch.no_grad():
        got, expected = optimized(ids, use_cache=False).logits, original(ids, use_cache=False).logits
    assert set(found(optimized)) == {"causal+gqa"}, str(optimized.attnopt_report)
    assert all(s.replaced for s in optimized.attnopt_report.sites)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


_PACKED: dict = {}


def packed_llama():
    """A Llama and its copy optimized on one packing, built once per test run: the examples of a
    property test reuse the one graph (a packing of the same length changes no shape)."""
    if not _PACKED:
        model = llama().eval()
        _PACKED["original"] = copy.deepcopy(model)
        _PACKED["optimized"] = attnopt.optimize(model)
    return _PACKED["original"], _PACKED["optimized"]


@st.composite
def packings(draw):
    """Position rows for a batch of 2: documents of any lengths, or rows that are not packed at all
    (one run from an offset; positions that jump or repeat, which HF also reads as new documents)."""
    rows = []
    for _ in range(2):
        style = draw(st.sampled_from(["packed", "offset", "free"]))
        if style == "packed":
            cuts = sorted(draw(st.sets(st.integers(1, N - 1), max_size=8)))
            rows.append(positions([b - a for a, b in zip([0, *cuts], [*cuts, N])])[0])
        elif style == "offset":
            rows.append(torch.arange(N) + draw(st.integers(0, 50)))
        else:
            rows.append(torch.tensor(draw(st.lists(st.integers(0, 40), min_size=N, max_size=N))))
    return torch.stack(rows)


@settings(max_examples=20, deadline=None)
@given(pos=packings(), seed=st.integers(0, 2**16))
def test_llama_packings_equal_the_original(pos, seed):
    original, optimized = packed_llama()
    ids = torch.randint(0, 100, (2, N), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got, expected = call(optimized, ids, pos).logits, call(original, ids, pos).logits
    assert found(optimized) == ["causal+document+gqa"] * 2  # one graph: no recompilation per packing
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llama_packed_bfloat16():
    model = llama().to(torch.bfloat16).eval()
    ids, pos = torch.randint(0, 100, (2, N)), positions([5, 11, 8], [12, 12])
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        got, expected = call(optimized, ids, pos).logits, call(original, ids, pos).logits
    assert found(optimized) == ["causal+document+gqa"] * 2
    assert all(s.replaced and s.dtype == "torch.bfloat16" for s in optimized.attnopt_report.sites)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)


def test_llama_packed_training_gradients():
    model = llama().train()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    for lengths in ([5, 11, 8], [2, 2, 20]):
        ids, pos = torch.randint(0, 100, (1, N)), positions(lengths)
        loss = call(original, ids, pos, labels=ids).loss
        expected = torch.autograd.grad(loss, list(original.parameters()))
        got_loss = call(optimized, ids, pos, labels=ids).loss
        got = torch.autograd.grad(got_loss, list(model.parameters()))
        torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert found(optimized) == ["causal+document+gqa"] * 2
    assert all(s.replaced for s in optimized.attnopt_report.sites)


def test_mistral_packed_rows_keep_their_window():
    """HF's sliding window compares positions too (``pos[kv] > pos[q] - w``): a window within documents."""
    model = llama(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4).eval()
    ids, pos = torch.randint(0, 100, (1, N)), positions([3, 13, 8])
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    with torch.no_grad():
        got, expected = call(optimized, ids, pos).logits, call(original, ids, pos).logits
        again = positions([10, 14])
        got_again, expected_again = call(optimized, ids, again).logits, call(original, ids, again).logits
    assert found(optimized) == ["causal+window+document+gqa"] * 2, str(optimized.attnopt_report)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_again, expected_again, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "triton_flash"])
def test_llama_packed_training_on_cuda(kernel):
    """On CUDA the document term reaches the GPU kernels (document ids, tiles across documents skipped)."""
    model = llama().cuda().train()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model, **({} if kernel == "auto" else {"kernel": kernel}))
    ids, pos = torch.randint(0, 100, (2, N), device="cuda"), positions([5, 11, 8], [2, 2, 20]).cuda()
    loss = call(original, ids, pos, labels=ids).loss
    expected = torch.autograd.grad(loss, list(original.parameters()))
    got = torch.autograd.grad(call(optimized, ids, pos, labels=ids).loss, list(model.parameters()))
    assert found(optimized) == ["causal+document+gqa"] * 2
    assert all(s.replaced and (kernel == "auto" or s.kernel == kernel) for s in optimized.attnopt_report.sites)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-3)


# ----------------------------------------------------------------- hand-written
class Heads(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads

    def attend(self, x, keep):  # keep: bool, broadcast to [B, H, N, N]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) * 0.35).masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class SearchsortedDocuments(Heads):
    """Documents from cumulative lengths: ``doc[i]`` is the number of ends at or before ``i``."""

    def forward(self, x, cu_seqlens):
        i = torch.arange(x.shape[1])
        doc = torch.searchsorted(cu_seqlens[1:], i, right=True)
        return self.attend(x, (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]))


class RepeatedDocuments(Heads):
    """Documents from lengths with ``repeat_interleave`` (the output size given: no data-dependent shape)."""

    def forward(self, x, lengths):
        doc = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths, output_size=x.shape[1])
        i = torch.arange(x.shape[1])
        return self.attend(x, (doc[None, :, None] == doc[None, None, :]) & (i[None, :] <= i[:, None]))


class DocumentStarts(Heads):
    """Causal from each query's document start, ``cu_seqlens[doc[q]] <= kv <= q``: equal to causal documents
    only for sorted ``cu_seqlens``, which nothing proves; a dense mask."""

    def forward(self, x, cu_seqlens):
        i = torch.arange(x.shape[1])
        start = cu_seqlens[torch.searchsorted(cu_seqlens[1:], i, right=True)]
        return self.attend(x, (start[:, None] <= i[None, :]) & (i[None, :] <= i[:, None]))


class SeparatePositions(Heads):
    """Positions compared within documents that are not numbered from them: not a band."""

    def forward(self, x, pos, doc):
        keep = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[:, None, None, :] <= pos[:, None, :, None])
        return self.attend(x, keep)


class ZeroStartDocuments(Heads):
    """Documents start where the position is 0: positions within one need not be consecutive."""

    def forward(self, x, pos):
        doc = (pos == 0).cumsum(-1)
        keep = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[:, None, None, :] <= pos[:, None, :, None])
        return self.attend(x, keep)


class PositionAgainstIndex(Heads):
    """HF's document numbering, but a position compared with an index (``pos[kv] <= q``): not a band."""

    def forward(self, x, pos):
        doc = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1).ne(1).cumsum(-1)
        i = torch.arange(x.shape[1])
        keep = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[:, None, None, :] <= i[:, None])
        return self.attend(x, keep)


class DiffDocuments(Heads):
    """HF's packing written by hand: documents from ``diff(pos) != 1``, causal on positions."""

    def forward(self, x, pos):
        doc = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1).ne(1).cumsum(-1)
        keep = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[:, None, None, :] <= pos[:, None, :, None])
        return self.attend(x, keep)


def cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def jumpy():
    """Positions that are neither consecutive nor restarting at 0 (two rows)."""
    return torch.tensor([[3, 1, 2, 9, 0, 4, 4, 5, 2, 0, 1, 7] * 2, [0, 1, 2, 3, 0, 1, 5, 6, 7, 8, 0, 2] * 2])


CASES = {  # model, inputs (call 1, call 2), expected terms
    "searchsorted": (SearchsortedDocuments, [(cu(5, 11, 8),), (cu(1, 20, 3),)], "causal+document"),
    "repeat_interleave": (RepeatedDocuments, [(torch.tensor([5, 11, 8]),), (torch.tensor([20, 4, 0]),)],
                          "causal+document"),
    "diff": (DiffDocuments, [(positions([5, 11, 8], [24]),), (jumpy(),)], "causal+document"),
    "document_starts": (DocumentStarts, [(cu(5, 11, 8),), (torch.tensor([0, 9, 4, 24]),)], "causal+dense"),
    "separate_positions": (SeparatePositions, [(jumpy(), positions([5, 11, 8], [24]) * 0 + torch.arange(2)[:, None]),
                                               (jumpy().flip(-1), positions([12, 12], [3, 21]).cumsum(-1) % 3)],
                           "document+dense"),
    "zero_start": (ZeroStartDocuments, [(positions([5, 11, 8], [24]),), (jumpy(),)], "document+dense"),
    "position_against_index": (PositionAgainstIndex, [(positions([5, 11, 8], [24]),), (jumpy(),)], "document+dense"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_written_packing(name):
    """Each spelling reads as its terms, and the second call (another packing, or inputs where positions
    are not indices) still equals the original: a term is never claimed that an input could break."""
    cls, calls, terms = CASES[name]
    torch.manual_seed(0)
    model = cls().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    for extra in calls:
        x = torch.randn(2, N, 32)
        with torch.no_grad():
            got, expected = optimized(x, *extra), original(x, *extra)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert found(optimized) == [terms], str(optimized.attnopt_report)
    assert all(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)


def test_dynamic_lengths_keep_the_proof():
    """Under dynamic shapes the positions are read symbolically: one graph for every length."""
    torch.manual_seed(0)
    model = DiffDocuments().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model, dynamic=True)
    for pos in (positions([5, 11, 8], [24]), jumpy(), positions([10, 20], [3, 27]), positions([7], [1, 6])):
        x = torch.randn(2, pos.shape[1], 32)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x, pos), original(x, pos), atol=1e-5, rtol=1e-5)
    assert found(optimized) == ["causal+document"], str(optimized.attnopt_report)


# ----------------------------------------------------------------- the numbering the proof relies on
def captured(fn, *args) -> torch.fx.Graph:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.graph)
        return gm

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def hf_numbering(pos):
    return (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)


@pytest.mark.parametrize("numbering, dtype, proven", [
    (hf_numbering, torch.int64, True),
    (lambda p: torch.cumsum(torch.diff(p, prepend=p[:, :1], dim=1).ne(1), dim=1), torch.int64, True),
    (hf_numbering, torch.int32, False),  # narrower positions: a step can wrap to 1 within a document
    (lambda p: (torch.diff(p, prepend=p[:, :1] - 1, dim=-1) != 1).cumsum(-1, dtype=torch.int8), torch.int64, False),
    (lambda p: torch.cat([p[:, :1] * 0, (torch.diff(p, dim=-1) != 1).cumsum(-1)], -1), torch.int64, False),
    (lambda p: (torch.diff(p, prepend=p[:, :2] - 1, dim=-1)[:, 1:] != 1).cumsum(-1), torch.int64, False),
    (lambda p: (torch.diff(p, n=2, prepend=p[:, :2] - 1, dim=-1) != 1).cumsum(-1), torch.int64, False),
    (lambda p: (torch.diff(p, prepend=p[:, :1] - 1, dim=-1) != 2).cumsum(-1), torch.int64, False),
    (lambda p: (torch.diff(p, prepend=p[:1] - 1, dim=0) != 1).cumsum(-1), torch.int64, False),  # across rows
    (lambda p: (p == 0).cumsum(-1), torch.int64, False),
])
def test_document_numbering_from_positions(numbering, dtype, proven):
    """Only ``cumsum(diff(pos) != 1)`` over the row, int64 throughout, numbers documents within which
    positions step by exactly one."""
    from attnopt.passes.graph import Mutations
    from attnopt.passes.symbolic import document_positions

    graph = captured(numbering, positions([5, 11, 8], [24]).to(dtype))
    ids = next(n for n in reversed(graph.nodes) if n.op != "output")
    pos = next(n for n in graph.nodes if n.op == "placeholder")
    got = document_positions(ids, Mutations(graph).is_mutated)
    assert got is (pos if proven else None)


def test_numbering_written_in_place_is_not_read():
    from attnopt.passes.graph import Mutations
    from attnopt.passes.symbolic import document_positions

    def numbering(pos):
        steps = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        steps[:, 3] = 1  # merges two documents whose positions do not step by one
        return (steps != 1).cumsum(-1)

    graph = captured(numbering, positions([3, 5]))
    ids = next(n for n in reversed(graph.nodes) if n.op != "output")
    assert document_positions(ids, Mutations(graph).is_mutated) is None
    assert document_positions(ids) is not None  # the chain itself matches: only the write rules it out


@pytest.mark.parametrize("kernel", ["sdpa_cpu", "reference"])
def test_packed_sites_prove_every_row_sees_a_key(kernel, monkeypatch):
    """HF's packed mask compares one id tensor with itself: the sites get the query and key ids as views of one
    tensor, so a call proves that every row sees its own key, and the kernels skip the fill's work for rows
    without keys (in the backward a host sync per layer). The same outputs and gradients as the original."""
    model = llama().train()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model, kernel=kernel)
    ids, pos = torch.randint(0, 100, (1, N)), positions([5, 11, 8])
    call(optimized, ids, pos, labels=ids)  # captures and plans
    assert [site.kernel for site in optimized.attnopt_report.sites] == [kernel] * 2
    proofs = []
    chosen = registry.get(kernel)
    forward = chosen.train_forward  # what a training call runs
    monkeypatch.setattr(chosen, "train_forward", lambda q, k, v, spec, seed: (
        proofs.append(not spec.rows_may_be_empty()), forward(q, k, v, spec, seed))[1])
    for module in (reference, sdpa, triton_flash):  # each holds its own name of the shared helper
        monkeypatch.setattr(module, "empty_row_grads", lambda *a, **k: pytest.fail("rows without keys looked for"))
    loss = call(optimized, ids, pos, labels=ids).loss
    got = torch.autograd.grad(loss, list(model.parameters()))
    expected_loss = call(original, ids, pos, labels=ids).loss
    expected = torch.autograd.grad(expected_loss, list(original.parameters()))
    assert proofs == [True, True]
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


class IndexedDocuments(Heads):
    """The ids gathered at index tensors, ``ids[i[:, None]] == ids[i[None, :]]``: one vector."""

    def forward(self, x, ids):
        i = torch.arange(x.shape[1])
        return self.attend(x, ids[i[:, None]] == ids[i[None, :]])


class ClonedDocuments(Heads):
    """The key ids are a copy of the query ids: equal values, but two tensors (nothing is read to compare)."""

    def forward(self, x, cu_seqlens):
        i = torch.arange(x.shape[1])
        doc = torch.searchsorted(cu_seqlens[1:], i, right=True)
        return self.attend(x, (doc[:, None] == doc.clone()[None, :]) & (i[None, :] <= i[:, None]))


class ShiftedDocuments(Heads):
    """Query i has the id at i, key j the id at j + 1 of one tensor: rows can see no key (NaN in the original)."""

    def forward(self, x, ids):
        i = torch.arange(x.shape[1])
        return self.attend(x, ids[i[:, None]] == ids[(i + 1)[None, :]])


class RewrittenDocuments(Heads):
    """The ids are written in place between the query read and the key read: the two reads differ."""

    def forward(self, x, ids):
        i = torch.arange(x.shape[1])
        q_ids = ids[i[:, None]]
        ids.mul_(2)
        return self.attend(x, q_ids == ids[i[None, :]])


class FirstRowQueryDocuments(Heads):
    """The query ids of every batch row are row 0's, the key ids each row's own: the same columns, not the same
    rows (a read along a broadcast dim of size 1 reads row 0 only)."""

    def forward(self, x, ids):
        i, rows = torch.arange(x.shape[1]), torch.arange(x.shape[0])
        q_ids = ids[torch.arange(1)[:, None, None], i[None, :, None]]  # [1, N, 1]
        kv_ids = ids[rows[:, None, None], i[None, None, :]]  # [B, 1, N]
        return self.attend(x, (q_ids == kv_ids)[:, None])


class RewrittenIndex(Heads):
    """The key ids are read with the index written in place after the query read: ``ids[i - 1]``, not
    ``ids[i]``, though the graph reads one index node twice."""

    def forward(self, x, ids):
        i = torch.arange(x.shape[1])
        q_ids = ids[i[:, None]]
        i.sub_(1)
        return self.attend(x, q_ids == ids[i[None, :]])


ONE_VECTOR = {  # model, inputs of two calls, whether the query and key ids are proven one vector
    "searchsorted": (SearchsortedDocuments, [(cu(5, 11, 8),), (cu(1, 20, 3),)], True),
    "repeat_interleave": (RepeatedDocuments, [(torch.tensor([5, 11, 8]),), (torch.tensor([20, 4, 0]),)], True),
    "diff": (DiffDocuments, [(positions([5, 11, 8], [24]),), (jumpy(),)], True),
    "indexed": (IndexedDocuments, [(torch.tensor([0] * 5 + [1] * 19),), (torch.arange(N) % 3,)], True),
    "cloned": (ClonedDocuments, [(cu(5, 11, 8),), (cu(1, 20, 3),)], False),
    "shifted": (ShiftedDocuments, [(torch.tensor([0] * 5 + [1] * 20),), (torch.arange(N + 1) % 3,)], False),
    "first_row_queries": (FirstRowQueryDocuments, [(torch.tensor([[0] * 12 + [1] * 12, [0] * 6 + [1] * 18]),),
                                                   (torch.tensor([[0] * 24, [1] * 24]),)], False),
    "rewritten_index": (RewrittenIndex, [(torch.tensor([0] * 5 + [1] * 19),), (torch.arange(N) % 3,)], False),
    "rewritten": (RewrittenDocuments, [(torch.tensor([0] * 5 + [1] * 20),), (torch.tensor([1] * 25),)], False),
}


@pytest.mark.parametrize("name", list(ONE_VECTOR))
def test_query_and_key_ids_proven_one_vector(name, monkeypatch):
    """A document term whose query and key ids read one tensor at the same positions reaches the kernel as one
    tensor (the call then proves every row sees its own key); copies, shifted reads and ids written in place
    between the reads stay two, and rows without keys keep the original's fill (NaN)."""
    cls, calls, same = ONE_VECTOR[name]
    torch.manual_seed(0)
    model = cls().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model, kernel="reference", tune=False)
    kernel = registry.get("reference")
    forward, seen = kernel.forward, []
    monkeypatch.setattr(kernel, "forward", lambda q, k, v, spec, seed: (
        seen.append((spec.q_doc is spec.kv_doc, spec.rows_may_be_empty())), forward(q, k, v, spec, seed))[1])
    for extra in calls:
        x = torch.randn(2, N, 32)
        with torch.no_grad():
            expected = original(x, *[t.clone() for t in extra])
            got = optimized(x, *[t.clone() for t in extra])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert "document" in found(optimized)[0], str(optimized.attnopt_report)
    assert seen and all(s == (same, not same) for s in seen), seen


def test_packed_layers_share_one_document_tensor_and_the_planner_knows(monkeypatch):
    """The layers of a packed Llama hand their kernels one and the same document tensor per forward, so the tile
    lists (and any per-document work a kernel keeps per tensor) are built once for all of them; the planner is
    told how many sites share it (``plan.term_sharing``), which its timing spreads that build over."""
    model = llama().eval()
    ids, pos = torch.randint(0, 100, (1, N)), positions([5, 11, 8])
    sharing = []
    real_choose = plan.choose
    monkeypatch.setattr(plan, "choose", lambda spec, **kw: sharing.append(kw.get("sharing")) or real_choose(spec, **kw))
    optimized = attnopt.optimize(copy.deepcopy(model), kernel="reference", tune=False)
    kernel = registry.get("reference")
    forward, seen = kernel.forward, []
    monkeypatch.setattr(kernel, "forward", lambda q, k, v, spec, seed: (
        seen.append(spec.q_doc), forward(q, k, v, spec, seed))[1])
    with torch.no_grad():
        got, expected = call(optimized, ids, pos).logits, call(model, ids, pos).logits
        seen.clear()
        call(optimized, ids, pos)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sharing == [2, 2], sharing
    assert len(seen) == 2 and seen[0] is not None and seen[1] is seen[0]
