"""The worked step example of reference/metadata.py, checked: its numbers are what the
metadata computes, validation accepts it, and the overwrite it names is rejected."""

from dataclasses import replace

import pytest
import torch

from reference import AttnKind, StepMetadata, attention, check_inputs


def _example():
    md = StepMetadata(
        query_lens=(3, 1),
        context_lens=(0, 6),
        encoder_seq_lens=(5, 2),
        block_size=4,
        block_tables=torch.tensor([[2, 0], [5, 1]]),
        slot_mapping=torch.tensor([8, 9, 10, 6]),
        cross_block_tables=torch.tensor([[3, 4], [7, 0]]),
        cross_slot_mapping=torch.tensor([12, 13, 14, 15, 16]),
    )
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    kv = tuple(torch.randn(8, 4, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return md, q, kv


def test_the_numbers_of_the_worked_example():
    md, q, kv = _example()
    assert md.query_start_loc == (0, 3, 4) and md.seq_lens == (3, 7)
    assert md.cross_write_lens == (5, 0)
    assert md.new_kv_positions(AttnKind.DECODER) == [(0, 0), (0, 1), (0, 2), (1, 6)]
    assert md.sequence_mask(AttnKind.DECODER, 0)[1].tolist() == [True, True, False]
    assert md.sequence_mask(AttnKind.DECODER, 1)[0].sum() == 7
    windowed = replace(md, sliding_window=4).sequence_mask(AttnKind.DECODER, 1)[0]
    assert windowed.nonzero().flatten().tolist() == [3, 4, 5, 6]
    key = torch.randn(4, 2, 8, dtype=torch.float64)
    check_inputs(q, key, key.clone(), kv, md, "decoder")
    enc = torch.randn(5, 2, 8, dtype=torch.float64)
    check_inputs(q, enc, enc.clone(), kv, md, "encoder_decoder")
    out = attention(q, enc, enc.clone(), tuple(c.clone() for c in kv), md, "encoder_decoder")
    assert out.shape == (4, 2, 8) and torch.isfinite(out).all()


def test_the_overwrite_the_example_names_is_rejected():
    md, q, kv = _example()
    key = torch.randn(4, 2, 8, dtype=torch.float64)
    # sequence 0 given sequence 1's first block: its prompt would land on slots 20-22
    bad = replace(
        md, block_tables=torch.tensor([[5, 0], [5, 1]]), slot_mapping=torch.tensor([20, 21, 22, 6])
    )
    with pytest.raises(ValueError, match="overwrites cached data: block 5 offset 0"):
        check_inputs(q, key, key.clone(), kv, bad, "decoder")
