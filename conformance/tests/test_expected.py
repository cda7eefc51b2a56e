"""The batched reference (conformance/expected.py) against the readable one (reference/): equal to
float64 rounding on every smoke case and on random steps, fp8 and T5's bias included; the
baseline equal element for element; the caches written bit for bit alike; chunks of any size
give the same answer; one case on its device serves every backend with its own copy."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import expected
from conformance.cases import lower
from conformance.expected import CaseRun, batched_attention, steps_of
from conformance.generate import generate
from conformance.tolerance import baseline_attention
from conformance.workloads import KVFormat, Layout, PositionBias, build_step
from reference import AttnKind, attention

SAME = dict(rtol=0, atol=1e-12)  # float64 rounding (outputs are O(1))


def _agree(inputs, reads_inputs: bool = False) -> None:
    readable, batched = inputs.with_fresh_cache(), inputs.with_fresh_cache()
    for a, b in zip(steps_of(readable), steps_of(batched)):
        ref = attention(*a.args(), prefill_reads_inputs=reads_inputs)
        base = baseline_attention(a, reads_inputs)
        ((out, bl),) = batched_attention(b, (reads_inputs,))
        torch.testing.assert_close(out, ref, **SAME)
        assert torch.equal(bl, base), "the baseline differs"
        if a.kv_cache is not None:
            for x, y in zip(a.kv_cache, b.kv_cache):
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), "caches differ"


def test_the_batched_reference_is_the_readable_one_on_every_smoke_case():
    for case in generate("smoke"):
        _agree(lower(case).build())


@st.composite
def steps(draw):
    kind = draw(st.sampled_from(list(AttnKind)))
    num_seqs = draw(st.integers(1, 5))
    phase = draw(st.sampled_from(["prefill", "decode", "chunked", "mixed"]))
    if phase == "prefill":
        q, c = [draw(st.integers(1, 30)) for _ in range(num_seqs)], [0] * num_seqs
    elif phase == "decode":
        q, c = [1] * num_seqs, [draw(st.integers(1, 40)) for _ in range(num_seqs)]
    else:
        q = [draw(st.integers(1, 12)) for _ in range(num_seqs)]
        c = [draw(st.integers(0 if phase == "mixed" else 1, 40)) for _ in range(num_seqs)]
    enc = [draw(st.integers(1, 40)) for _ in range(num_seqs)]
    h, kvh = draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]))
    fp8 = draw(st.sampled_from(["auto", "fp8_e4m3", "fp8_e5m2"]))
    kv = KVFormat() if fp8 == "auto" or kind == AttnKind.ENCODER else KVFormat(
        fp8, (0.02,), (0.5,))  # fmt: skip
    bias = PositionBias()
    if kind != AttnKind.ENCODER_DECODER and draw(st.booleans()):
        bias = PositionBias("t5", *draw(st.sampled_from([(32, 128), (8, 16), (6, 5)])))
    return build_step(
        kind, tuple(q), tuple(c), tuple(enc),
        block_size=draw(st.sampled_from([1, 4, 16, 64])), num_heads=h, num_kv_heads=kvh,
        head_size=draw(st.sampled_from([8, 16])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(list(Layout))),
        sliding_window=draw(st.sampled_from([None, 1, 5])),
        scale=draw(st.sampled_from([None, 0.3])),
        num_padding_tokens=draw(st.sampled_from([0, 2])), seed=draw(st.integers(0, 2**16)),
        kv_format=kv, position_bias=bias,
    )  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(), st.booleans())
def test_the_batched_reference_is_the_readable_one_on_random_steps(step, reads_inputs):
    _agree(step, reads_inputs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(), st.sampled_from([1, 2000, 40_000]))
def test_chunks_of_any_size_give_the_same_answer(step, chunk):
    """Groups, kv heads and query rows split to fit CHUNK_BYTES: down to one row of one head."""
    ((whole, base),) = batched_attention(step.with_fresh_cache())
    old = expected.CHUNK_BYTES
    expected.CHUNK_BYTES = chunk
    try:
        ((parts, part_base),) = batched_attention(step.with_fresh_cache())
    finally:
        expected.CHUNK_BYTES = old
    torch.testing.assert_close(parts, whole, **SAME)
    assert torch.equal(part_base, base)


def test_sequences_of_very_different_lengths_are_not_padded_to_each_other():
    """A mixed batch: one long prefill beside decodes makes groups of its own kind."""
    groups = expected._groups([3000, 1, 1, 1, 2], [3000, 40, 41, 900, 50], 8)
    assert groups[-1] == [0]  # the long prefill alone
    assert sum(len(g) for g in groups) == 5


@pytest.mark.parametrize("case_id", [
    "decoder-prefill-ragged-bs16-h8kv2-d64-bf16-shuffled-kv8e4m3-s0",
    "episode-episode-ragged-bs16-h8kv2-d64-fp16-interleaved-kv8e5m2-s0",
])  # fmt: skip
def test_one_case_serves_every_backend_its_own_copy(case_id):
    """Built once on the CPU and moved: the pristine inputs are what `build` gives, every
    backend copy is fresh (a write to one reaches nothing else), and a backend that reads an
    fp8 prefill's K/V as given gets its own answer at those steps only."""
    from conformance.cases import Case

    shape = lower(Case.from_id(case_id))
    run = CaseRun(shape, "cpu")
    built = shape.build()
    for a, b in zip(run.steps, steps_of(built)):
        assert torch.equal(a.query, b.query)
    mine = run.fresh()
    for c in mine.kv_cache:
        c.view(torch.uint8).fill_(7)
    assert not torch.equal(mine.kv_cache[0].view(torch.uint8), run.pristine.kv_cache[0].view(
        torch.uint8))  # fmt: skip
    stored, given_ = run.expected_for(False), run.expected_for(True)
    for i, step in enumerate(run.steps):
        differs = step.metadata.fp8 and step.metadata.is_prefill_only() and step.key is not None
        assert (stored[i] is not given_[i]) == differs
        if differs:
            assert not torch.equal(stored[i].output, given_[i].output)
