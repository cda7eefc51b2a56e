"""Cases around real model geometries: they keep the preset's heads, head size, scale, dtype,
window and length ranges; their ids round-trip; a few run through triton and torch on the CPU
(the full `--model all --tier full` run is the GPU's)."""

import pytest

from conformance import runner
from conformance.cases import Case, build_inputs, invalid_reasons
from conformance.generate import coverage, generate_for_models
from conformance.models import MODELS, SMOKE_MODELS, SMOKE_SCALE
from optimized.backend import get_backend

# Each preset as its model's published config.json says, written out independently of
# conformance/models.py: (num_heads, num_kv_heads, head_size, softmax scale (None:
# 1/sqrt(head_size)), sliding window, served dtype, encoder length, encoder fixed, decoder max).
# Whisper: d_model / decoder_attention_heads, max_source_positions 1500 (every input padded to
# 30 s), max_target_positions 448. BART family: d_model / attention heads,
# max_position_embeddings. T5: num_heads, d_kv, no 1/sqrt(d) (folded into the weights), 512
# input tokens. T5Gemma 2B: Gemma 2 attention, 8 heads over 4 kv heads of 256, window 4096,
# query_pre_attn_scalar 256.
PUBLISHED = {
    "whisper-tiny": (6, 6, 64, None, None, "float16", 1500, True, 448),
    "whisper-base": (8, 8, 64, None, None, "float16", 1500, True, 448),
    "whisper-small": (12, 12, 64, None, None, "float16", 1500, True, 448),
    "whisper-medium": (16, 16, 64, None, None, "float16", 1500, True, 448),
    "whisper-large-v3": (20, 20, 64, None, None, "float16", 1500, True, 448),
    "distil-large-v3": (20, 20, 64, None, None, "float16", 1500, True, 448),
    "bart-base": (12, 12, 64, None, None, "float16", 1024, False, 1024),
    "bart-large": (16, 16, 64, None, None, "float16", 1024, False, 1024),
    "mbart-50": (16, 16, 64, None, None, "float16", 1024, False, 1024),
    "nllb-200": (16, 16, 64, None, None, "float16", 1024, False, 1024),
    "m2m100": (16, 16, 64, None, None, "float16", 1024, False, 1024),
    "marian": (8, 8, 64, None, None, "float16", 512, False, 512),
    "pegasus-large": (16, 16, 64, None, None, "float16", 1024, False, 1024),
    "t5-small": (8, 8, 64, 1.0, None, "bfloat16", 512, False, 512),
    "t5-base": (12, 12, 64, 1.0, None, "bfloat16", 512, False, 512),
    "t5-large": (16, 16, 64, 1.0, None, "bfloat16", 512, False, 512),
    "t5-3b": (32, 32, 128, 1.0, None, "bfloat16", 512, False, 512),
    "t5-11b": (128, 128, 128, 1.0, None, "bfloat16", 512, False, 512),
    "flan-t5-xl": (32, 32, 64, 1.0, None, "bfloat16", 512, False, 512),
    "flan-t5-xxl": (64, 64, 64, 1.0, None, "bfloat16", 512, False, 512),
    "t5gemma-2b": (8, 4, 256, None, 4096, "bfloat16", 8192, False, 8192),
}


# T5's relative_attention_num_buckets and relative_attention_max_distance (its config.json; the
# family's other presets have no relative position bias).
T5_BIAS = {name: (32, 128) for name in PUBLISHED if name.startswith(("t5-", "flan-t5"))}


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) | set(MODELS)))
def test_every_preset_says_what_its_published_config_says(name):
    """A preset that lost its model's attention (heads, head size, the scale, the window, its
    lengths) fails here, not only a preset whose fields do not reach the step."""
    assert name in MODELS and name in PUBLISHED, f"{name}: a preset without its pinned row"
    m = MODELS[name]
    got = (m.num_heads, m.num_kv_heads, m.head_size, m.scale, m.sliding_window, m.dtype,
           m.encoder_len, m.encoder_fixed, m.decoder_max)  # fmt: skip
    assert got == PUBLISHED[name]
    bias = (m.relative_attention_num_buckets, m.relative_attention_max_distance)
    assert (m.position_bias, bias if m.position_bias == "t5" else None) == (
        ("t5", T5_BIAS[name]) if name in T5_BIAS else ("none", None)
    )


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
