"""The paged-attention kernel's launch variants against the reference: block size and split count
are runtime arguments (one compiled kernel serves them all), so every combination must still
agree with the spec, including more splits than a sequence has K/V tiles (empty splits)."""

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

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


H100_SMEM = 232_448  # shared memory per block (opt-in) the H100 and H200 report


def test_shared_memory_model_and_every_launch_config_fits(monkeypatch):
    """The shared-memory model against what Triton/ncu reported on the GPU, and every GPU
    launch configuration (head size × dtype × phase) under the sm_90 limit. fp32 with head size
    256 at prefill once asked for 344,320 bytes and failed to launch on the H100."""
    from optimized.ops import plan as pa

    assert pa.smem_bytes(64, 64, 256, 4, 3) == 344_320  # Triton's OutOfResources message
    # ncu (H200), decode: GQA 8:1 d128 bf16 tile 64 → 38,912; MHA d64 tile 32 → 11,264
    assert 0 <= pa.smem_bytes(16, 64, 128, 2, 2) - 38_912 < 4096
    assert 0 <= pa.smem_bytes(16, 32, 64, 2, 2) - 11_264 < 4096
    monkeypatch.setattr(pa, "interpreting", lambda: False)  # the GPU's configurations
    for head_size in (64, 80, 96, 128, 256):
        for elem_bytes in (2, 4):
            for prefill, block_m in ((True, 64), (False, 16), (False, 32), (False, 64)):
                head_pad = triton.next_power_of_2(head_size)
                # sm_90, and a 99 KB part (sm_86/89) for 16-bit dtypes (fp32 d256 prefill needs
                # 100 KB at the smallest tile there: it cannot launch on such a part)
                smems = (H100_SMEM, 101_376) if elem_bytes == 2 else (H100_SMEM,)
                for smem in smems:
                    for paged in (True, False):  # packed K/V: a K/V tile a stage
                        cands = pa.launch_candidates(
                            head_pad, prefill, block_m, elem_bytes, smem, paged=paged
                        )
                        for c in cands:
                            paged_decode = paged and not prefill
                            bufs = pa.decode_kv_buffers(c.num_stages) if paged_decode else None
                            used = pa.smem_bytes(
                                block_m, c.tile_n, head_pad, elem_bytes, c.num_stages, bufs
                            )
                            assert used <= smem, (head_size, elem_bytes, prefill, paged, c, smem)
    # two d64 heads a program (128 K/V columns, 16 rows), and fp8 decode's doubled tiles
    for elem_bytes in (2, 4):
        for heads, fp8 in ((2, False), (1, True), (2, True)):
            for c in pa.launch_candidates(128, False, 16, elem_bytes, H100_SMEM, heads, fp8):
                bufs = pa.decode_kv_buffers(c.num_stages)
                assert pa.smem_bytes(16, c.tile_n, 128, elem_bytes, c.num_stages, bufs) <= H100_SMEM


def test_query_tile_holds_the_longest_query():
    """Rows per program = tokens × padded group: 16 at decode, as few as hold the longest query
    of a short prefill (not a 64-row tile of padding), 64 for long queries."""
    from optimized.ops.plan import block_q_for

    rows = lambda ql, group: block_q_for(ql, group) * triton.next_power_of_2(group)
    assert (block_q_for(1, 1), rows(1, 1)) == (16, 16)
    assert (block_q_for(4, 1), rows(4, 1)) == (16, 16)  # Whisper cross prefill of 4 tokens
    assert (block_q_for(4, 4), rows(4, 4)) == (4, 16)
    assert (block_q_for(3, 6), rows(3, 6)) == (4, 32)  # group 6 pads to 8, 3 tokens to 4
    assert (block_q_for(32, 1), rows(32, 1)) == (32, 32)
    assert (block_q_for(33, 1), rows(33, 1)) == (64, 64)
    assert (block_q_for(512, 8), rows(512, 8)) == (8, 64)
    assert (block_q_for(1, 32), rows(1, 32)) == (1, 32)
    assert (block_q_for(5, 64), rows(5, 64)) == (1, 64)  # one token of 64 heads per program
    with pytest.raises(ValueError, match="block_q"):
        make_schedule((4,), (8,), (0,), 1, DEVICE, block_q=3)


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


