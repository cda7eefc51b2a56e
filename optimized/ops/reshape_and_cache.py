"""The paged cache write launcher: checks the layouts, then runs `_reshape_and_cache_kernel`
(optimized/kernels/reshape_and_cache.py): on the GPU one token per program, in the interpreter
a whole run of tokens per program (it pays per program, not per element).

key, value:             [num_tokens, num_kv_heads, head_size]
key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], key's dtype or fp8
                        (float8_e4m3fn / float8_e5m2: quantized with k_scale / v_scale)
slot_mapping:           [num_tokens] int32/int64, slot = block * block_size + offset, or -1
k_scale, v_scale:       float32 [1] (per tensor) or [num_kv_heads] (per kv head); fp8 only
"""

from __future__ import annotations

import torch

from optimized.kernels import cdiv, interpreting, next_power_of_2
from optimized.kernels.fp8 import E4M3, E5M2
from optimized.kernels.reshape_and_cache import _reshape_and_cache_kernel

# One token per program on the GPU, about 32 elements per thread: the best of the cache-write
# sweep; the interpreter takes up to INTERPRETER_TOKENS a program.
TOKENS_PER_PROGRAM = 1
INTERPRETER_TOKENS = 64
FP8_FORMATS = {torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}


def _check(name: str, t: torch.Tensor, dims: int, like: torch.Tensor) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1)")


def check_scales(k_scale, v_scale, num_kv_heads: int, device) -> int:
    """The scale stride the kernels read with (0: one scale per tensor, 1: one per kv head);
    ValueError unless both are float32 [1] or both [num_kv_heads] on `device`."""
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"{name}: expected a float32 tensor on {device} for an fp8 cache")
        if s.dim() > 1 or s.numel() not in (1, num_kv_heads):
            raise ValueError(
                f"{name}: expected [1] or [num_kv_heads={num_kv_heads}], got {list(s.shape)}"
            )
    if k_scale.numel() != v_scale.numel():
        raise ValueError("k_scale/v_scale: expected both per tensor or both per kv head")
    return 0 if k_scale.numel() == 1 else 1


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tokens_per_program: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Write key/value into the paged caches in place (see the module docstring for shapes)."""
    for name, t, dims in (
        ("key", key, 3),
        ("value", value, 3),
        ("key_cache", key_cache, 4),
        ("value_cache", value_cache, 4),
        ("slot_mapping", slot_mapping, 1),
    ):
        _check(name, t, dims, key)
    if value.shape != key.shape:
        raise ValueError(f"value: expected shape {list(key.shape)}, got {list(value.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key_cache/value_cache: expected [num_blocks, block_size, {key.shape[1]}, "
            f"{key.shape[2]}], got {list(key_cache.shape)} / {list(value_cache.shape)}"
        )
    fp8 = FP8_FORMATS.get(key_cache.dtype, 0)
    if (
        value.dtype != key.dtype
        or value_cache.dtype != key_cache.dtype
        or (not fp8 and key_cache.dtype != key.dtype)
    ):
        raise ValueError(
            f"key_cache: expected dtype {key.dtype} like key, or an fp8 dtype, got "
            f"{key_cache.dtype} / {value_cache.dtype}"
        )
    if slot_mapping.shape[0] != key.shape[0] or slot_mapping.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(
            f"slot_mapping: expected int32/int64 [{key.shape[0]}], got "
            f"{slot_mapping.dtype} {list(slot_mapping.shape)}"
        )
    num_tokens, num_kv_heads, head_size = key.shape
    scale_stride = 0
    if fp8:
        scale_stride = check_scales(k_scale, v_scale, num_kv_heads, key.device)
        k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    else:
        k_scale = v_scale = slot_mapping  # never read
    if num_tokens == 0:
        return
    heads_pad, head_pad = next_power_of_2(num_kv_heads), next_power_of_2(head_size)
    tokens = tokens_per_program or (
        min(INTERPRETER_TOKENS, next_power_of_2(num_tokens))
        if interpreting()
        else TOKENS_PER_PROGRAM
    )
    if num_warps is None:
        num_warps = min(8, max(1, tokens * heads_pad * head_pad // 1024))
    _reshape_and_cache_kernel[(cdiv(num_tokens, tokens),)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        k_scale,
        v_scale,
        num_tokens,
        key_cache.shape[1],
        num_kv_heads,
        scale_stride,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        HEAD_SIZE=head_size,
        HEADS_PAD=heads_pad,
        HEAD_PAD=head_pad,
        TOKENS=tokens,
        FP8=fp8,
    )
