"""T5's position bias through the matrix: the smoke tier has bias rows for every kind and phase
it applies to, and its bias cases kill each bug a paged T5 kernel has (conformance/tests/
faulty.py: BiasFault), on the CPU; the T5 presets carry T5's bias."""

import pytest

from conformance import runner
from conformance.cases import Case, lower
from conformance.generate import generate
from conformance.models import MODELS
from conformance.tests.faulty import BIAS_FAULTS, BiasFault

BIAS_CASES = [c for c in generate("smoke") if c.position_bias != "none"]


def test_the_smoke_tier_has_bias_rows_for_every_kind_and_phase_it_applies_to():
    kinds = {(c.kind, c.phase) for c in BIAS_CASES}
    assert {("encoder", "prefill"), ("episode", "episode")} <= kinds
    assert {("decoder", p) for p in ("prefill", "decode", "mixed", "chunked")} <= kinds
    assert {c.position_bias for c in BIAS_CASES} == {"t5", "t5small"}
    assert all(c.kind != "cross" and c.id.split("-")[-2].startswith("pb") for c in BIAS_CASES)


def test_a_correct_bias_passes_every_bias_row():
    right = BiasFault("none")
    for case in BIAS_CASES:
        rows = runner.run_case(case, right)
        assert all(r["status"] == "pass" for r in rows), [r["reason"] for r in rows]


@pytest.mark.parametrize("fault", BIAS_FAULTS)
def test_the_smoke_tier_kills_each_planted_bias_fault(fault):
    """Reversed direction, positions relative to the step, the table read by kv head, no bias
    at decode, buckets in bf16: each fails at least one smoke row."""
    caught = any(  # the first case that catches it is enough
        r["status"] == "fail"
        for c in BIAS_CASES
        for r in runner.run_case(c, BiasFault(fault), rerun=False)
    )
    assert caught, f"the smoke tier's bias rows did not catch {fault}"


def test_t5_presets_run_t5s_bias_and_others_none():
    for name, m in MODELS.items():
        t5 = name.startswith(("t5-", "flan-t5"))
        assert (m.position_bias == "t5") == t5, name
        case = next(
            c
            for c in [
                Case.from_id(
                    f"{name}~encoder-prefill-ragged-bs16-{m.heads}-"
                    f"d{m.head_size}-{_short(m.dtype)}-contiguous-s0"
                )
            ]
        )
        assert lower(case).position_bias == ("t5" if t5 else "none")
    cross = lower(Case.from_id("t5-small~cross-decode-ragged-bs16-h8kv8-d64-bf16-shuffled-s0"))
    assert cross.position_bias == "none"  # T5's cross-attention takes none


def _short(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