@settings(max_examples=200, deadline=None)
@given(
    kv_heads=st.integers(1, 64),
    group_pad=st.sampled_from([1, 2, 4, 8, 16]),
    head_pad=st.sampled_from([16, 32, 64, 128, 256]),
    decode=st.booleans(),
    programs=st.one_of(st.none(), st.integers(1, 50_000)),
    kv_len=st.integers(1, 65_536),
)
def test_heads_per_program_is_always_a_legal_launch(
    kv_heads, group_pad, head_pad, decode, programs, kv_len
):
    """Whatever the rule picks, on any grid, the launcher accepts it: one head outside decode,
    else a power of two dividing the kv heads whose padded group rows fit a 16-row tile."""
    from optimized.ops.plan import heads_per_program

    n = heads_per_program(kv_heads, group_pad, head_pad, decode, programs, 132, kv_len)
    assert n >= 1 and n & (n - 1) == 0 and kv_heads % n == 0 and group_pad * n <= 16
    assert decode or n == 1


def test_two_heads_a_program_only_where_the_grid_is_not_tiny():
    """MHA d64 decode takes two heads a program, except on a grid under three one-head programs
    an SM with a short context (H200: Whisper/BART decode at batch 1 and 16); without the grid
    (the interpreter) the rule is the grid-free one, so CPU tiers cover both variants."""
    from optimized.ops.plan import heads_per_program

    mha_d64 = lambda programs, kv: heads_per_program(20, 1, 64, True, programs, 132, kv)
    assert mha_d64(20, 448) == 1 and mha_d64(320, 1500) == 1  # Whisper b1, b16 cross
    assert mha_d64(1280, 448) == 2  # Whisper b64
    assert mha_d64(128, 32_768) == 2  # batch 4 at 32k: splits fill it
    assert heads_per_program(20, 1, 64, True) == 2
    assert heads_per_program(8, 4, 128, True, 20, 132, 448) == 1  # GQA: never two


@settings(max_examples=300, deadline=None)
@given(
    auto=st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]),
    kv_tiles=st.integers(1, 5_000),
    programs=st.integers(1, 20_000),
    slots=st.integers(1, 5_000),
)
def test_split_counts_are_the_rules_count_then_counts_that_fit_one_wave(
    auto, kv_tiles, programs, slots
):
    """The counts the score weighs: the split rule's own first (ties keep it), none, the most
    that merge in the kernel where the rule's needs a second launch, and more: powers of two of
    at least one K/V tile a split, at most MAX_AUTO_SPLITS, whose grid fits one wave."""
    from optimized.ops import plan

    counts = plan.split_counts(auto, kv_tiles, programs, slots)
    assert counts[0] == auto and 1 in counts and len(set(counts)) == len(counts)
    for n in counts:
        if n in (1, auto):
            continue
        if n < auto:
            assert n == plan.FUSED_REDUCE_MAX_SPLITS
            continue
        assert n & (n - 1) == 0 and n <= plan.MAX_AUTO_SPLITS
        assert n * plan.MIN_TILES_PER_SPLIT <= kv_tiles and programs * n <= slots


