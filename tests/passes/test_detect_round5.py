"""Detection, round five: programs on which ``attnopt.optimize`` (default options; the suite replaces every
supported site) must give the original's output, or leave the site alone.

Each program is compared with a ``copy.deepcopy`` of the model taken before ``optimize``, on its own copy of the
inputs (several programs write their inputs in place). They cover:

* casts that are not no-ops: scores cast to an integer dtype (truncated), probabilities cast to bool (the site is
  left alone: ``detect._float_cast``);
* in-place writes to what the mask algebra reads as structure (an ``arange``, a comparison of aranges, ``~keep``,
  ``a & b``, ``1 - keep``, a compared slice of a constant, compared document ids), edited by a setitem before the
  mask is applied: such a mask is read as the dense mask it is (``masks._classify``, ``_conjunction``,
  ``_read_as_boolean``);
* views by any op, found from the storages dynamo recorded (``.mT``, ``.T``, ``torch.moveaxis``,
  ``torch.broadcast_to``): a write through one is a write to its base (``graph.Mutations``);
* a key padding term made from a tensor written in place is not shared between sites (``rewrite._shared``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnopt

from .models import Heads


class HeadsWith(Heads):
    """``Heads`` with the spelling ``how`` a program takes its mask in."""

    def __init__(self, how):
        super().__init__()
        self.how = how


def compare(model, *args, train=False, **options):
    """``(got, want, report)``: the optimized model's output and the original's on the same (copied) inputs."""
    torch.manual_seed(0)
    model = model.train(train)
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model, **options)
    mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    theirs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        want = original(*theirs)
        got = optimized(*mine)
    for a, b in zip(mine, theirs):  # the inputs a model writes are written alike
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    return got, want, optimized.attnopt_report


def assert_same(model, *args, **options):
    got, want, report = compare(model, *args, **options)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, equal_nan=True, msg=lambda m: f"{m}\n{report}")
    return report


def x_in(b=2, n=8):
    torch.manual_seed(1)
    return torch.randn(b, n, 32)


def padded(b=2, n=8):
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 6:] = False
    return keep


# ------------------------------------------------------------------ 1. casts read as no-ops
class IntegerScores(Heads):
    """Scores truncated to integers (``.to(torch.int64)``) before a float softmax."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = (q @ k.transpose(-1, -2) * 4.0).to(torch.int64).float()
        return self.merge(s.softmax(-1) @ v)


class BoolProbabilities(Heads):
    """``softmax(..).bool().to(v.dtype) @ v``: the sum of the visible values, not their average."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.merge(s.softmax(-1).bool().to(v.dtype) @ v)


def test_scores_cast_to_an_integer_dtype_are_not_read_as_the_scores():
    """detect._read_score_step takes every ``cast`` (``.to``/``.type``/``.bool()``) as a no-op step, and
    _through_cast returns early for a non-float target: the truncation is dropped."""
    assert_same(IntegerScores(), x_in())


def test_probabilities_cast_to_bool_are_not_read_as_the_probabilities():
    """_match_softmax's walk down takes any ``cast`` user of the probabilities, ``.bool()`` included."""
    assert_same(BoolProbabilities(), x_in())


