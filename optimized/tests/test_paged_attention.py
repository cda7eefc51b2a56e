"""The paged-attention kernel's launch variants against the reference: block size and split count
are runtime arguments (one compiled kernel serves them all), so every combination must still
agree with the spec, including more splits than a sequence has K/V tiles (empty splits)."""

import pytest
import torch
import triton

from conformance.compare import compare_output
from conformance.workloads import build_step
from optimized.ops.paged_attention import paged_attention
from optimized.ops.plan import Launch, make_schedule
from reference import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


VARIANTS = [  # num_splits, reduce_rows, fused, heads per program
    (1, None, True, 1),
    (2, None, True, 1),
    (7, None, True, 1),
    (2, None, False, 1),
    (7, None, False, 1),
    (3, 1, False, 1),
    (1, None, True, 2),
    (7, None, True, 2),
    (2, None, False, 2),  # several heads per program merge in the kernel regardless
]
VARIANT_IDS = ["1", "2-fused", "7-fused", "2-reduce", "7-reduce", "3-reduce-row", "1-h2", "7-h2",
               "2-h2"]  # fmt: skip
GEOMETRIES = [(4, 4, 64, None), (2, 2, 80, 9), (8, 2, 32, None)]  # heads, kv heads, d, window
GEOMETRY_IDS = ["mha-d64", "mha-d80-window", "gqa4-d32"]
# Every launch variant on every geometry; block size and dtype rotate over them, so every
# pair of (variant, geometry, block size, dtype) values meets at least once.
DECODE_CASES = [
    pytest.param(
        *g,
        [1, 8, 32][(i + j) % 3],
        [torch.float32, torch.bfloat16][(i + j) % 2],
        *v,
        id=f"{gid}-{vid}",
    )
    for i, (v, vid) in enumerate(zip(VARIANTS, VARIANT_IDS))
    for j, (g, gid) in enumerate(zip(GEOMETRIES, GEOMETRY_IDS))
]


@pytest.mark.parametrize(
    "heads,kv_heads,head_size,window,block_size,dtype,num_splits,reduce_rows,fused,heads_pp",
    DECODE_CASES,
)
def test_decode_variants_match_reference(
    heads, kv_heads, head_size, window, block_size, dtype, num_splits, reduce_rows, fused, heads_pp
):
    step = build_step(
        "decoder",
        (1, 1, 1),
        (40, 7, 65),
        block_size=block_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        dtype=dtype,
        layout="shuffled",
        sliding_window=window,
        seed=11,
    )
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())  # also writes the new tokens into the reference's cache
    key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
    md = step.metadata
    schedule = make_schedule(
        md.query_lens, md.kv_lens_for(step.attn_kind), md.context_lens, heads // kv_heads, DEVICE
    )
    out = paged_attention(
        step.query.to(DEVICE),
        key_cache,
        value_cache,
        md.block_tables.to(DEVICE),
        schedule,
        causal=True,
        scale=md.scale_for(head_size),
        sliding_window=window,
        num_splits=num_splits,
        launch=Launch(16, 4, 1),
        reduce_rows=reduce_rows,  # 1: the GPU's one row per reduce program
        fused_reduce=fused,
        heads=heads_pp,
    )
    comp = compare_output(step, out.cpu(), ref)
    assert comp.ok, comp.reason


def test_fused_reduce_leaves_its_counters_at_zero_and_repeats_bit_for_bit():
    """The last split of each (tile, kv head) resets its arrival counter: a second launch
    (a graph replay) finds them at zero and gives the same bits; the separate reduce agrees."""
    from optimized.ops import paged_attention as pa

    step = build_step(
        "decoder",
        (1, 1),
        (90, 33),
        block_size=8,
        num_heads=8,
        num_kv_heads=2,
        head_size=32,
        seed=3,
        layout="shuffled",
    )
    ref_step = step.with_fresh_cache()
    attention(*ref_step.args())
    key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
    md = step.metadata
    schedule = make_schedule(
        md.query_lens, md.kv_lens_for(step.attn_kind), md.context_lens, 4, DEVICE
    )

    def run(fused):
        return paged_attention(
            step.query.to(DEVICE),
            key_cache,
            value_cache,
            md.block_tables.to(DEVICE),
            schedule,
            causal=True,
            scale=md.scale_for(32),
            num_splits=3,
            launch=Launch(16, 4, 1),
            fused_reduce=fused,
        )

    first = run(True)
    assert int(pa._ARRIVALS[first.device].abs().sum()) == 0
    assert torch.equal(run(True), first)
    torch.testing.assert_close(run(False), first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_q", [None, 1, 2, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
def test_cross_prefill_any_query_tile_matches_reference(heads, kv_heads, block_q):
    """A few decoder tokens per sequence against the encoder's cross cache: every query tile
    (one token per program, tiles larger than the queries, the automatic pick) agrees with the
    spec, and padding rows of a tile never leak into the output."""
    step = build_step(
        "encoder_decoder",
        (3, 1, 5),
        encoder_seq_lens=(40, 7, 65),
        block_size=8,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=32,
        layout="shuffled",
        seed=5,
    )
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())  # writes the encoder's K/V into the cross cache
    key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
    md = step.metadata
    tables, _ = md.tables_for("encoder_decoder")
    schedule = make_schedule(
        md.query_lens,
        md.kv_lens_for("encoder_decoder"),
        (0, 0, 0),
        heads // kv_heads,
        DEVICE,
        block_q=block_q,
    )
    out = paged_attention(
        step.query.to(DEVICE),
        key_cache,
        value_cache,
        tables.to(DEVICE),
        schedule,
        causal=False,
        scale=md.scale_for(32),
        launch=Launch(16, 4, 1),
    )
    comp = compare_output(step, out.cpu(), ref)
    assert comp.ok, comp.reason


