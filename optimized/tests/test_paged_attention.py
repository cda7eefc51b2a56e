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
                    for c in pa.launch_candidates(head_pad, prefill, block_m, elem_bytes, smem):
                        used = pa.smem_bytes(block_m, c.tile_n, head_pad, elem_bytes, c.num_stages)
                        assert used <= smem, (head_size, elem_bytes, prefill, c, smem)
    # two d64 heads a program (128 K/V columns, 16 rows): both launches fit, fp32 too
    for elem_bytes in (2, 4):
        for c in pa.launch_candidates(128, False, 16, elem_bytes, H100_SMEM, heads=2):
            assert pa.smem_bytes(16, c.tile_n, 128, elem_bytes, c.num_stages) <= H100_SMEM
    # the configurations that fit already are the tuned ones, unchanged
    assert pa.launch_candidates(128, True, 64, 2, H100_SMEM) == (pa.Launch(64, 4, 3),)
    assert pa.launch_candidates(256, True, 64, 4, H100_SMEM)[0].num_stages == 2


def test_split_count_fills_half_the_resident_programs(monkeypatch):
    """choose_num_splits on an H100-sized GPU (132 SMs): d64 programs are small (10 fit an SM),
    so few of them are split; d128 ones (4 per SM) only below two per SM."""
    from optimized.ops import plan as pa

    monkeypatch.setattr(pa, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert pa.choose_num_splits(512, 64, cuda, head_pad=64) == 2  # 0.39 waves -> 0.78
    assert pa.choose_num_splits(512, 64, cuda, head_pad=128) == 1  # 0.97 waves already
    assert pa.choose_num_splits(128, 512, cuda, head_pad=128) == 4
    assert pa.choose_num_splits(128, 512, cuda, head_pad=64) == 8
    assert pa.choose_num_splits(16, 4096, cuda, head_pad=128) == 32  # capped
    assert pa.choose_num_splits(16, 20, cuda, head_pad=128) == 5  # each split >= 4 tiles
    assert pa.choose_num_splits(16, 7, cuda, head_pad=128) == 1  # too short to split
    assert pa.choose_num_splits(1280, 14, cuda, head_pad=64) == 1  # Whisper self decode B64
    assert pa.choose_num_splits(512, 32, cuda, head_pad=64) == 1  # short context: two per SM


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


def test_heads_per_program_rule():
    """Two heads a program for MHA decode at head size 64 (the measured win), one elsewhere."""
    from optimized.ops.plan import heads_per_program

    assert heads_per_program(20, 1, 64, decode=True) == 2
    assert heads_per_program(20, 1, 64, decode=False) == 1  # prefill and chunks
    assert heads_per_program(5, 1, 64, decode=True) == 1  # an odd kv head count
    assert heads_per_program(8, 4, 64, decode=True) == 1  # GQA: its tile rows are full already
    assert heads_per_program(32, 1, 128, decode=True) == 1  # 256-byte rows already


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


def test_occupancy_model_matches_ncu_and_picks_by_the_last_wave(monkeypatch):
    """Resident programs from registers/warps/shared memory as ncu reported them on the H100,
    and the launch choice on the H100 sweeps' shapes (bench tune d64: registers as compiled by
    Triton 3.6; the picked launch was the fastest or within 2% of it)."""
    from optimized.ops import plan as pa

    assert pa.resident_programs(92, 2, 11_264) == 10  # Whisper self decode, 31% occupancy
    assert pa.resident_programs(111, 4, 38_912) == 4  # GQA 8:1 d128 decode
    assert pa.resident_programs(80, 2, 11_264) == 12  # T5 cross decode: 2,048 -> 1.29 waves
    assert pa.resident_programs(93, 1, 8_000) == 21
    assert pa.resident_programs(40, 1, 0) == 32  # the block limit
    assert pa.resident_programs(64, 4, 120_000) == 1  # shared memory
    assert pa.wave_efficiency(1280, 1320) == 1.0
    assert pa.wave_efficiency(2048, 1584) == pytest.approx(2048 / 1584 / 2)
    assert pa.wave_efficiency(10, 0) == 0.0

    monkeypatch.setattr(pa, "interpreting", lambda: False)
    a, d, b = pa.launch_candidates(64, False, 16, 2, H100_SMEM)  # 32/2/2, 64/2/2, 16/1/2
    assert (a.tile_n, d.tile_n, b.tile_n) == (32, 64, 16)
    (big,) = pa.launch_candidates(128, False, 16, 2, H100_SMEM)  # 64/4/2, 4 per SM

    def pick(base, resident, splits=None, head_pad=64):
        """base programs; {launch: programs per SM}; {launch: the occupancy rule's splits}."""
        options = []
        for c, r in resident.items():
            auto = (splits or {}).get(c, 1)
            for s in (auto, 1) if auto > 1 else (auto,):
                options.append(pa.Option(c, s, r, base * s, c.tile_n * 2 * head_pad * 2))
        best = options[pa.pick_launch(options, 132)]
        return best.launch, best.splits

    cross = {a: 12, d: 8, b: 21}  # non-causal registers: 80, 119, 93
    causal = {a: 10, d: 8, b: 21}  # 92, 121, 92
    # (H100 bench tune d64/few; GB/s of the default before -> the pick, the pick the best or
    # within 2% of the best launch measured)
    assert pick(1280, cross) == (a, 1)  # Whisper cross B64: one wave already (2,574)
    assert pick(2048, cross) == (d, 1)  # T5 cross B64: 1.29 waves (2,164) -> 0.97 (2,357)
    assert pick(5120, cross) == (d, 1)  # Whisper cross B256: 2,655 -> 2,777
    assert pick(1280, causal) == (a, 1)  # Whisper self B64: 0.97 waves, the best (2,085)
    assert pick(4096, causal) == (d, 1)  # BART self B256: 2,537 -> 2,713
    assert pick(1024, causal) == (a, 1)  # BART self B64: saturated either way, the default
    # batch 16, 1k tokens, d64: 512 programs of 32-token tiles keep ~32 KB per SM in flight
    assert pick(512, causal) == (d, 1)  # 1,823 -> 2,005-2,029
    # batch 16, 4k: the rule's 2 splits (2,417) lose to 64-token tiles unsplit (2,595-2,608)
    assert pick(512, causal, {a: 2, d: 2, b: 2}) == (d, 1)
    # GQA 8:1 d128: batch 64 / 1k unsplit (2,022 vs 1,642 with 2 splits); batch 16 splits
    assert pick(256, {big: 4}, {big: 2}, head_pad=128) == (big, 1)
    assert pick(64, {big: 4}, {big: 4}, head_pad=128) == (big, 4)
    assert pick(128, {big: 4}, {big: 4}, head_pad=128) == (big, 4)  # batch 4, 32k, MHA
    # the interpreter has one launch
    monkeypatch.setattr(pa, "interpreting", lambda: True)
    assert len(pa.launch_candidates(64, False, 16, 2)) == 1


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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([16, 32, 64]),
            st.sampled_from([1, 2, 4]),
            st.integers(1, 32),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(1, 50_000),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_launch_choice_is_the_argmax_of_the_model(raw):
    """pick_launch returns an option of the highest score (ties: the earliest, the default)."""
    from optimized.ops import plan

    options = [
        plan.Option(plan.Launch(t, w, 2), s, r, p * s, t * 2 * 64 * 2) for t, w, r, s, p in raw
    ]
    best = plan.pick_launch(options, 132)
    scores = [round(plan.launch_score(o, 132), 3) for o in options]
    assert scores[best] == max(scores) and best == scores.index(max(scores))