# ------------------------------------------------------------------ 2. structures written in place before use
class EditedComparison(Heads):
    """A causal comparison of aranges, then a global key opened in place: ``keep[:, 3] = True``."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        i = torch.arange(n, device=x.device)
        keep = i[None, :] <= i[:, None]
        keep[:, 3] = True
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedPositions(HeadsWith):
    """Positions from an arange, edited in place, compared causally: not ``j <= i``."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        if self.how == "setitem":
            pos[0] = n  # the first token placed after the others
        else:
            pos.add_(torch.arange(n, device=x.device) % 3)
        keep = pos[None, :] <= pos[:, None]
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedAlwaysTrue(Heads):
    """``kv_idx >= 0`` keeps every key as written; an in-place edit makes some indices negative."""

    def forward(self, x):
        q, k, v = self.split(x)
        kv_idx = torch.arange(x.shape[1], device=x.device)
        kv_idx[3:] = -1
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~(kv_idx[None, :] >= 0), float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedSlice(Heads):
    """nanoGPT's ``bias[:, :, :t, :t] == 0``, then key 2 hidden in place."""

    def __init__(self, n=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, x):
        q, k, v = self.split(x)
        t = x.shape[1]
        hidden = self.bias[:, :, :t, :t] == 0
        hidden[..., 2] = True
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(hidden, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedDocuments(Heads):
    """A same-document mask, then key 0 opened to every query in place."""

    def forward(self, x, doc):
        q, k, v = self.split(x)
        same = doc[:, None, :, None] == doc[:, None, None, :]
        same[..., 0] = True
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~same, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedNot(Heads):
    """``hidden = ~keep[..]`` then ``hidden[..., 0] = True``: the walk through ``~`` reads ``keep`` alone."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        hidden = ~keep[:, None, None, :]
        hidden[..., 0] = True
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(hidden, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedAnd(Heads):
    """``causal & keep`` then a column closed in place: the walk through ``&`` reads the two operands."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & keep[:, None, None, :]
        allowed[..., 1] = False
        s = torch.where(allowed, q @ k.transpose(-1, -2) * 0.3, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class EditedOneMinusKeep(Heads):
    """HF's ``(1 - keep) * finfo.min`` with ``1 - keep`` edited in place: _read_as_boolean reads it as ``keep``."""

    def __init__(self, subtract=False):
        super().__init__()
        self.subtract = subtract

    def forward(self, x, keep):
        q, k, v = self.split(x)
        hidden = 1.0 - keep[:, None, None, :].to(x.dtype)
        hidden[..., 0] = 1.0
        s = q @ k.transpose(-1, -2) * 0.3
        if self.subtract:
            s = s - hidden * torch.finfo(x.dtype).max
        else:
            s = s + hidden * torch.finfo(x.dtype).min
        return self.merge(s.softmax(-1) @ v)


def test_a_comparison_of_aranges_written_in_place_is_not_causal():
    """masks._classify -> symbolic.band_of_comparison reads ``keep`` as ``j <= i`` although a setitem wrote it."""
    assert_same(EditedComparison(), x_in())


@pytest.mark.parametrize("how", ["setitem", "add_"])
def test_positions_written_in_place_are_not_an_arange(how):
    """symbolic.affine reads ``torch.arange`` without asking whether it is written in place."""
    assert_same(EditedPositions(how), x_in())


def test_indices_written_in_place_do_not_keep_every_key():
    """symbolic.always_true drops ``kv_idx >= 0`` though ``kv_idx`` was written."""
    assert_same(EditedAlwaysTrue(), x_in())


def test_a_compared_slice_of_a_constant_written_in_place_is_not_causal():
    """masks._band_of_sliced_constant walks from the atom to the constant without a mutation check."""
    assert_same(EditedSlice(), x_in())


def test_document_ids_compared_then_written_in_place_are_not_documents():
    """masks._documents reads ``a == b`` as documents although the comparison's result was written."""
    assert_same(EditedDocuments(), x_in(), torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]] * 2))


@pytest.mark.parametrize("model", [EditedNot, EditedAnd])
def test_a_mask_written_after_not_or_and_keeps_the_write(model):
    """masks._conjunction splits ``~`` / ``&`` nodes that a setitem then wrote."""
    assert_same(model(), x_in(), padded())


@pytest.mark.parametrize("subtract", [False, True])
def test_one_minus_keep_written_in_place_is_not_key_padding(subtract):
    assert_same(EditedOneMinusKeep(subtract), x_in(), padded())


# ------------------------------------------------------------------ 3. views graph.py does not know as aliases
VIEWS = {
    "mT": lambda m, shape: m[:, None, :, None].mT,
    "moveaxis": lambda m, shape: torch.moveaxis(m[:, :, None, None], 1, 3),
    "broadcast_to": lambda m, shape: torch.broadcast_to(m[:, None, None, :], (shape[0], 1, 1, shape[3])),
}


class WrittenAfterRead(HeadsWith):
    """The padding read through a view, then its base written before the value product: eager's masked_fill
    already ran, the rewritten op reads the view when it runs."""

    def forward(self, x, pad):  # pad [B, N], True = padded
        q, k, v = self.split(x)
        s = q @ k.transpose(-1, -2) * 0.3
        s = s.masked_fill(VIEWS[self.how](pad, s.shape), float("-inf"))
        pad[:, 2] = True
        return self.merge(s.softmax(-1) @ v)


EDITS = {"mT": lambda m: m.mT, "T": lambda m: m.T, "moveaxis": lambda m: torch.moveaxis(m, 0, 1)}


class CausalEditedThroughView(HeadsWith):
    """``tril`` of ones, with a column opened through a transposed view (an attention sink): not causal."""

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        EDITS[self.how](keep)[2] = True  # keep[:, 2] = True
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


