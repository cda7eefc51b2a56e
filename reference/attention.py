"""The reference attention: textbook float64 attention over an explicit paged cache. The spec.

For each sequence, gather its visible keys/values (from the new tokens for ENCODER, from the paged
cache for DECODER and ENCODER_DECODER after this step's writes), then for each query token and
head compute

    out = softmax(q · kᵀ · scale + mask) · v

in float64, where mask is 0 for visible keys and -inf otherwise (`StepMetadata.sequence_mask`).
GQA/MQA: query head h reads kv head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch

from reference.metadata import AttnKind, StepMetadata, check_inputs
from reference.paged_cache import gather_sequence, write_to_cache


def textbook_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for one sequence, float64.

    query:  [q_len, num_heads, head_size]
    keys:   [kv_len, num_kv_heads, head_size], values likewise
    mask:   [q_len, kv_len] bool, True = visible; every row must see at least one key
    returns [q_len, num_heads, head_size] float64
    """
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    for kv_head in range(num_kv_heads):  # query heads h with h // group == kv_head share it
        heads = slice(kv_head * group, (kv_head + 1) * group)
        q = query[:, heads].double()  # [q_len, group, head_size]
        k = keys[:, kv_head].double()  # [kv_len, head_size]
        v = values[:, kv_head].double()
        scores = torch.einsum("qhd,kd->hqk", q, k) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, heads] = torch.einsum("hqk,kd->qhd", probs, v)
    return out


def attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    metadata: StepMetadata,
    attn_kind: AttnKind,
) -> torch.Tensor:
    """One attention layer for one engine step. Writes new K/V to the cache, returns the output.

    query:    [num_tokens, num_heads, head_size]
    key:      [num_kv_tokens, num_kv_heads, head_size] or None (cross-attention decode)
    value:    like key
    kv_cache: (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_size],
              updated in place; None for ENCODER
    returns   [num_tokens, num_heads, head_size] float64; padding rows are zero
    """
    attn_kind = AttnKind(attn_kind)
    check_inputs(query, key, value, kv_cache, metadata, attn_kind)
    md = metadata
    scale = md.scale_for(query.shape[-1])
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)

    tables, slots = md.tables_for(attn_kind)
    if kv_cache is not None and key is not None:
        write_to_cache(key, value, kv_cache[0], kv_cache[1], slots)

    q_start = md.query_start_loc if attn_kind != AttnKind.ENCODER else md.encoder_start_loc
    q_lens, kv_lens = md.query_lens_for(attn_kind), md.kv_lens_for(attn_kind)
    for i in range(md.num_seqs):
        q = query[q_start[i] : q_start[i] + q_lens[i]]
        if attn_kind == AttnKind.ENCODER:
            keys = key[q_start[i] : q_start[i] + q_lens[i]]
            values = value[q_start[i] : q_start[i] + q_lens[i]]
        else:
            keys = gather_sequence(kv_cache[0], tables[i], kv_lens[i])
            values = gather_sequence(kv_cache[1], tables[i], kv_lens[i])
        mask = md.sequence_mask(attn_kind, i).to(query.device)
        out[q_start[i] : q_start[i] + q_lens[i]] = textbook_attention(q, keys, values, mask, scale)
    return out
