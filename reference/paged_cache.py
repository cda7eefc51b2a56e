"""The paged KV cache, spelled out: writing tokens to slots, gathering a sequence block by block.

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]

A sequence's tokens live in blocks listed by its block table. Position p of sequence i lives in

    block  = block_tables[i][p // block_size]
    offset = p % block_size
    slot   = block * block_size + offset       (what slot_mapping holds for a new token)

Worked example, block_size = 4, block_tables[i] = [7, 2, 9, 0, 0]: a sequence of 10 tokens needs
ceil(10 / 4) = 3 blocks. Position 0 is slot 7*4+0 = 28, position 5 is block 2 offset 1 = slot 9,
position 9 is block 9 offset 1 = slot 37. Entries 3 and 4 of the table (0, 0) are padding and are
never read. A slot of -1 in slot_mapping marks a padding token that is never written.
"""

from __future__ import annotations

import torch

from reference.fp8 import FP8_MAX, dequantize, quantize


def write_to_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store token t's K/V at slot `slot_mapping[t]`, in place; slots of -1 are skipped. An fp8
    cache stores them quantized with k_scale / v_scale (reference/fp8.py `quantize`).

    key, value:             [num_kv_tokens, num_kv_heads, head_size]
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping:           [num_kv_tokens]
    """
    written = slot_mapping >= 0  # -1: a padding token, never written
    slots = slot_mapping[written].long()
    block, offset = slots // key_cache.shape[1], slots % key_cache.shape[1]
    k, v = key[written], value[written]
    if key_cache.dtype in FP8_MAX:
        k, v = quantize(k, k_scale, key_cache.dtype), quantize(v, v_scale, value_cache.dtype)
    # One indexed store per cache (slots are unique: `check_inputs` rejects a slot written twice).
    key_cache[block, offset] = k
    value_cache[block, offset] = v


def gather_sequence(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The first `seq_len` tokens of one sequence, contiguous: [seq_len, num_kv_heads, head_size]
    (with `scale`, an fp8 cache's values read back: stored * scale, in float64).

    cache:       [num_blocks, block_size, num_kv_heads, head_size]
    block_table: [max_blocks_per_seq]; only the first ceil(seq_len / block_size) entries are read
    """
    num_blocks = -(-seq_len // cache.shape[1])  # ceil: the last block may be partly filled
    blocks = block_table[:num_blocks].long()  # entries past these are padding, never read
    # [num_blocks, block_size, ...] in table order -> [num_blocks * block_size, ...] -> cut
    tokens = cache[blocks].flatten(0, 1)[:seq_len]
    return dequantize(tokens, scale) if scale is not None else tokens
