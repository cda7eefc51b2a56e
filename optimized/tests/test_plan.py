"""The launch plan as properties over `Card` values (an H100, an H200, a 99 KB part, the
interpreter): the occupancy model against what ncu read, the score's monotonicity, each named
exception's rule, and every candidate fitting the card. No launch tuple is pinned: a tuned
constant may move, the rules it must obey may not."""

import itertools
import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from optimized.ops import plan as pa
from optimized.ops.plan import H100, H200, INTERPRETER, Card, Compiled, Geometry, Launch

SMALL_PART = Card("sm89", sms=128, smem_per_block=101_376, smem_per_sm=102_400)
CARDS = (H100, H200, SMALL_PART)


def test_the_occupancy_model_matches_what_ncu_measured():
    """Resident programs from registers, warps and shared memory against ncu on the H100, and
    the wave efficiency's edge cases."""
    resident = lambda regs, warps, shared: H100.resident(Compiled(regs, shared), warps)
    assert resident(92, 2, 11_264) == 10  # Whisper self decode, 31% occupancy
    assert resident(111, 4, 38_912) == 4  # GQA 8:1 d128 decode
    assert resident(80, 2, 11_264) == 12  # T5 cross decode
    assert resident(40, 1, 0) == 32  # the block limit
    assert resident(64, 4, 120_000) == 1  # shared memory
    assert pa.wave_efficiency(1280, 1320) == 1.0
    assert pa.wave_efficiency(2048, 1584) == pytest.approx(2048 / 1584 / 2)
    assert pa.wave_efficiency(10, 0) == 0.0


def test_shared_memory_model_and_every_candidate_fits_its_card():
    """The model against what Triton and ncu reported, and every candidate (head size × dtype
    × phase × paged or packed × heads × fp8) within the card's shared memory; fp32 d256
    prefill once asked 344,320 bytes and failed to launch on the H100, and 16-bit d256 encoder
    prefill with T5's bias 262,144."""
    assert pa.smem_bytes(64, 64, 256, 4, 3) == 344_320  # Triton's OutOfResources message
    assert 0 <= pa.smem_bytes(64, 64, 256, 2, 3, bias=True) - 262_144 < 4096  # likewise
    assert 0 <= pa.smem_bytes(16, 64, 128, 2, 2) - 38_912 < 4096  # ncu: GQA 8:1 d128 decode
    assert 0 <= pa.smem_bytes(16, 32, 64, 2, 2) - 11_264 < 4096  # ncu: MHA d64 decode
    for card in CARDS:
        for head_size in (64, 80, 96, 128, 256):
            wide = triton.next_power_of_2(head_size)
            for elem_bytes in (2, 4) if card is not SMALL_PART else (2,):
                grids = (True, 64), (True, 128), (False, 16), (False, 32), (False, 64)
                for (prefill, block_m), paged, bias in itertools.product(
                    grids, (True, False), (False, True)
                ):
                    for c in pa.launch_candidates(wide, prefill, block_m, elem_bytes, card,
                                                  paged=paged, bias=bias):  # fmt: skip
                        bufs = pa.decode_kv_buffers(c.num_stages) if paged and not prefill else None
                        used = pa.smem_bytes(
                            block_m, c.tile_n, wide, elem_bytes, c.num_stages, bufs, bias
                        )
                        least = (c.tile_n, c.num_stages) == (16, 2)  # the probe decides
                        assert used <= card.smem_per_block or (least and bias), (card.name, c)
        for heads, fp8 in ((2, False), (1, True), (2, True)):
            for c in pa.launch_candidates(128, False, 16, 2, card, heads, fp8):
                bufs = pa.decode_kv_buffers(c.num_stages)
                assert (
                    pa.smem_bytes(16, c.tile_n, 128, 2, c.num_stages, bufs) <= card.smem_per_block
                )
    assert pa.launch_candidates(128, False, 16, 2, INTERPRETER) == (Launch(64, 4, 1),)


def test_the_query_tile_holds_the_longest_query():
    """Rows a program = tokens × padded group: 16 at decode, as few as hold the longest query
    of a short prefill, 64 for long queries."""
    rows = lambda ql, group: pa.block_q_for(ql, group) * triton.next_power_of_2(group)
    assert (pa.block_q_for(1, 1), rows(1, 1)) == (16, 16)
    assert (pa.block_q_for(4, 4), rows(4, 4)) == (4, 16)
    assert (pa.block_q_for(3, 6), rows(3, 6)) == (4, 32)  # group 6 pads to 8, 3 tokens to 4
    assert (pa.block_q_for(33, 1), rows(33, 1)) == (64, 64)
    assert (pa.block_q_for(5, 64), rows(5, 64)) == (1, 64)  # one token of 64 heads
    with pytest.raises(ValueError, match="block_q"):
        pa.make_schedule((4,), (8,), (0,), 1, "cpu", block_q=3)


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
    """Whatever the exception picks, the launcher accepts: one head outside decode, else a
    power of two dividing the kv heads whose padded group rows fit a 16-row tile."""
    n = pa.heads_per_program(kv_heads, group_pad, head_pad, decode, programs, 132, kv_len)
    assert n >= 1 and n & (n - 1) == 0 and kv_heads % n == 0 and group_pad * n <= 16
    assert decode or n == 1


