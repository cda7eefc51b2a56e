"""The paged cache write launcher: checks the layouts, then runs `_reshape_and_cache_kernel`
(optimized/kernels/reshape_and_cache.py) with one token per program.

key, value:             [num_tokens, num_kv_heads, head_size]
key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
slot_mapping:           [num_tokens] int32/int64, slot = block * block_size + offset, or -1
"""

from __future__ import annotations

import torch

from optimized.kernels import cdiv, next_power_of_2
from optimized.kernels.reshape_and_cache import _reshape_and_cache_kernel

# One token per program, about 32 elements per thread: the best of the cache-write sweep.
TOKENS_PER_PROGRAM = 1


def _check(name: str, t: torch.Tensor, dims: int, like: torch.Tensor) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1)")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
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
    if key_cache.dtype != key.dtype or value_cache.dtype != key.dtype or value.dtype != key.dtype:
        raise ValueError(f"key_cache: expected dtype {key.dtype} like key, got {key_cache.dtype}")
    if slot_mapping.shape[0] != key.shape[0] or slot_mapping.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(
            f"slot_mapping: expected int32/int64 [{key.shape[0]}], got "
            f"{slot_mapping.dtype} {list(slot_mapping.shape)}"
        )
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    tokens = tokens_per_program or TOKENS_PER_PROGRAM
    heads_pad, head_pad = next_power_of_2(num_kv_heads), next_power_of_2(head_size)
    if num_warps is None:
        num_warps = min(8, max(1, heads_pad * head_pad // 1024))
    _reshape_and_cache_kernel[(cdiv(num_tokens, tokens),)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        num_tokens,
        key_cache.shape[1],
        num_kv_heads,
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
        num_warps=num_warps,
    )
