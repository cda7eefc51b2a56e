"""Cases around real model geometries: they keep the preset's heads, head size, scale, dtype,
window and length ranges; their ids round-trip; a few run through triton and torch on the CPU
(the full `--model all --tier full` run is the GPU's)."""

import pytest

from conformance import runner
from conformance.cases import Case, build_inputs, invalid_reasons
from conformance.generate import coverage, generate_for_models
from conformance.models import MODELS, SMOKE_MODELS, SMOKE_SCALE
from optimized.backend import get_backend


def test_every_preset_generates_valid_covering_cases():
    for tier in ("smoke", "full"):
        cases = generate_for_models(tier, "all")
        got, want = coverage(tier, cases, "all")
        assert got == want and {c.model for c in cases} == set(MODELS)
        for c in cases[::7]:
            m = MODELS[c.model]
            assert (c.num_heads, c.num_kv_heads, c.head_size, c.dtype) == (
                m.num_heads,
                m.num_kv_heads,
                m.head_size,
                m.dtype,
            )
            assert c.size == ("small" if tier == "smoke" else "large")
            assert not invalid_reasons(c) and Case.from_id(c.id) == c


def test_the_steps_carry_the_models_scale_lengths_and_window():
    whisper = next(c for c in generate_for_models("full", "whisper-large-v3") if c.kind == "cross")
    step = build_inputs(whisper)
    assert set(step.metadata.encoder_seq_lens) == {1500}  # Whisper's fixed encoder
    assert max(step.metadata.seq_lens) <= 448
    t5 = next(c for c in generate_for_models("smoke", "t5-small") if c.kind == "decoder")
    assert build_inputs(t5).metadata.scale == 1.0  # T5 does not scale q·k
    gemma = [c for c in generate_for_models("smoke", "t5gemma-2b") if c.window == "on"]
    assert gemma and gemma[0].window_size == 4096 // SMOKE_SCALE


def test_a_model_rejects_other_geometry():
    base = dict(
        kind="decoder",
        phase="decode",
        batch="ragged",
        block_size=16,
        heads="h20kv20",
        head_size=64,
        dtype="float16",
        layout="shuffled",
        model="whisper-large-v3",
    )
    assert not invalid_reasons(base)
    assert invalid_reasons({**base, "heads": "h8kv2"})
    assert invalid_reasons({**base, "window": "on"})  # Whisper has no window
    assert invalid_reasons({**base, "kind": "cross", "batch": "enc_shorter"})  # fixed encoder
    assert invalid_reasons({**base, "model": "gpt-5"})
    with pytest.raises(ValueError, match="heads='h8kv2': model whisper-large-v3 has 'h20kv20'"):
        Case.from_id("whisper-large-v3~decoder-decode-ragged-bs16-h8kv2-d64-fp16-shuffled-s0")


def _few(model: str) -> list[Case]:
    """A decode of each kind and an encoder prefill: the cheap corners of a model's smoke."""
    cases = generate_for_models("smoke", model)
    pick = []
    for kind, phase in (("cross", "decode"), ("decoder", "decode"), ("encoder", "prefill")):
        pick += [c for c in cases if c.kind == kind and c.phase == phase][:1]
    return pick


@pytest.mark.parametrize("model", SMOKE_MODELS)
def test_model_cases_run_through_the_runner(model):
    """A model's cases reach the runner with their model column (our kernels run them in
    `python -m conformance run --model NAME`)."""
    backend = get_backend("torch")
    for case in _few(model):
        rows = runner.run_case(case, backend, timeout_s=600)
        assert rows and all(r["status"] == "pass" for r in rows), [r["reason"] for r in rows]
        assert {r["model"] for r in rows} == {model}
