"""Every mask term materializes to the mask it names (checked against masks built by hand)."""

import pytest
import torch

from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window


def spec(nq=5, nk=7, **terms):
    q = torch.randn(2, 4, nq, 8)
    k = torch.randn(2, 2, nk, 8)
    return AttentionSpec.from_tensors(q, k, k, **terms)


def test_no_terms_materialize_to_nothing():
    keep, additive = spec().materialize()
    assert keep is None and additive == []


def test_causal_top_left_is_tril():
    keep, _ = spec(causal=True).materialize()
    assert torch.equal(keep[0, 0], torch.ones(5, 7, dtype=torch.bool).tril())


def test_causal_bottom_right_aligns_last_query_with_last_key():
    keep, _ = spec(causal=True, align=Align.BOTTOM_RIGHT).materialize()
    assert torch.equal(keep[0, 0], torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2))


def test_window_left_right_around_diagonal():
    keep, _ = spec(nq=6, nk=6, window=Window(2, 1)).materialize()
    i = torch.arange(6)[:, None]
    j = torch.arange(6)[None, :]
    assert torch.equal(keep[0, 0], (j >= i - 2) & (j <= i + 1))


def test_causal_window_is_band_below_diagonal():
    keep, _ = spec(nq=6, nk=6, causal=True, window=Window(2, 3)).materialize()
    i = torch.arange(6)[:, None]
    j = torch.arange(6)[None, :]
    assert torch.equal(keep[0, 0], (j >= i - 2) & (j <= i))


def test_key_padding_bool_and_lengths_agree():
    lengths = torch.tensor([3, 7])
    keep_len, _ = spec(key_padding=lengths).materialize()
    mask = torch.arange(7)[None, :] < lengths[:, None]
    keep_bool, _ = spec(key_padding=mask).materialize()
    assert torch.equal(keep_len, keep_bool)
    assert torch.equal(keep_len[:, 0, 0], mask)


def test_document_ids_are_block_diagonal():
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    keep, _ = spec(nq=5, nk=5, q_doc=ids, kv_doc=ids).materialize()
    expected = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3)).bool()
    assert torch.equal(keep[0, 0], expected)


def test_bias_and_dense_masks_pass_through_with_broadcast():
    bias = torch.randn(1, 4, 1, 7)
    dense = torch.rand(5, 7) > 0.5
    keep, additive = spec(bias=bias, mask=dense).materialize()
    assert torch.equal(keep.expand(2, 4, 5, 7)[1, 3], dense)
    assert len(additive) == 1 and torch.equal(additive[0].expand(2, 4, 5, 7)[0, 2, 3], bias[0, 2, 0])


def test_mask_terms_are_named():
    s = spec(causal=True, window=Window(3, 0), key_padding=torch.tensor([5, 7]), softcap=30.0)
    assert s.mask_terms == ("causal", "window", "key_padding", "softcap")


@pytest.mark.parametrize(
    "terms, message",
    [
        (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "does not broadcast"),
        (dict(key_padding=torch.ones(2, 6, dtype=torch.bool)), "key_padding_mask"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(softcap=-1.0), "softcap"),
        (dict(q_doc=torch.zeros(1, 5, dtype=torch.long)), "both q_doc and kv_doc"),
    ],
)
def test_validate_names_the_problem(terms, message):
    with pytest.raises(ValueError, match=message):
        spec(**terms).validate()


def test_window_rejects_negative_bounds():
    with pytest.raises(ValueError, match="non-negative"):
        Window(-1, 0)


def test_fill_values_are_stable_strings():
    assert {f.value for f in Fill} == {"-inf", "-inf_added", "finite", "finite_added", "safe", "finite_replaced_added"}


def test_rows_of_self_attention_documents_are_never_empty():
    """Query and key document ids that are the same memory (views of one id tensor, as a packed model's mask
    gives them) with the diagonal in the band: every row sees its own key, no fill is needed. Equal ids in
    other memory, other layouts, key padding, a mask, or a band without the diagonal keep the fill."""
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    q = torch.randn(2, 2, 6, 4)
    as_rows = ids[:, :, None].reshape(2, 6), ids[:, None, :].reshape(2, 6)  # two views: one address
    assert as_rows[0] is not as_rows[1]

    def spec(q_doc, kv_doc, **terms):
        return AttentionSpec.from_tensors(q, q, q, q_doc=q_doc, kv_doc=kv_doc, fill=Fill.FINITE_ADDED, **terms)

    for terms in ({}, {"causal": True}, {"causal": True, "align": Align.BOTTOM_RIGHT},
                  {"causal": True, "window": Window(2, 0)}, {"window": Window(1, 3)}):
        assert not spec(*as_rows, **terms).rows_may_be_empty(), terms
        assert not spec(ids, ids, **terms).rows_may_be_empty(), terms
        assert spec(ids, ids.clone(), **terms).rows_may_be_empty(), terms  # equal values, other memory
    assert spec(ids, ids, key_padding=torch.ones(2, 6, dtype=torch.bool)).rows_may_be_empty()
    assert spec(ids, ids, mask=torch.ones(6, 6, dtype=torch.bool)).rows_may_be_empty()
    assert spec(ids, ids, bias=torch.zeros(6, 6)).rows_may_be_empty()
    assert not spec(ids, ids, bias=torch.zeros(6, 6)).rows_may_be_empty(additive=False)
    wide = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    assert spec(wide[:, :6], wide[:, 1:]).rows_may_be_empty()  # same shape, shifted by one: not the same ids
    flat = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    rows, strided = flat.view(2, 6), flat.as_strided((2, 6), (1, 2))  # one address, other elements
    assert spec(rows, strided).rows_may_be_empty()
    meta = torch.empty(2, 6, dtype=torch.int64, device="meta")
    assert spec(meta, meta).rows_may_be_empty()  # no memory: nothing is read
