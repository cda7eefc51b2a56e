"""xFormers backends.

`xformers` (vLLM V0's production path for encoder/decoder models): cache writes by our Triton
`reshape_and_cache`; steps without cached context (encoder, decoder prefill, cross prefill) by
`xformers.ops.memory_efficient_attention` on the packed tokens with block-diagonal masks; steps
with cached context (chunked prefill, decode) by our Triton paged-attention kernel.

`xformers-paged`: decode through xFormers' own paged attention (PagedBlockDiagonalPaddedKeysMask
+ triton_splitk). Its limits (page size a multiple of 64, decode only, no window, no fp8 cache:
its split-K kernel reads the model dtype) come back as not-supported reasons, including
xFormers' own.

With an fp8 cache, `xformers` follows vLLM V0: steps without cached context attend over their
new K/V as given (`fp8_prefill_reads_inputs`), decode reads the fp8 cache in our kernel.
"""

from __future__ import annotations

import torch

from optimized.backend import BaseBackend, CacheLayout, Capabilities
from optimized.triton_backend import triton_forward, triton_unavailable_reason
from reference.metadata import AttnKind, StepMetadata


def xformers_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (xFormers' attention ops run on CUDA only)"
    try:
        import xformers._cpp_lib as cpp
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xFormers is not installed ({e})"
    if not cpp._built_with_cuda:
        return f"xFormers CUDA extension not loaded: {cpp._cpp_library_load_exception}"
    return triton_unavailable_reason()


def _gqa_view(t: torch.Tensor, num_kv_heads: int, group: int, expand: bool) -> torch.Tensor:
    """[tokens, heads, D] → xFormers' [1, tokens, G, H, D] (K/V broadcast over the group)."""
    if group == 1:
        return t.unsqueeze(0)
    if expand:
        return t.view(1, t.shape[0], num_kv_heads, 1, t.shape[-1]).expand(-1, -1, -1, group, -1)
    return t.view(1, t.shape[0], num_kv_heads, group, t.shape[-1])


class XFormersBackend(BaseBackend):
    name = "xformers"
    # Our Triton kernels write and read the caches. vLLM V0's convention: a prefill-only step
    # attends over the new K/V as given (written quantized, read back so only by later steps).
    capabilities = Capabilities(
        cache_layout=CacheLayout.UNIT_LAST_DIM,
        kv_cache_dtypes=("auto", "fp8_e4m3", "fp8_e5m2"),
        fp8_prefill_reads_inputs=True,
    )

    def unavailable_reason(self) -> str | None:
        return xformers_unavailable_reason()

    def attend(self, query, key, value, kv_cache, metadata: StepMetadata, kind):
        if kind != AttnKind.ENCODER and not metadata.is_prefill_only():
            return triton_forward(query, key, value, kv_cache, metadata, kind)
        from xformers.ops import fmha

        md = metadata
        if kind != AttnKind.ENCODER:  # write the caches, then attend over the new tokens
            from optimized.ops.reshape_and_cache import reshape_and_cache

            _, slots = md.tables_for(kind)
            reshape_and_cache(key, value, kv_cache[0], kv_cache[1], slots, md.k_scale, md.v_scale)
        q_lens, kv_lens = list(md.query_lens_for(kind)), list(md.new_kv_lens_for(kind))
        if kind == AttnKind.DECODER:
            bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(q_lens)
            if md.sliding_window is not None:
                bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_lens).make_local_attention(
                    md.sliding_window
                )
        else:
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_lens, kv_lens)
        nq, nk = sum(q_lens), sum(kv_lens)
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        group = num_heads // num_kv_heads
        out = fmha.memory_efficient_attention(
            _gqa_view(query[:nq], num_kv_heads, group, expand=False),
            _gqa_view(key[:nk], num_kv_heads, group, expand=True),
            _gqa_view(value[:nk], num_kv_heads, group, expand=True),
            attn_bias=bias,
            scale=md.scale_for(query.shape[-1]),
        )
        result = torch.zeros_like(query)
        result[:nq] = out.reshape(nq, num_heads, -1)
        return result


class XFormersPagedBackend(BaseBackend):
    name = "xformers-paged"
    capabilities = Capabilities(  # the paged bias views the pool as tokens: contiguous
        attn_kinds=(AttnKind.DECODER, AttnKind.ENCODER_DECODER), cache_layout=CacheLayout.CONTIGUOUS
    )

    def unavailable_reason(self) -> str | None:
        return xformers_unavailable_reason()

    def not_supported_reasons(self, query, key, value, kv_cache, metadata, attn_kind):
        args = (query, key, value, kv_cache, metadata, attn_kind)
        reasons = super().not_supported_reasons(*args)
        md, kind = metadata, AttnKind(attn_kind)
        if (
            any(n != 1 for n in md.query_lens)
            or md.is_prefill_only()
            or (kind == AttnKind.ENCODER_DECODER and key is not None)
        ):
            reasons.append("decode only (one query token per sequence on a cached context)")
        if md.sliding_window is not None and kind == AttnKind.DECODER:
            reasons.append("sliding window not supported by the paged bias")
        if reasons:
            return reasons
        from xformers.ops.fmha import triton_splitk
        from xformers.ops.fmha.common import Inputs

        q, k, v, bias = self._inputs(*args)
        own = triton_splitk.FwOp.not_supported_reasons(Inputs(q, k, v, bias))
        return [f"xFormers triton_splitk: {r}" for r in own]

    def _inputs(self, query, key, value, kv_cache, md: StepMetadata, kind):
        from xformers.ops import fmha

        key_cache, value_cache = kv_cache
        tables, _ = md.tables_for(kind)
        num_blocks, bs, num_kv_heads, head_size = key_cache.shape
        group = query.shape[1] // num_kv_heads
        nq = md.num_seqs
        bias = fmha.attn_bias.PagedBlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[1] * nq,
            kv_seqlen=list(md.kv_lens_for(kind)),
            block_tables=tables.to(torch.int32),
            page_size=bs,
            device=query.device,
        )
        flat = lambda c: _gqa_view(
            c.view(num_blocks * bs, num_kv_heads, head_size), num_kv_heads, group, expand=True
        )
        return (
            _gqa_view(query[:nq], num_kv_heads, group, expand=False),
            flat(key_cache),
            flat(value_cache),
            bias,
        )

    def attend(self, query, key, value, kv_cache, metadata: StepMetadata, kind):
        from xformers.ops import fmha

        if key is not None:
            from optimized.ops.reshape_and_cache import reshape_and_cache

            _, slots = metadata.tables_for(kind)
            reshape_and_cache(key, value, kv_cache[0], kv_cache[1], slots)
        q, k, v, bias = self._inputs(query, key, value, kv_cache, metadata, kind)
        out = fmha.memory_efficient_attention_forward(
            q,
            k,
            v,
            attn_bias=bias,
            scale=metadata.scale_for(query.shape[-1]),
            op=fmha.triton_splitk.FwOp,
        )
        result = torch.zeros_like(query)
        result[: metadata.num_seqs] = out.reshape(metadata.num_seqs, query.shape[1], -1)
        return result
