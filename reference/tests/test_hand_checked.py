"""Tiny cases whose expected outputs are derived by hand."""

import math

import torch

from reference import AttnKind, StepMetadata, attention


def _single_block_step(num_keys: int, sliding_window=None):
    """One sequence prefilled with `num_keys` tokens in block 0 of a one-block cache."""
    md = StepMetadata(
        query_lens=(num_keys,),
        context_lens=(0,),
        block_size=num_keys,
        block_tables=torch.tensor([[0]]),
        slot_mapping=torch.arange(num_keys),
        sliding_window=sliding_window,
    )
    cache = (torch.full((1, num_keys, 1, 2), math.nan), torch.full((1, num_keys, 1, 2), math.nan))
    return md, cache


def test_one_key_gives_its_value():
    md, cache = _single_block_step(1)
    q = torch.tensor([[[3.0, -1.0]]])
    k = torch.tensor([[[0.5, 2.0]]])
    v = torch.tensor([[[7.0, -2.0]]])
    out = attention(q, k, v, cache, md, AttnKind.DECODER)
    assert out.tolist() == [[[7.0, -2.0]]]


def test_uniform_scores_give_the_mean_of_values():
    # Zero query: every score is 0, so softmax is uniform over the visible keys.
    q = torch.zeros(3, 1, 2)
    k = torch.randn(3, 1, 2)
    v = torch.tensor([[[1.0, 10.0]], [[2.0, 20.0]], [[6.0, 60.0]]])
    md = StepMetadata(query_lens=(0,), context_lens=(0,), encoder_seq_lens=(3,))
    out = attention(q, k, v, None, md, AttnKind.ENCODER)
    for row in range(3):  # encoder: every token sees all three
        assert torch.allclose(out[row, 0], torch.tensor([3.0, 30.0], dtype=torch.float64))


def test_causal_position_sees_exactly_its_prefix():
    md, cache = _single_block_step(3)
    q = torch.zeros(3, 1, 2)
    v = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[8.0, 0.0]]])
    out = attention(q, torch.randn(3, 1, 2), v, cache, md, AttnKind.DECODER)
    # position 0 sees v0; position 1 the mean of v0, v1; position 2 the mean of all three
    assert out[:, 0, 0].tolist() == [1.0, 2.0, 4.0]


def test_sliding_window_of_two_sees_itself_and_one_before():
    md, cache = _single_block_step(3, sliding_window=2)
    q = torch.zeros(3, 1, 2)
    v = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[8.0, 0.0]]])
    out = attention(q, torch.randn(3, 1, 2), v, cache, md, AttnKind.DECODER)
    assert out[:, 0, 0].tolist() == [1.0, 2.0, 5.5]


def test_two_keys_softmax_weights_by_hand():
    # q·k0 = 0, q·k1 = ln(3) * sqrt(2) so that after scale 1/sqrt(2) the weights are 1/4, 3/4.
    s = math.log(3.0) * math.sqrt(2.0)
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[[0.0, 0.0]], [[s, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[4.0, 0.0]], [[8.0, 0.0]]], dtype=torch.float64)
    md = StepMetadata(
        query_lens=(1,),
        context_lens=(0,),
        encoder_seq_lens=(2,),
        block_size=2,
        cross_block_tables=torch.tensor([[0]]),
        cross_slot_mapping=torch.tensor([0, 1]),
    )
    cache = (torch.full((1, 2, 1, 2), math.nan, dtype=torch.float64),) * 2
    cache = (cache[0].clone(), cache[1].clone())
    out = attention(q, k, v, cache, md, AttnKind.ENCODER_DECODER)
    assert math.isclose(out[0, 0, 0].item(), 0.25 * 4 + 0.75 * 8, rel_tol=1e-12)


def test_gqa_query_heads_share_their_kv_head():
    # 4 query heads on 2 kv heads: heads 0,1 read kv head 0; heads 2,3 read kv head 1.
    q = torch.zeros(1, 4, 2)
    k = torch.randn(1, 2, 2)
    v = torch.tensor([[[1.0, 1.0], [5.0, 5.0]]])
    md = StepMetadata(query_lens=(0,), context_lens=(0,), encoder_seq_lens=(1,))
    out = attention(q, k, v, None, md, AttnKind.ENCODER)
    assert out[0, :, 0].tolist() == [1.0, 1.0, 5.0, 5.0]


def test_padding_rows_are_zero():
    md, cache = _single_block_step(2)
    md = StepMetadata(**{**md.__dict__, "slot_mapping": torch.tensor([0, 1, -1])})
    q, kv = torch.randn(3, 1, 2), torch.randn(3, 1, 2)
    out = attention(q, kv, kv, cache, md, AttnKind.DECODER)
    assert out[2].abs().sum() == 0
    assert torch.isnan(cache[0][0]).sum() == 0  # both real slots written, nothing else exists
