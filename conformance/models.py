"""The attention geometry of real encoder/decoder models, for `--model NAME`.

Each preset holds what the attention kernels see: query heads, kv heads, head size, softmax
scale, encoder length (fixed, or a maximum), decoder maximum, sliding window, and the dtype the
model is served in. The numbers are read from each model's published `config.json` on the
Hugging Face Hub (the repository named in the comment). What the kernels do not see is left out
(layer counts, FFN sizes). The T5 family runs its relative position bias (32 buckets up to a
distance of 128: `relative_attention_num_buckets`, `relative_attention_max_distance`) on its
encoder and decoder self-attention, so its presets do too (reference/position_bias.py).

`--tier smoke` runs a model at 1/SMOKE_SCALE of its lengths (CPU, interpreter); `--tier full`
at its real lengths (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

SMOKE_SCALE = 16  # smoke lengths are the model's ÷ 16 (Whisper: 1500 encoder tokens -> 93)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    num_heads: int
    num_kv_heads: int
    head_size: int
    encoder_len: int  # the encoder's length (fixed) or its maximum
    decoder_max: int
    dtype: str  # the dtype it is served in
    encoder_fixed: bool = False  # Whisper: every input is padded to 30 s = 1500 frames
    scale: float | None = None  # None: 1/sqrt(head_size); T5: 1.0 (scaling folded in weights)
    sliding_window: int | None = None  # decoder self-attention window
    position_bias: str = "none"  # t5: T5's relative position bias
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    @property
    def heads(self) -> str:
        return f"h{self.num_heads}kv{self.num_kv_heads}"


def _whisper(name: str, d_model: int, heads: int) -> ModelPreset:
    # openai/whisper-*: d_model, decoder_attention_heads (= encoder's), max_source_positions 1500,
    # max_target_positions 448; served in fp16.
    return ModelPreset(name, heads, heads, d_model // heads, 1500, 448, "float16", True)


def _bart_like(name: str, d_model: int, heads: int, positions: int, dtype: str = "float16"):
    # facebook/bart-*, mbart, nllb, m2m100, marian, pegasus: d_model, *_attention_heads,
    # max_position_embeddings (encoder and decoder).
    return ModelPreset(name, heads, heads, d_model // heads, positions, positions, dtype)


def _t5(name: str, heads: int, d_kv: int, dtype: str = "bfloat16") -> ModelPreset:
    # google-t5/t5-*, google/flan-t5-*: num_heads, d_kv; no scaling of q·k (scale 1.0); relative
    # positions, trained on 512 input tokens (the maximum used here) and short targets.
    return ModelPreset(name, heads, heads, d_kv, 512, 512, dtype, scale=1.0, position_bias="t5")


MODELS: dict[str, ModelPreset] = {
    m.name: m
    for m in [
        _whisper("whisper-tiny", 384, 6),  # openai/whisper-tiny
        _whisper("whisper-base", 512, 8),  # openai/whisper-base
        _whisper("whisper-small", 768, 12),  # openai/whisper-small
        _whisper("whisper-medium", 1024, 16),  # openai/whisper-medium
        _whisper("whisper-large-v3", 1280, 20),  # openai/whisper-large-v3
        _whisper("distil-large-v3", 1280, 20),  # distil-whisper/distil-large-v3 (2 dec layers)
        _bart_like("bart-base", 768, 12, 1024),  # facebook/bart-base
        _bart_like("bart-large", 1024, 16, 1024),  # facebook/bart-large
        _bart_like("mbart-50", 1024, 16, 1024),  # facebook/mbart-large-50
        _bart_like("nllb-200", 1024, 16, 1024),  # facebook/nllb-200-distilled-600M
        _bart_like("m2m100", 1024, 16, 1024),  # facebook/m2m100_418M
        _bart_like("marian", 512, 8, 512),  # Helsinki-NLP/opus-mt-en-de
        _bart_like("pegasus-large", 1024, 16, 1024),  # google/pegasus-large
        _t5("t5-small", 8, 64),  # google-t5/t5-small: d_model 512
        _t5("t5-base", 12, 64),  # google-t5/t5-base: d_model 768
        _t5("t5-large", 16, 64),  # google-t5/t5-large: d_model 1024
        _t5("t5-3b", 32, 128),  # google-t5/t5-3b: d_model 1024, d_kv 128
        _t5("t5-11b", 128, 128),  # google-t5/t5-11b: d_model 1024, d_kv 128
        _t5("flan-t5-xl", 32, 64),  # google/flan-t5-xl: d_model 2048
        _t5("flan-t5-xxl", 64, 64),  # google/flan-t5-xxl: d_model 4096
        # google/t5gemma-2b-2b-*: Gemma 2 2B attention in encoder and decoder: 8 query heads,
        # 4 kv heads, head_dim 256, sliding_window 4096, query_pre_attn_scalar 256 (scale
        # 1/sqrt(256)); bf16. Its GQA and window make it the GQA encoder/decoder preset.
        ModelPreset("t5gemma-2b", 8, 4, 256, 8192, 8192, "bfloat16", sliding_window=4096),
    ]
}

# `make test` runs the smoke variant of these (a fixed encoder, T5's scale, GQA with a window).
SMOKE_MODELS = ("whisper-large-v3", "t5-small", "t5gemma-2b")


def get_model(name: str) -> ModelPreset:
    if name not in MODELS:
        raise ValueError(f"--model: unknown model {name!r}; known: all, {', '.join(MODELS)}")
    return MODELS[name]


def model_names(spec: str) -> list[str]:
    """`all` or one name -> the preset names."""
    return list(MODELS) if spec == "all" else [get_model(spec).name]