def test_a_second_launch_to_merge_splits_costs_a_short_step_more():
    """Eight splits (a separate reduce) against four (merged in the kernel) on GQA 8:1 decode at
    batch 16 on the H200: at 1k context the step is ~7 us at full bandwidth and the second
    launch tips it to four (measured 25.8 vs 27.0 us); at 4k it does not (54.9 vs 57.8)."""
    from optimized.ops import plan as pa

    launch, tile = pa.Launch(64, 4, 2), 64 * 2 * 128 * 2
    four = pa.Option(launch, 4, 4, 256, tile)
    eight = pa.Option(launch, 8, 4, 512, tile, reduce_launch=True)
    h200 = pa.in_flight_saturates(3_201_000, 6016, 132)
    bandwidth = 3_201_000 * 1e3 * 6016 / 8 * 2 / 1e6  # bytes per us
    for context, want in ((1024, 4), (4096, 8)):
        ideal = 16 * 4 * context * 2 * 128 * 2 / bandwidth
        options = [four, eight]
        assert options[pa.pick_launch(options, 132, h200, ideal)].splits == want, context
    assert [four, eight][pa.pick_launch([four, eight], 132, h200)].splits == 8  # no cost: 8


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


def test_occupancy_model_matches_what_ncu_measured():
    """Resident programs from registers, warps and shared memory, against ncu's readings on the
    H100 (registers as Triton 3.6 compiled them), and the wave efficiency's edge cases."""
    from optimized.ops import plan as pa

    assert pa.resident_programs(92, 2, 11_264) == 10  # Whisper self decode, 31% occupancy
    assert pa.resident_programs(111, 4, 38_912) == 4  # GQA 8:1 d128 decode
    assert pa.resident_programs(80, 2, 11_264) == 12  # T5 cross decode
    assert pa.resident_programs(40, 1, 0) == 32  # the block limit
    assert pa.resident_programs(64, 4, 120_000) == 1  # shared memory
    assert pa.wave_efficiency(1280, 1320) == 1.0
    assert pa.wave_efficiency(2048, 1584) == pytest.approx(2048 / 1584 / 2)
    assert pa.wave_efficiency(10, 0) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    resident=st.integers(1, 16),
    programs=st.integers(1, 20_000),
    tile=st.sampled_from([16, 32, 64, 128]),
)
def test_launch_score_prefers_fuller_waves_and_more_bytes_in_flight(resident, programs, tile):
    """The score never prefers, all else equal, a launch that holds fewer programs per SM or
    moves fewer bytes per tile, nor a split where the unsplit grid fills its waves and memory."""
    from optimized.ops import plan as pa

    launch = pa.Launch(tile, 4, 2)
    score = lambda r, b, s: pa.launch_score(pa.Option(launch, s, r, programs * s, b), 132)
    bytes_ = tile * 2 * 128 * 2
    assert score(resident + 1, bytes_, 1) >= score(resident, bytes_, 1) - 1e-9 or (
        programs > 132 * resident  # more resident slots can leave a worse last wave
    )
    assert score(resident, 2 * bytes_, 1) >= score(resident, bytes_, 1)
    full = pa.wave_efficiency(programs, resident * 132) == 1.0
    saturated = min(programs / 132, resident) * bytes_ >= pa.IN_FLIGHT_SATURATES
    if full and saturated and programs >= 132:  # nothing left for a split to win: it only costs
        assert score(resident, bytes_, 2) <= score(resident, bytes_, 1)
    if saturated and 2 * programs <= 132:  # idle SMs an SM's share of bandwidth each: a split
        assert score(resident, bytes_, 2) > score(resident, bytes_, 1)  # that busies them wins