def test_two_heads_a_program_only_where_the_grid_is_not_tiny():
    """The exception's rule: MHA d64 decode, except a grid under three one-head programs an SM
    with a short context; GQA never; without the grid (the interpreter) the grid-free rule."""
    mha_d64 = lambda programs, kv: pa.heads_per_program(20, 1, 64, True, programs, 132, kv)
    tiny, short = 3 * 132 - 1, pa.TWO_HEADS_SHORT_KV
    assert mha_d64(tiny, short) == 1 and mha_d64(tiny + 1, short) == 2
    assert mha_d64(tiny, short + 1) == 2
    assert pa.heads_per_program(20, 1, 64, True) == 2
    assert pa.heads_per_program(8, 4, 128, True, 20, 132, 448) == 1


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
    counts = pa.split_counts(auto, kv_tiles, programs, slots)
    assert counts[0] == auto and 1 in counts and len(set(counts)) == len(counts)
    for n in counts:
        if n in (1, auto):
            continue
        if n < auto:
            assert n == pa.FUSED_REDUCE_MAX_SPLITS
            continue
        assert n & (n - 1) == 0 and n <= pa.MAX_AUTO_SPLITS
        assert n * pa.MIN_TILES_PER_SPLIT <= kv_tiles and programs * n <= slots


