"""A vectorized PyTorch path: gather pages into padded per-sequence K/V, then
`scaled_dot_product_attention` with an explicit boolean mask. Runs on any device; a second
opinion and a speed peer, not the spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from optimized.backend import BaseBackend, Capabilities
from reference.fp8 import quantize
from reference.metadata import AttnKind, StepMetadata


def _padded_index(lens: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens of sequences with `lens`: [num_seqs, max_len] packed index, valid."""
    lens_t = torch.tensor(lens, device=device)
    starts = torch.cumsum(lens_t, 0) - lens_t
    pos = torch.arange(max(lens, default=0), device=device)
    valid = pos[None, :] < lens_t[:, None]
    return torch.where(valid, starts[:, None] + pos[None, :], 0), valid


def _gather_pages(cache, tables, kv_lens, device, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_seqs, max_kv_len, num_kv_heads, head_size] from the pages, padding zeroed (an fp8
    cache's values times `scale`, float32). Indexes (block, offset) pairs, so a strided cache
    (e.g. a head-major view) is read in place."""
    bs = cache.shape[1]
    pos = torch.arange(max(kv_lens), device=device)
    valid = pos[None, :] < torch.tensor(kv_lens, device=device)[:, None]
    logical = (pos // bs).clamp(max=tables.shape[1] - 1)
    blocks = torch.where(valid, tables[:, logical].long(), 0)
    kv = cache[blocks, (pos % bs)[None, :].expand_as(blocks)]
    if scale is not None:  # fp8: [.., num_kv_heads, head_size] * per-head scale
        kv = kv.float() * scale.reshape(-1)[:, None].float()
    return torch.where(valid[..., None, None], kv, 0), valid


def _bias(md: StepMetadata, kind: AttnKind, max_q: int, max_kv: int, device) -> torch.Tensor:
    """T5's bias, [num_seqs, num_heads, max_q, max_kv] float32, from the spec's lookup table over
    each query's and key's position (queries at context + j, keys at their own)."""
    from reference.position_bias import lookup_table

    lut, reach = lookup_table(md.relative_attention_bias, kind == AttnKind.ENCODER,
                              md.relative_attention_num_buckets,
                              md.relative_attention_max_distance)  # fmt: skip
    first = torch.tensor(md.context_lens if kind == AttnKind.DECODER else (0,) * md.num_seqs,
                         device=device)  # fmt: skip
    query_pos = first[:, None] + torch.arange(max_q, device=device)[None, :]
    relative = torch.arange(max_kv, device=device)[None, None, :] - query_pos[:, :, None]
    index = relative.clamp(-reach, reach) + reach  # [seqs, q, kv]
    return lut.to(device)[:, index].permute(1, 0, 2, 3)


def gathered(key, value, kv_cache, md: StepMetadata, kind: AttnKind):
    """Every sequence's visible K/V, contiguous: [num_seqs, num_kv_heads, max_len, head_size]
    each (padding zero; fp8 caches read back as float32)."""
    dev, kv_lens = (key if key is not None else kv_cache[0]).device, md.kv_lens_for(kind)
    if kind == AttnKind.ENCODER:
        index, _ = _padded_index(kv_lens, dev)
        k, v = key[index], value[index]
    else:
        tables = md.tables_for(kind)[0]
        ks, vs = (md.k_scale, md.v_scale) if md.fp8 else (None, None)
        k, _ = _gather_pages(kv_cache[0], tables, kv_lens, dev, ks)
        v, _ = _gather_pages(kv_cache[1], tables, kv_lens, dev, vs)
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


class TorchBackend(BaseBackend):
    name = "torch"
    capabilities = Capabilities(
        head_sizes=(1, 1024),
        max_block_size=1 << 20,
        kv_cache_dtypes=("auto", "fp8_e4m3", "fp8_e5m2"),
        position_biases=("none", "t5"),
    )

    def device(self):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def attend(self, query, key, value, kv_cache, metadata: StepMetadata, kind):
        md, dev = metadata, query.device
        q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
        if kind == AttnKind.ENCODER:
            kv_idx, kv_valid = _padded_index(kv_lens, dev)
            k, v = key[kv_idx], value[kv_idx]
        else:
            key_cache, value_cache = kv_cache
            tables, slots = md.tables_for(kind)
            if key is not None:  # cache write: every real slot, padding (-1) skipped
                keep = slots >= 0
                real = slots[keep].long()
                block, offset = real // md.block_size, real % md.block_size
                k_new, v_new = key[: slots.shape[0]][keep], value[: slots.shape[0]][keep]
                if md.fp8:  # x / scale in float32, clamp, round to nearest even
                    k_new = quantize(k_new, md.k_scale, key_cache.dtype)
                    v_new = quantize(v_new, md.v_scale, value_cache.dtype)
                key_cache[block, offset] = k_new
                value_cache[block, offset] = v_new
            ks, vs = (md.k_scale, md.v_scale) if md.fp8 else (None, None)
            k, kv_valid = _gather_pages(key_cache, tables, kv_lens, dev, ks)
            v, _ = _gather_pages(value_cache, tables, kv_lens, dev, vs)
        q_idx, q_valid = _padded_index(q_lens, dev)
        q = query[q_idx]  # [num_seqs, max_q, num_heads, head_size]
        mask = q_valid[:, :, None] & kv_valid[:, None, :]
        if kind == AttnKind.DECODER:
            ctx = torch.tensor(md.context_lens, device=dev)
            qpos = ctx[:, None] + torch.arange(q.shape[1], device=dev)[None, :]
            kpos = torch.arange(k.shape[1], device=dev)
            mask &= kpos[None, None, :] <= qpos[:, :, None]
            if md.sliding_window is not None:
                mask &= kpos[None, None, :] > qpos[:, :, None] - md.sliding_window
        mask |= ~q_valid[:, :, None]  # padding query rows see everything (no NaN), then dropped
        mask = mask[:, None]
        if md.position_bias != "none":  # an additive mask: T5's bias where visible, -inf not
            mask = _bias(md, kind, q.shape[1], k.shape[1], dev).masked_fill(~mask, float("-inf"))
        # fp32 math kernel: deterministic (the fused CUDA kernels were seen to differ between
        # two runs of one bf16 step on the H100) and at least as accurate as the input dtype.
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2).float(),
                k.transpose(1, 2).float(),
                v.transpose(1, 2).float(),
                attn_mask=mask,
                scale=md.scale_for(query.shape[-1]),
                enable_gqa=True,
            ).transpose(1, 2)
        result = torch.zeros_like(query)
        result[q_idx[q_valid]] = out[q_valid].to(query.dtype)
        return result
