"""The flex backend's translation of a paged step into FlexAttention: its mask admits exactly
the slots the spec says each query sees, and its tile lists cover them (the compiled kernel
visits only listed tiles; the CPU's eager path ignores them, so this is their CPU check)."""

import pytest
import torch

from conformance.workloads import build_step
from optimized.flex_backend import TILE, flex_plan
from reference.metadata import AttnKind

STEPS = [
    ("decoder", (1, 5, 1), (97, 54, 200), None, dict(block_size=8, layout="fragmented")),
    ("decoder", (3, 1), (0, 40), None, dict(block_size=16, layout="shared", sliding_window=7)),
    ("decoder", (1,), (300,), None, dict(block_size=256, layout="highest")),
    ("encoder_decoder", (1, 1, 1), (4, 9, 2), (17, 1, 129), dict(layout="interleaved")),
    ("encoder_decoder", (2, 3), None, (40, 9), dict(block_size=1, layout="shuffled")),
    ("encoder", (0, 0), None, (54, 97), {}),
]


IDS = [f"{s[0]}-{i}" for i, s in enumerate(STEPS)]


@pytest.mark.parametrize("kind,q,c,e,extra", STEPS, ids=IDS)
def test_mask_and_tiles_match_the_spec(kind, q, c, e, extra):
    from torch.nn.attention.flex_attention import create_mask

    step = build_step(kind, q, c, e, num_heads=4, num_kv_heads=2, head_size=16, seed=1, **extra)
    md, kind = step.metadata, AttnKind(kind)
    p = flex_plan(*step.args()[:4], md, kind)
    num_seqs, _, max_q, _ = p["q"].shape
    pool = p["k"].shape[2]
    got = create_mask(p["mask_mod"], num_seqs, 1, max_q, pool, device="cpu")[:, 0]
    want = torch.zeros_like(got)
    for b in range(num_seqs):
        seen = md.sequence_mask(kind, b)  # [q_len, kv_len] in logical positions
        if kind == AttnKind.ENCODER:
            slots = sum(md.encoder_seq_lens[:b]) + torch.arange(seen.shape[1])
        else:
            table = md.tables_for(kind)[0][b].long()
            pos = torch.arange(seen.shape[1])
            slots = table[pos // md.block_size] * md.block_size + pos % md.block_size
        want[b, : seen.shape[0], slots] = seen
    assert torch.equal(got, want)
    dense = p["block_mask"].to_dense()[:, 0]  # [num_seqs, q_tiles, kv_tiles]
    for b in range(num_seqs):
        for j in range(max_q):
            tiles = got[b, j].nonzero().flatten() // TILE
            assert dense[b, j // TILE, tiles].all(), (b, j)