@settings(max_examples=300, deadline=None)
@given(
    programs=st.integers(1, 20_000),
    kv_tiles=st.integers(1, 5_000),
    head_pad=st.sampled_from([16, 32, 64, 128, 256]),
    sms=st.integers(1, 200),
)
def test_the_split_rule_on_any_card(programs, kv_tiles, head_pad, sms):
    """A power of two or a cap, at most MAX_AUTO_SPLITS, four K/V tiles a split at least, and a
    grid that already fills its target is not split."""
    n = pa.choose_num_splits(programs, kv_tiles, Card("any", sms, 1 << 17), head_pad)
    assert 1 <= n <= pa.MAX_AUTO_SPLITS
    assert n == 1 or (n <= kv_tiles // 4 and programs < 5 * sms)
    assert n & (n - 1) == 0 or n == kv_tiles // 4


@settings(max_examples=200, deadline=None)
@given(
    resident=st.integers(1, 16),
    programs=st.integers(1, 20_000),
    tile=st.sampled_from([16, 32, 64, 128]),
    card=st.sampled_from(CARDS),
)
def test_the_score_prefers_fuller_waves_and_more_bytes_in_flight(resident, programs, tile, card):
    launch = Launch(tile, 4, 2)
    score = lambda r, b, s: pa.launch_score(pa.Option(launch, s, r, programs * s, b), card)
    bytes_ = tile * 2 * 128 * 2
    assert score(resident + 1, bytes_, 1) >= score(resident, bytes_, 1) - 1e-9 or (
        programs > card.sms * resident  # more resident slots can leave a worse last wave
    )
    assert score(resident, 2 * bytes_, 1) >= score(resident, bytes_, 1)
    full = pa.wave_efficiency(programs, resident * card.sms) == 1.0
    saturated = min(programs / card.sms, resident) * bytes_ >= card.in_flight_saturates
    if full and saturated and programs >= card.sms:  # nothing for a split to win
        assert score(resident, bytes_, 2) <= score(resident, bytes_, 1)
    if saturated and 2 * programs <= card.sms:  # idle SMs: a split that busies them wins
        assert score(resident, bytes_, 2) > score(resident, bytes_, 1)


def test_bytes_in_flight_that_saturate_memory_scale_with_bandwidth_per_sm():
    assert H100.in_flight_saturates == pa.IN_FLIGHT_SATURATES
    assert 68 << 10 < H200.in_flight_saturates < 70 << 10
    fewer_sms = Card("x", sms=114, smem_per_block=1 << 17)
    assert fewer_sms.in_flight_saturates > H100.in_flight_saturates
    launch, tile = Launch(64, 4, 2), 64 * 2 * 128 * 2
    options = [pa.Option(launch, 2, 4, 512, tile), pa.Option(launch, 1, 4, 256, tile)]
    # more bytes to keep in flight on the H200: two splits there, none on the H100
    assert options[pa.pick_launch(options, H100)].splits == 1
    assert options[pa.pick_launch(options, H200)].splits == 2


def test_a_second_launch_to_merge_splits_is_charged_against_a_short_step():
    launch, tile = Launch(64, 4, 2), 64 * 2 * 128 * 2
    four = pa.Option(launch, 4, 4, 256, tile)
    eight = pa.Option(launch, 8, 4, 512, tile, reduce_launch=True)
    assert [four, eight][pa.pick_launch([four, eight], H200)].splits == 8  # free: the score's
    est = lambda o, ideal: (
        1 / pa.launch_score(o, H200) + (pa.REDUCE_LAUNCH_US / ideal) * o.reduce_launch
    )
    for ideal in (1.0, 5.0, 20.0, 100.0):
        want = 4 if est(four, ideal) < est(eight, ideal) else 8
        assert [four, eight][pa.pick_launch([four, eight], H200, ideal)].splits == want
    assert est(four, 5.0) < est(eight, 5.0) and est(eight, 100.0) < est(four, 100.0)


def test_double_buffers_are_offered_whole_or_not_at_all():
    """One d64 or d128 head a program, paged decode, 16-bit, and only where shared memory holds
    both tiles: not on a 99 KB part, not for fp8, fp32, two heads, d256, prefill, packed K/V."""
    gpu = pa._gpu_candidates
    smem = H100.smem_per_block
    assert pa.DOUBLE_BUFFERS in gpu(128, False, 16, 2, smem, 1, False, True)
    assert pa.DOUBLE_BUFFERS in gpu(64, False, 16, 2, smem, 1, False, True)
    for args in ((256, False, 16, 2, smem, 1, False, True), (128, False, 16, 2, 101_376, 1, False,
                 True), (128, False, 16, 2, smem, 1, True, True), (128, False, 16, 4, smem, 1,
                 False, True), (128, False, 16, 2, smem, 2, False, True), (128, True, 64, 2, smem,
                 1, False, True), (128, False, 16, 2, smem, 1, False, False)):  # fmt: skip
        assert pa.DOUBLE_BUFFERS not in gpu(*args), args
    assert pa.smem_bytes(16, 128, 128, 2, 5) > smem  # packed K/V: a tile a stage would not fit


# Registers and shared memory of the GQA d128 bf16 decode launches as compiled for sm_90.
SM90_D128 = {(64, 4, 2): Compiled(123, 38_912), (128, 4, 5): Compiled(190, 137_472),
             (32, 4, 5): Compiled(96, 38_656)}  # fmt: skip


@pytest.mark.parametrize("card", [H100, H200], ids=["h100", "h200"])
@pytest.mark.parametrize("batch", [1, 4, 16, 64])
@pytest.mark.parametrize("context", [1024, 4096, 32_768])
@pytest.mark.parametrize("kv_heads", [4, 8])
def test_double_buffers_only_where_their_grid_is_half_to_one_wave(card, batch, context, kv_heads):
    """Whatever the choice, it is a candidate with a split count the rule weighs, within the
    K/V tiles; a double-buffered choice has a grid, splits included, of half to one wave of
    it; a grid past one wave of them keeps single buffers."""
    sched = pa.make_schedule((1,) * batch, (context,) * batch, (context - 1,) * batch,
                             32 // kv_heads, "cpu")  # fmt: skip
    g = Geometry(kv_heads, 32 // kv_heads, 128, 2, 2)
    probe = lambda launches: [SM90_D128[(c.tile_n, c.num_warps, c.num_stages)] for c in launches]
    p = pa.make_plan(sched, g, card, probe)
    cands = pa.launch_candidates(128, False, 16, 2, card)
    assert p.launch in cands and 1 <= p.num_splits <= math.ceil(context / p.launch.tile_n)
    programs = batch * kv_heads
    if p.launch.num_stages == 5:
        slots = card.resident(SM90_D128[(p.launch.tile_n, 4, 5)], 4) * card.sms
        assert card.sms // 2 <= programs * p.num_splits <= slots
    if programs > card.sms * card.resident(SM90_D128[(128, 4, 5)], 4):
        assert p.launch.num_stages < 5


def test_double_buffers_count_twice_in_flight_but_an_sm_draws_only_its_share():
    tile = 128 * 2 * 128 * 2
    single = pa.Option(Launch(128, 4, 2), 1, 1, 132, tile)
    double = pa.Option(Launch(128, 4, 5), 1, 1, 132, tile // 2, buffers=2)
    assert pa.launch_score(single, H200) == pa.launch_score(double, H200)
    one = pa.Option(Launch(128, 4, 5), 1, 1, 64, tile, buffers=2)
    assert pa.launch_score(one, H200) <= 64 / 132 + 1e-12


def test_a_plan_is_made_for_the_card_it_is_given():
    """The same call planned for two cards: each plan fits its card, and the memo keeps them
    apart (no module state to rebind)."""
    sched = pa.make_schedule((1,) * 16, (4096,) * 16, (4095,) * 16, 8, "cpu")
    g = Geometry(4, 8, 128, 2, 2)
    probe = lambda launches: [SM90_D128.get((c.tile_n, c.num_warps, c.num_stages),
                                            Compiled(128, 40_000)) for c in launches]  # fmt: skip
    tiny = Card("tiny", sms=8, smem_per_block=101_376, smem_per_sm=102_400)
    a, b = pa.make_plan(sched, g, H200, probe), pa.make_plan(sched, g, tiny, probe)
    assert a.launch in pa.launch_candidates(128, False, 16, 2, H200)
    assert b.launch in pa.launch_candidates(128, False, 16, 2, tiny)
    assert pa.make_plan(sched, g, INTERPRETER, None).launch == Launch(64, 4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles for this machine's GPU")
def test_the_probe_remembers_compiled_launches_on_disk(tmp_path, monkeypatch):
    """A second process (the memory memo emptied) plans from the disk memo without compiling a
    candidate: what a warm machine's first call costs."""
    from triton import knobs

    from conformance.workloads import build_step
    from optimized.ops import paged_attention as op

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    step = build_step("decoder", (1,) * 8, (700,) * 8, block_size=16, num_heads=8,
                      num_kv_heads=2, head_size=128, dtype=torch.bfloat16)  # fmt: skip
    step = step.to("cuda")
    md = step.metadata
    sched = pa.make_schedule(md.query_lens, md.seq_lens, md.context_lens, 4, "cuda")
    args = (step.query, *step.kv_cache, md.block_tables, sched)
    monkeypatch.setattr(op, "_COMPILED", {})
    monkeypatch.setattr(pa, "_CHOSEN", pa.Memo())
    first = op.plan_attention(*args, causal=True)
    assert list((tmp_path / "encdec-attn-probe").glob("*.json"))
    monkeypatch.setattr(op, "_COMPILED", {})
    monkeypatch.setattr(pa, "_CHOSEN", pa.Memo())
    monkeypatch.setattr(op._paged_attention_kernel, "warmup", _no_compile)
    assert op.plan_attention(*args, causal=True) == first


def test_one_process_at_a_time_compiles_a_variant(tmp_path, monkeypatch):
    """The probe's compile lock: a second holder of the same variant waits for the first (it
    then finds the first's results on disk); another variant does not wait."""
    import threading

    from optimized.ops import paged_attention as op

    monkeypatch.setattr(op, "_probe_file", lambda key: tmp_path / f"{key[0]}.json")
    order = []
    inside = threading.Event()

    def second(variant):
        with op._compiling(variant):
            order.append(variant)

    with op._compiling(("a",)):
        inside.set()
        same, other = (threading.Thread(target=second, args=(v,)) for v in (("a",), ("b",)))
        same.start(), other.start()
        other.join(5)
        same.join(0.3)
        assert order == [("b",)] and same.is_alive()  # the same variant waits
    same.join(5)
    assert order == [("b",), ("a",)]


def _no_compile(*args, **kwargs):
    raise AssertionError("a candidate was compiled though the disk memo held it")


def test_a_launch_compiled_past_the_cards_shared_memory_is_never_chosen():
    """The probe's word over the model's: a candidate that compiled to more shared memory than a
    program may take (Triton refuses to load it) is dropped; where none fits, smaller ones are
    probed; none at all is a clear error."""
    sched = pa.make_schedule((1,) * 8, (4096,) * 8, (4095,) * 8, 8, "cpu")
    g = Geometry(1, 8, 128, 2, 2)
    cands = pa.launch_candidates(128, False, 16, 2, H100)
    assert len(cands) > 1
    seen = []
    pa.make_plan(
        sched, g, H100, lambda ls: seen.extend(ls) or [Compiled(96, 12_000)] * len(ls), ("seen",)
    )
    assert tuple(seen) == cands
    too_big = Compiled(0, H100.smem_per_block + 1)
    first_out = lambda launches: [too_big if c == cands[0] else Compiled(96, 12_000)
                                  for c in launches]  # fmt: skip
    assert pa.make_plan(sched, g, H100, first_out, ("first-out",)).launch != cands[0]
    big = lambda launches: [too_big if c.num_stages > 2 else Compiled(96, 12_000) for c in launches]
    assert pa.make_plan(sched, g, H100, big, ("smaller",)).launch.num_stages == 2
    with pytest.raises(ValueError, match="shared memory"):
        pa.make_plan(sched, g, H100, lambda launches: [too_big] * len(launches), ("none",))
