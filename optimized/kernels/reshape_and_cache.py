"""Paged cache write: store each new token's K/V at its slot; slot -1 (padding) is skipped. With
an fp8 cache, each value is quantized on the way: `fp8(clamp(x / scale, -max, max))`, the
division in float32 (IEEE, `div_rn`), the conversion exact (`fp8.fp8_bits`).

key, value:             [num_tokens, num_kv_heads, head_size]
key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] (uint8 views of an
                        fp8 cache: the kernel stores bit patterns)
slot_mapping:           [num_tokens] int32/int64, slot = block * block_size + offset, or -1
k_scale, v_scale:       float32, one per kv head (scale_stride 1) or one for all (0)

The launcher is `optimized/ops/reshape_and_cache.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.kernels.fp8 import fp8_bits


# Sizes that vary per call are runtime arguments, unspecialized: one compile per (padded heads,
# head size, dtype, tokens per program, fp8 format) instead of one per token count and block
# size.
@triton.jit(do_not_specialize=["num_tokens", "block_size", "num_kv_heads", "scale_stride"])
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_tokens,
    block_size,
    num_kv_heads,
    scale_stride,
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
    FP8: tl.constexpr,
):
    """Each program copies TOKENS consecutive tokens, all kv heads: row r of its tile is token
    r // HEADS_PAD, kv head r % HEADS_PAD."""
    r = tl.arange(0, TOKENS * HEADS_PAD)
    token = tl.program_id(0).to(tl.int64) * TOKENS + r // HEADS_PAD
    h = r % HEADS_PAD
    d = tl.arange(0, HEAD_PAD)[None, :]
    row = (h < num_kv_heads) & (token < num_tokens)
    src = row[:, None] & (d < HEAD_SIZE)
    # K/V loads do not wait for the slot (padding rows are read, never written): the two
    # memory latencies overlap instead of adding up.
    k = tl.load(key_ptr + (token * stride_k_tok + h * stride_k_head)[:, None] + d, mask=src)
    v = tl.load(value_ptr + (token * stride_v_tok + h * stride_v_head)[:, None] + d, mask=src)
    slot = tl.load(slot_mapping_ptr + token, mask=token < num_tokens, other=-1).to(tl.int64)
    mask = src & (slot >= 0)[:, None]  # padding tokens (slot -1) are never written
    block = tl.maximum(slot, 0) // block_size
    offset = tl.maximum(slot, 0) % block_size
    kc = key_cache_ptr + block * stride_kc_block + offset * stride_kc_tok + h * stride_kc_head
    vc = value_cache_ptr + block * stride_vc_block + offset * stride_vc_tok + h * stride_vc_head
    if FP8:
        ks = tl.load(k_scale_ptr + h * scale_stride, mask=h < num_kv_heads, other=1.0)
        vs = tl.load(v_scale_ptr + h * scale_stride, mask=h < num_kv_heads, other=1.0)
        k = fp8_bits(tl.math.div_rn(k.to(tl.float32), ks[:, None]), FP8).to(tl.uint8)
        v = fp8_bits(tl.math.div_rn(v.to(tl.float32), vs[:, None]), FP8).to(tl.uint8)
    tl.store(kc[:, None] + d, k, mask=mask)
    tl.store(vc[:, None] + d, v, mask=mask)