@pytest.mark.parametrize("heads_pp", [1, 2, 4, 8])
def test_cross_decode_several_heads_per_program_matches_reference(heads_pp):
    """One decoder token per sequence against the cross cache with 1-8 adjacent kv heads per
    program (MHA 8 heads, head size 32: up to 256 K/V columns a row), with a head-strided cache
    view too (heads not adjacent in memory)."""
    step = build_step(
        "encoder_decoder",
        (1, 1, 1),
        encoder_seq_lens=(40, 7, 65),
        block_size=8,
        num_heads=8,
        num_kv_heads=8,
        head_size=32,
        layout="shuffled",
        seed=9,
    )
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())
    md = step.metadata
    tables, _ = md.tables_for("encoder_decoder")
    schedule = make_schedule((1, 1, 1), md.kv_lens_for("encoder_decoder"), (0, 0, 0), 1, DEVICE)
    for strided in (False, True):
        key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
        if strided:  # every other slot of a wider head axis
            key_cache, value_cache = (
                torch.stack([c, torch.full_like(c, float("nan"))], dim=3).flatten(2, 3)[:, :, ::2]
                for c in (key_cache, value_cache)
            )
        out = paged_attention(
            step.query.to(DEVICE),
            key_cache,
            value_cache,
            tables.to(DEVICE),
            schedule,
            causal=False,
            scale=md.scale_for(32),
            launch=Launch(16, 4, 1),
            heads=heads_pp,
        )
        comp = compare_output(step, out.cpu(), ref)
        assert comp.ok, (strided, comp.reason)


def test_heads_per_program_is_checked():
    step = build_step(
        "decoder", (1, 2), (5, 9), block_size=8, num_heads=4, num_kv_heads=4, head_size=32, seed=1
    )
    md = step.metadata
    key_cache, value_cache = (c.to(DEVICE) for c in step.kv_cache)
    args = (step.query.to(DEVICE), key_cache, value_cache, md.block_tables.to(DEVICE))
    schedule = make_schedule(md.query_lens, md.kv_lens_for("decoder"), md.context_lens, 1, DEVICE)
    for bad in (3, 8):  # not a power of two; does not divide the 4 kv heads
        with pytest.raises(ValueError, match="heads_per_program"):
            paged_attention(*args, schedule, causal=True, scale=0.2, heads=bad)
    with pytest.raises(ValueError, match="only for decode steps"):  # a 2-token query
        paged_attention(*args, schedule, causal=True, scale=0.2, heads=2)


def test_the_output_takes_the_querys_layout():
    """The kernel writes each output row where the query's is: an `out` of another layout is
    refused naming it; without one, a strided query's output comes back in its strides."""
    step = build_step("decoder", (3, 1), (0, 5), block_size=8, num_heads=4, head_size=32, seed=2)
    md = step.metadata
    key_cache, value_cache = (c.to(DEVICE) for c in step.kv_cache)
    schedule = make_schedule(md.query_lens, md.kv_lens_for("decoder"), md.context_lens, 1, DEVICE)
    wide = torch.zeros(step.query.shape[0], 8, 32, dtype=step.query.dtype, device=DEVICE)
    query = wide[:, ::2]  # every other head of a wider tensor: strided
    query.copy_(step.query.to(DEVICE))
    args = (query, key_cache, value_cache, md.block_tables.to(DEVICE), schedule)
    with pytest.raises(ValueError, match="out: expected the query's layout"):
        paged_attention(*args, causal=True, scale=0.2, out=torch.zeros(query.shape))
    strided = paged_attention(*args, causal=True, scale=0.2)
    dense = paged_attention(query.contiguous(), *args[1:], causal=True, scale=0.2)
    assert strided.stride() == query.stride()
    torch.testing.assert_close(strided, dense, rtol=0, atol=0, equal_nan=True)


def test_host_integer_helpers_agree_with_triton():
    """The launchers' plain-Python cdiv / next_power_of_2 (Triton's are slow JIT wrappers on the
    host) give Triton's answers on every value they see."""
    from optimized.kernels import cdiv, next_power_of_2

    for n in range(1, 600):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
