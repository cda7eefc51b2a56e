"""The flex backend's translation of a paged step into FlexAttention: its mask admits exactly
the slots the spec says each query sees, and its tile lists cover them (the compiled kernel
visits only listed tiles; the CPU's eager path ignores them, so this is their CPU check)."""

import pytest
import torch

from conformance.workloads import build_step
from optimized.flex_backend import TILE, flex_plan, kernel_options, kv_tile_for
from reference.metadata import AttnKind

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the cache write is a Triton kernel

STEPS = [
    ("decoder", (1, 5, 1), (97, 54, 200), None, dict(block_size=8, layout="fragmented")),
    ("decoder", (3, 1), (0, 40), None, dict(block_size=16, layout="shared", sliding_window=7)),
    ("decoder", (1,), (300,), None, dict(block_size=256, layout="highest")),
    ("encoder_decoder", (1, 1, 1), (4, 9, 2), (17, 1, 129), dict(layout="interleaved")),
    ("encoder_decoder", (2, 3), None, (40, 9), dict(block_size=1, layout="shuffled")),
    ("encoder", (0, 0), None, (54, 97), {}),
]


IDS = [f"{s[0]}-{i}" for i, s in enumerate(STEPS)]


@pytest.mark.parametrize("page_tiles", [False, True], ids=["tile128", "tile-page"])
@pytest.mark.parametrize("kind,q,c,e,extra", STEPS, ids=IDS)
def test_mask_and_tiles_match_the_spec(kind, q, c, e, extra, page_tiles):
    from torch.nn.attention.flex_attention import create_mask

    step = build_step(kind, q, c, e, num_heads=4, num_kv_heads=2, head_size=16, seed=1, **extra)
    step = step.to(DEVICE)
    md, kind = step.metadata, AttnKind(kind)
    kv_tile = kv_tile_for(md.block_size) if page_tiles else TILE
    p = flex_plan(*step.args()[:4], md, kind, kv_tile=kv_tile)
    num_seqs, _, max_q, _ = p["q"].shape
    pool = p["k"].shape[2]
    got = create_mask(p["mask_mod"], num_seqs, 1, max_q, pool, device=DEVICE)[:, 0].cpu()
    want = torch.zeros_like(got)
    for b in range(num_seqs):
        seen = md.sequence_mask(kind, b).cpu()  # [q_len, kv_len] in logical positions
        if kind == AttnKind.ENCODER:
            slots = sum(md.encoder_seq_lens[:b]) + torch.arange(seen.shape[1])
        else:
            table = md.tables_for(kind)[0][b].long().cpu()
            pos = torch.arange(seen.shape[1])
            slots = table[pos // md.block_size] * md.block_size + pos % md.block_size
        want[b, : seen.shape[0], slots] = seen
    assert torch.equal(got, want)
    bm = p["block_mask"]
    dense = bm.to_dense()[:, 0].cpu()  # [num_seqs, q_tiles, kv_tiles]: partial or full
    full_n, full_i = bm.full_kv_num_blocks[:, 0, 0], bm.full_kv_indices[:, 0, 0]
    q_lens = md.query_lens_for(kind)
    for b in range(num_seqs):
        for j in range(max_q):
            tiles = got[b, j].nonzero().flatten() // kv_tile
            assert dense[b, j // TILE, tiles].all(), (b, j)
        # A full tile skips mask_mod: every real query row must see all of its slots.
        for t in full_i[b, : full_n[b]].tolist():
            assert got[b, : q_lens[b], t * kv_tile : (t + 1) * kv_tile].all(), (b, t)


def test_full_tiles_are_found_where_pages_are_whole():
    """Across-attention over whole pages lists them as full tiles (mask_mod skipped there);
    a window leaves none full."""
    step = build_step(
        "encoder_decoder",
        (1, 1),
        None,
        (64, 40),
        num_heads=4,
        num_kv_heads=2,
        head_size=16,
        seed=1,
        block_size=16,
        layout="shuffled",
    )
    step = step.to(DEVICE)
    p = flex_plan(*step.args()[:4], step.metadata, AttnKind.ENCODER_DECODER, kv_tile=16)
    assert p["block_mask"].full_kv_num_blocks[:, 0, 0].tolist() == [4, 2]
    assert p["block_mask"].kv_num_blocks[:, 0, 0].tolist() == [0, 1]  # 40 = 2 pages + 8 slots
    step = build_step(
        "decoder",
        (1,),
        (100,),
        None,
        num_heads=4,
        num_kv_heads=2,
        head_size=16,
        seed=1,
        block_size=16,
        sliding_window=33,
    )
    step = step.to(DEVICE)
    p = flex_plan(*step.args()[:4], step.metadata, AttnKind.DECODER, kv_tile=16)
    assert p["block_mask"].full_kv_num_blocks.sum() == 0


def test_kernel_options_force_the_main_kernel_past_one_query_tile():
    """FlexAttention's decode kernel packs queries × group into one <= 128-row tile; past it
    no configuration exists (the H100's NoValidChoicesError), so the main kernel is forced."""
    assert kernel_options(1, 32, 4) == {}
    assert kernel_options(16, 8, 1) == {}  # 16 × 8 = 128
    assert kernel_options(19, 8, 1) == {"FORCE_USE_FLEX_ATTENTION": True}
    assert kernel_options(37, 8, 2) == {"FORCE_USE_FLEX_ATTENTION": True}
    assert kernel_options(127, 4, 4) == {}
    assert kernel_options(129, 4, 4) == {"FORCE_USE_FLEX_ATTENTION": True}
    # One fp32 sequence: the main kernel with small blocks (ptxas stalled on the default).
    small = kernel_options(19, 8, 2, num_seqs=1, fp32=True)
    assert small["FORCE_USE_FLEX_ATTENTION"] and small["BLOCK_M"] == small["BLOCK_N"] == 32
    assert kernel_options(19, 8, 2, num_seqs=2, fp32=True) == {}
    assert kernel_options(19, 8, 2, num_seqs=1, fp32=False) == {}


@pytest.mark.parametrize(
    "kind, q, c, e, kv",
    [
        ("decoder", (1, 1, 1), (37, 5, 80), None, "auto"),
        ("decoder", (6, 1), (0, 20), None, "fp8_e4m3"),
        ("encoder_decoder", (1, 3), (4, 0), (40, 33), "auto"),
        ("encoder", (1, 1), None, (19, 7), "auto"),
    ],
)
def test_the_prepared_call_is_forward_bit_for_bit(kind, q, c, e, kv):
    """flex's `prepare()` (what the bench times) returns, call after call, exactly what its
    `forward` returns on the same step, and writes the same caches."""
    from conformance.runner import poison_finite
    from conformance.workloads import AUTO, KVFormat
    from optimized.flex_backend import FlexBackend

    fmt = AUTO if kv == "auto" else KVFormat(kv, (0.02, 0.05), (0.04, 0.01))
    step = build_step(kind, q, c, e, block_size=8, num_heads=4, num_kv_heads=2, head_size=32,
                      seed=3, kv_format=fmt).to(DEVICE)  # fmt: skip
    backend = FlexBackend()
    want, mine = (poison_finite(step.with_fresh_cache()) for _ in range(2))
    expected = backend.forward(*want.args())
    call = backend.prepare(*mine.args())
    for _ in range(2):
        assert torch.equal(call(), expected)
    if step.kv_cache is not None:
        for a, b in zip(want.kv_cache, mine.kv_cache):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
