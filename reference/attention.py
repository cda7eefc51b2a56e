"""The reference attention: textbook float64 attention over an explicit paged cache. The spec.

For each sequence, gather its visible keys/values (from the new tokens for ENCODER, from the paged
cache for DECODER and ENCODER_DECODER after this step's writes), then for each query token and
head compute

    out = softmax(q · kᵀ · scale + bias + mask) · v

in float64, where mask is 0 for visible keys and -inf otherwise (`StepMetadata.sequence_mask`)
and bias is T5's relative position bias where the step has one (reference/position_bias.py).
GQA/MQA: query head h reads kv head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch

from reference.metadata import AttnKind, StepMetadata
from reference.paged_cache import gather_sequence, write_to_cache
from reference.validation import check_inputs

SCORES_BYTES = 256 << 20


def textbook_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias + mask)·v for one sequence, float64.

    query:  [q_len, num_heads, head_size]
    keys:   [kv_len, num_kv_heads, head_size], values likewise
    mask:   [q_len, kv_len] bool, True = visible; every row must see at least one key
    bias:   [num_heads, q_len, kv_len] or None
    returns [q_len, num_heads, head_size] float64
    """
    q_len, num_heads, head_size = query.shape
    kv_len, num_kv_heads = keys.shape[:2]
    group = num_heads // num_kv_heads
    # Query head h = kv_head * group + g reads kv head `kv_head`: view the heads as [kv, group].
    q = query.double().reshape(q_len, num_kv_heads, group, head_size)
    k, v = keys.double(), values.double()
    out = torch.empty(q_len, num_kv_heads, group, head_size, dtype=torch.float64, device=q.device)
    # KV heads go in chunks so the float64 scores stay ~256 MB (long encoder sequences).
    chunk = max(1, SCORES_BYTES // (8 * group * max(1, q_len) * max(1, kv_len)))
    for h0 in range(0, num_kv_heads, chunk):
        hs = slice(h0, h0 + chunk)
        scores = torch.einsum("qngd,knd->ngqk", q[:, hs], k[:, hs]) * scale
        if bias is not None:  # head h = kv_head * group + g
            scores = scores + bias.to(q.device).view(num_kv_heads, group, q_len, kv_len)[hs]
        scores = scores.masked_fill(~mask, float("-inf"))  # mask [q, k] broadcasts over heads
        probs = torch.softmax(scores, dim=-1)
        out[:, hs] = torch.einsum("ngqk,knd->qngd", probs, v[:, hs])
    return out.reshape(q_len, num_heads, head_size)


def attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    metadata: StepMetadata,
    attn_kind: AttnKind,
    *,
    prefill_reads_inputs: bool = False,
) -> torch.Tensor:
    """One attention layer for one engine step. Writes new K/V to the cache, returns the output.

    query:    [num_tokens, num_heads, head_size]
    key:      [num_kv_tokens, num_kv_heads, head_size] or None (cross-attention decode)
    value:    like key
    kv_cache: (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_size],
              updated in place; None for ENCODER
    returns   [num_tokens, num_heads, head_size] float64; padding rows are zero

    Keys and values are read from the cache after this step's writes (fp8: as stored, scaled
    back). `prefill_reads_inputs`: at a step where no sequence has cached context, attend over
    `key`/`value` as given instead (vLLM V0's convention; reference/fp8.py).
    """
    attn_kind = check_inputs(query, key, value, kv_cache, metadata, attn_kind)
    md = metadata
    scale = md.scale_for(query.shape[-1])
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)

    tables, slots = md.tables_for(attn_kind)
    if kv_cache is not None and key is not None:
        write_to_cache(key, value, kv_cache[0], kv_cache[1], slots, md.k_scale, md.v_scale)

    from_inputs = attn_kind == AttnKind.ENCODER or (prefill_reads_inputs and md.is_prefill_only())
    q_start = md.query_start_loc if attn_kind != AttnKind.ENCODER else md.encoder_start_loc
    kv_start = md.encoder_start_loc if attn_kind == AttnKind.ENCODER else md.query_start_loc
    if attn_kind == AttnKind.ENCODER_DECODER:
        kv_start = md.cross_kv_start_loc
    q_lens, kv_lens = md.query_lens_for(attn_kind), md.kv_lens_for(attn_kind)
    for i in range(md.num_seqs):
        q = query[q_start[i] : q_start[i] + q_lens[i]]
        if from_inputs:  # the new tokens are all the sequence has
            keys = key[kv_start[i] : kv_start[i] + kv_lens[i]]
            values = value[kv_start[i] : kv_start[i] + kv_lens[i]]
        else:
            keys = gather_sequence(kv_cache[0], tables[i], kv_lens[i], md.k_scale)
            values = gather_sequence(kv_cache[1], tables[i], kv_lens[i], md.v_scale)
        mask = md.sequence_mask(attn_kind, i).to(query.device)
        bias = md.position_bias_for(attn_kind, i)
        out[q_start[i] : q_start[i] + q_lens[i]] = textbook_attention(
            q, keys, values, mask, scale, bias
        )
    return out
