"""Paged cache write: store each new token's K/V at its slot; slot -1 (padding) is skipped.

key, value:             [num_tokens, num_kv_heads, head_size]
key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
slot_mapping:           [num_tokens] int32/int64, slot = block * block_size + offset, or -1

The launcher is `optimized/ops/reshape_and_cache.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Sizes that vary per call are runtime arguments, unspecialized: one compile per (padded heads,
# head size, dtype) instead of one per token count and block size.
@triton.jit(do_not_specialize=["num_tokens", "block_size", "num_kv_heads"])
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_tokens,
    block_size,
    num_kv_heads,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """Each program copies TOKENS consecutive tokens (all kv heads) to their slots."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_PAD)[None, :]
    in_bounds = (h < num_kv_heads) & (d < HEAD_SIZE)
    for i in tl.static_range(TOKENS):
        token = tl.program_id(0).to(tl.int64) * TOKENS + i
        # K/V loads do not wait for the slot (padding rows are read, never written): the two
        # memory latencies overlap instead of adding up.
        src = in_bounds & (token < num_tokens)
        k = tl.load(key_ptr + token * stride_k_tok + h * stride_k_head + d, mask=src)
        v = tl.load(value_ptr + token * stride_v_tok + h * stride_v_head + d, mask=src)
        slot = tl.load(slot_mapping_ptr + token, mask=token < num_tokens, other=-1).to(tl.int64)
        mask = src & (slot >= 0)  # padding tokens (slot -1) are never written
        block = tl.maximum(slot, 0) // block_size
        offset = tl.maximum(slot, 0) % block_size
        kc = key_cache_ptr + block * stride_kc_block + offset * stride_kc_tok
        vc = value_cache_ptr + block * stride_vc_block + offset * stride_vc_tok
        tl.store(kc + h * stride_kc_head + d, k, mask=mask)
        tl.store(vc + h * stride_vc_head + d, v, mask=mask)
