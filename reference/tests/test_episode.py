"""A whole encoder/decoder episode through the reference, caches carried between steps, equals
recomputing every step from scratch (whole histories, no cache)."""

import math

import pytest
import torch

from conformance.workloads import build_episode
from reference import AttnKind, attention
from reference.tests.dense import dense_attention


@pytest.mark.parametrize(
    "block_size,layout", [(4, "interleaved"), (1, "shuffled"), (16, "fragmented")]
)
def test_episode_equals_recompute_from_scratch(block_size, layout):
    ep = build_episode(
        (7, 3, 12),
        (2, 5, 1),
        num_decode_steps=4,
        block_size=block_size,
        num_heads=4,
        num_kv_heads=2,
        head_size=8,
        layout=layout,
        seed=3,
    )
    kinds = [s.attn_kind for s in ep.steps]
    assert kinds[0] == AttnKind.ENCODER and len(kinds) == 1 + 2 * 5
    for step in ep.steps:
        out = attention(*step.args())
        torch.testing.assert_close(out, dense_attention(step), rtol=1e-10, atol=1e-10)
    # the cross cache was written once; self and cross blocks share the pool without overlap
    md = ep.steps[-1].metadata
    self_blocks = {
        int(b)
        for i, n in enumerate(md.seq_lens)
        for b in md.block_tables[i, : math.ceil(n / block_size)]
    }
    cross_blocks = {
        int(b)
        for i, n in enumerate(md.encoder_seq_lens)
        for b in md.cross_block_tables[i, : math.ceil(n / block_size)]
    }
    assert not self_blocks & cross_blocks


def test_cross_decode_reads_what_prefill_wrote():
    ep = build_episode((5,), (3,), num_decode_steps=1, block_size=2, head_size=8, seed=0)
    cross_prefill, cross_decode = ep.steps[2], ep.steps[4]
    assert cross_prefill.key is not None and cross_decode.key is None
    attention(*ep.steps[1].args())
    attention(*cross_prefill.args())
    attention(*ep.steps[3].args())
    out = attention(*cross_decode.args())
    torch.testing.assert_close(out, dense_attention(cross_decode), rtol=1e-10, atol=1e-10)