def test_bytes_in_flight_that_saturate_memory_scale_with_the_cards_bandwidth_per_sm():
    """The H100's fit stands on the H100; a card with more bandwidth per SM needs more bytes in
    flight, so on the H200 half a wave of 62 KB-in-flight programs loses to two splits with
    124 KB (measured 184 -> 143 us: reports/results/h200/tune-card.csv), on the H100 not."""
    from optimized.ops import plan as pa

    h100 = pa.in_flight_saturates(*pa.H100_MEMORY)
    h200 = pa.in_flight_saturates(3_201_000, 6016, 132)
    assert h100 == pa.IN_FLIGHT_SATURATES and 68 << 10 < h200 < 70 << 10
    assert pa.in_flight_saturates(0, 0, 132) == h100  # a torch without the figures
    assert pa.in_flight_saturates(2_619_000, 5120, 114) > h100  # fewer SMs, same memory
    launch = pa.Launch(64, 4, 2)
    tile = 64 * 2 * 128 * 2  # two d64 heads a program, bf16
    options = [pa.Option(launch, 2, 4, 512, tile), pa.Option(launch, 1, 4, 256, tile)]
    assert options[pa.pick_launch(options, 132, h100)].splits == 1
    assert options[pa.pick_launch(options, 132, h200)].splits == 2


def test_host_integer_helpers_agree_with_triton():
    """The launchers' plain-Python cdiv / next_power_of_2 (Triton's are slow JIT wrappers on the
    host) give Triton's answers on every value they see."""
    from optimized.kernels import cdiv, next_power_of_2

    for n in range(1, 600):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@settings(max_examples=300, deadline=None)
@given(
    programs=st.integers(1, 20_000),
    kv_tiles=st.integers(1, 5_000),
    head_pad=st.sampled_from([16, 32, 64, 128, 256]),
    sms=st.integers(1, 200),
)
def test_split_rule_properties(programs, kv_tiles, head_pad, sms):
    """Whatever the GPU: a split count is a power of two or a cap, at most MAX_AUTO_SPLITS, every
    split walks at least four K/V tiles, and a grid that already fills its target is not split."""
    from optimized.ops import plan

    real = plan.num_sms
    plan.num_sms = lambda device: sms
    try:
        n = plan.choose_num_splits(programs, kv_tiles, torch.device("cuda"), head_pad=head_pad)
    finally:
        plan.num_sms = real
    assert 1 <= n <= plan.MAX_AUTO_SPLITS
    assert n == 1 or n <= kv_tiles // 4
    assert n == 1 or programs < 5 * sms
    assert n & (n - 1) == 0 or n == kv_tiles // 4


def _h200_planner(monkeypatch):
    """plan.py as it plans on an H200 (132 SMs, its memory figures), without one."""
    from optimized.ops import plan as pa

    monkeypatch.setattr(pa, "interpreting", lambda: False)
    monkeypatch.setattr(pa, "smem_limit", lambda dev: H100_SMEM)
    monkeypatch.setattr(pa, "num_sms", lambda dev: 132)
    monkeypatch.setattr(pa, "card_memory", lambda dev: (3_201_000, 6016, 132))
    monkeypatch.setattr(pa, "_CHOSEN", pa.Memo())
    return pa


# (resident programs, K/V buffers) of the GQA d128 bf16 decode launches, compiled for sm_90
SM90_D128 = {(64, 4, 2): (4, 1), (128, 4, 5): (1, 2), (32, 4, 5): (5, 2)}