@pytest.mark.parametrize("how", sorted(VIEWS))
def test_a_base_written_after_a_view_of_it_masked_the_scores(how):
    """graph.Mutations unions only _VIEW_FUNCTIONS / _VIEW_METHODS with their input: detect._check_read_order
    sees the view as unwritten."""
    pad = ~padded()
    assert_same(WrittenAfterRead(how), x_in(), pad)


def test_a_base_written_after_a_listed_view_is_left_alone():
    """The same program through ``[:, None, None, :]`` (a listed view): left alone, the original's output."""
    VIEWS["getitem"] = lambda m, shape: m[:, None, None, :]
    try:
        got, want, report = compare(WrittenAfterRead("getitem"), x_in(), ~padded())
    finally:
        del VIEWS["getitem"]
    (site,) = report.sites
    assert not site.replaced and "written in place" in site.reason, report
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("how", sorted(EDITS))
def test_a_constant_written_through_a_transposed_view_is_not_a_constant(how):
    """Constants.is_constant asks Mutations, which does not see the write through ``.mT`` / ``.T`` /
    ``moveaxis``: the ``tril`` is evaluated as written and proven causal."""
    assert_same(CausalEditedThroughView(how), x_in())


# ------------------------------------------------------------------ 4. terms shared across a write
class ParallelPadded(Heads):
    """Two attentions of one input, the padding written in place between them. ``negated``: ``masked_fill(pad)``
    (the op's key padding is ``~pad``, a new tensor); else ``masked_fill(~keep)`` with all keys kept at first."""

    def __init__(self, negated):
        super().__init__()
        self.negated = negated

    def forward(self, x, mask):  # mask [B, 1, 1, N]: pad (True = padded) or keep
        outs = []
        for _ in range(2):
            q, k, v = self.split(x)
            s = q @ k.transpose(-1, -2) * 0.3
            s = s.masked_fill(mask if self.negated else ~mask, float("-inf"))
            outs.append(self.merge(s.softmax(-1) @ v))
            mask[..., 1] = self.negated  # key 1 padded from now on
        return outs[0] + outs[1]


@pytest.mark.parametrize("negated", [False, True])
def test_a_padding_written_between_two_sites_is_read_after_the_write(negated):
    """rewrite._shared hands the second site the key padding (``logical_not(pad)``) or ``all_kept`` node that
    the first site made before the write; detect._check_read_order checks each site's own reads only."""
    mask = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    if negated:
        mask[0, ..., 6:] = True
    else:
        mask = ~mask
    assert_same(ParallelPadded(negated), x_in(), mask)


# ------------------------------------------------------------------ 5. what holds
class SubtractedPenalty(Heads):
    """``torch.sub(scores, penalty, alpha=0.5)`` then a scale: an additive term of multiplier -0.15."""

    def forward(self, x, penalty):
        q, k, v = self.split(x)
        s = torch.sub(q @ k.transpose(-1, -2), penalty, alpha=0.5) * 0.3
        return self.merge(s.softmax(-1) @ v)


class FillFromBuffer(Heads):
    """A causal ``masked_fill`` whose value is a 0-d buffer, changed between calls."""

    def __init__(self):
        super().__init__()
        self.register_buffer("low", torch.tensor(float("-inf")))

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(upper, self.low)
        return self.merge(s.softmax(-1) @ v)


def test_a_penalty_subtracted_with_alpha_is_replaced_exactly():
    torch.manual_seed(2)
    report = assert_same(SubtractedPenalty(), x_in(), torch.rand(2, 4, 8, 8) * 3)
    (site,) = report.sites
    assert site.replaced, report


def test_a_fill_buffer_changed_between_calls_is_read_again():
    """Through ``copy_`` (a new version) and through ``.data`` (a small CPU buffer, compared by value)."""
    torch.manual_seed(0)
    model = FillFromBuffer().eval()
    original = copy.deepcopy(model)
    optimized = attnopt.optimize(model)
    x = x_in()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), original(x), atol=2e-5, rtol=2e-5)
        assert optimized.attnopt_report.sites[0].replaced
        for change in (lambda m: m.low.copy_(torch.tensor(-1e4)), lambda m: m.low.data.fill_(0.0)):
            change(model)
            change(original)
            torch.testing.assert_close(optimized(x), original(x), atol=2e-5, rtol=2e-5)
