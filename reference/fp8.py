"""fp8 KV caches: how K/V are stored in 8 bits and read back. The spec of `kv_cache_dtype`.

A step's `kv_cache_dtype` (StepMetadata) says how its caches store K/V:

    auto       the model dtype (the query's), stored as given
    fp8_e4m3   torch.float8_e4m3fn: 4 exponent bits, 3 mantissa bits, finite max 448, no Inf
    fp8_e5m2   torch.float8_e5m2:   5 exponent bits, 2 mantissa bits, finite max 57344

With fp8, `k_scale` and `v_scale` (float32 tensors, finite, > 0) map values onto the format's
range: one scale for the tensor (`[1]`), or one per kv head (`[num_kv_heads]`); query head h
uses the scale of its kv head, h // (num_heads // num_kv_heads).

Write (the cache write, self and cross caches alike), in this order:

    stored = fp8(clamp(x.float() / scale, -max, max))

the division in float32 (IEEE, correctly rounded), then the clamp (values past the range
saturate; without it e4m3 turns them into NaN), then the conversion, rounded to the nearest
fp8 value, ties to even, subnormals kept. A kernel's cache must equal this bit for bit; a
backend that multiplies by the reciprocal instead of dividing may differ on rare ties and says
so (`fp8_write_ulps = 1`, optimized/backend.py): its written slots are then judged to one fp8
ulp, and every other slot still bit for bit.

Read: x = stored * scale (the reference in float64, exactly). Attention reads every token it
attends over from the cache as stored, this step's new tokens included: write, then attend
(vLLM V1, FlashInfer, FlashAttention). A backend that attends over the new K/V as given at a
step where no sequence has cached context (vLLM V0's xFormers prefill path) declares it
(`fp8_prefill_reads_inputs = True`), and the reference is computed the same way for it
(`attention(..., prefill_reads_inputs=True)`).
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = {
    "auto": None,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a cache tensor for `kv_cache_dtype` ('auto': the model's own)."""
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


def per_head(scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A `[1]` or `[num_kv_heads]` scale as `[num_kv_heads]`."""
    return scale.reshape(-1).expand(num_kv_heads)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [tokens, num_kv_heads, head_size] -> the fp8 values the cache stores (see above)."""
    scaled = x.float() / per_head(scale, x.shape[1]).float()[:, None]
    limit = FP8_MAX[dtype]
    return scaled.clamp(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stored [tokens, num_kv_heads, head_size] fp8 -> the values attention reads, float64."""
    return stored.double() * per_head(scale, stored.shape[1]).double()[:, None]