@pytest.mark.parametrize(
    "batch, context, kv_heads, want",
    [
        (16, 4096, 8, (128, 4, 5, 1)),  # 128 programs: one wave of double buffers (78.3 us)
        (16, 1024, 4, (128, 4, 5, 2)),  # 64 programs: two splits fill the SMs (23.3 us)
        (16, 4096, 4, (128, 4, 5, 2)),  # 64 programs: two splits make one wave (51.0 us)
        (64, 4096, 4, (64, 4, 2, 2)),  # 256 programs: more than a wave of double buffers
        (1, 1024, 4, (32, 4, 5, 32)),  # 4 programs: 32 splits of 32-token double buffers
        # (11.2 us; the single-buffered 16 splits 12.5: tune-tiny-rerun.csv)
    ],
)
def test_double_buffered_launch_where_one_wave_holds_the_grid(
    monkeypatch, batch, context, kv_heads, want
):
    """Five stages (two K/V tiles a program) are weighed where the grid, splits included, is
    half to one wave of them, with the split count that makes one wave: a grid of fewer
    programs than SMs is split first (64 programs of one split: 66.4 us, two: 51.0 against the
    default's 54.6 on GQA 8:1 batch 16 at 4k); past one wave the single-buffered default stays
    (H200: double buffers lost 6-12% at two waves: reports/results/h200/tune-stages.csv); on
    a few programs the 32-token double buffers with many splits win."""
    pa = _h200_planner(monkeypatch)
    sched = make_schedule((1,) * batch, (context,) * batch, (context - 1,) * batch, 32 // kv_heads,
                          "cpu")  # fmt: skip
    probe = lambda c, splits: SM90_D128[(c.tile_n, c.num_warps, c.num_stages)]
    cuda = torch.device("cuda")
    p = pa.make_plan(sched, num_kv_heads=kv_heads, group=32 // kv_heads, head_size=128,
                     elem_bytes=2, kv_elem_bytes=2, device=cuda, probe=probe)  # fmt: skip
    L = p.launch
    assert (L.tile_n, L.num_warps, L.num_stages, p.num_splits) == want


def test_double_buffers_are_offered_whole_or_not_at_all():
    """Where shared memory holds two 128-token tiles (sm_90: 227 KB a block) the decode
    candidates of one d64 or d128 head include the five-stage launch; for d128 on a 99 KB part
    (sm_86/89) they do not (it would shrink to one buffer), nor for fp8 caches, fp32 queries,
    two-head programs, d256 or packed K/V."""
    from optimized.ops import plan as pa

    gpu = lambda *a, **k: pa._gpu_launch_candidates(*a, **k)
    assert pa.DOUBLE_BUFFERS in gpu(128, False, 16, 2, H100_SMEM)
    assert pa.DOUBLE_BUFFERS in gpu(64, False, 16, 2, H100_SMEM)  # one d64 head
    assert pa.DOUBLE_BUFFERS not in gpu(256, False, 16, 2, H100_SMEM)  # d256: not measured
    assert pa.DOUBLE_BUFFERS not in gpu(128, False, 16, 2, 101_376)
    assert pa.DOUBLE_BUFFERS not in gpu(128, False, 16, 2, H100_SMEM, 1, True)  # fp8 cache
    assert pa.DOUBLE_BUFFERS not in gpu(128, False, 16, 4, H100_SMEM)  # fp32
    assert pa.DOUBLE_BUFFERS not in gpu(128, False, 16, 2, H100_SMEM, 2)  # two d64 heads
    assert pa.DOUBLE_BUFFERS not in gpu(128, True, 64, 2, H100_SMEM)  # prefill
    # Packed K/V (an encoder of short sequences): five stages are four K/V tiles there, 270 KB
    # at d128 as compiled for sm_90 (137 KB at d64), so the launch failed on the GPU.
    for head_pad in (64, 128):
        assert pa.DOUBLE_BUFFERS not in gpu(head_pad, False, 16, 2, H100_SMEM, paged=False)
    assert pa.smem_bytes(16, 128, 128, 2, 5) > H100_SMEM


def test_double_buffers_count_twice_in_flight_but_an_sm_draws_only_its_share():
    from optimized.ops import plan as pa

    tile = 128 * 2 * 128 * 2
    single = pa.Option(pa.Launch(128, 4, 2), 1, 1, 132, tile)
    double = pa.Option(pa.Launch(128, 4, 5), 1, 1, 132, tile // 2, buffers=2)
    assert pa.launch_score(single, 132, 200 << 10) == pa.launch_score(double, 132, 200 << 10)
    one = pa.Option(pa.Launch(128, 4, 5), 1, 1, 64, tile, buffers=2)
    # 64 programs on 132 SMs: at most 64/132 of the card's bandwidth, whatever is in flight
    assert pa.launch_score(one, 132, 69 << 10) == pytest.approx(64 / 132)
