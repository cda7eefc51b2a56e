"""Every step in our own Triton kernels: `reshape_and_cache` + `paged_attention` (+ split-K).

On a machine without CUDA the same kernels run through the Triton interpreter
(TRITON_INTERPRET=1, set by the test and matrix entry points before Triton is imported).
"""

from __future__ import annotations

import torch

from optimized.backend import BaseBackend, CacheLayout
from optimized.kernels import interpreting
from reference.metadata import AttnKind, StepMetadata


def triton_forward(
    query, key, value, kv_cache, md: StepMetadata, kind: AttnKind, num_splits: int | None = None
) -> torch.Tensor:
    """Cache write, then attention, both in Triton. Used by the triton and xformers backends."""
    from optimized.ops.paged_attention import paged_attention
    from optimized.ops.plan import make_schedule
    from optimized.ops.reshape_and_cache import reshape_and_cache

    num_heads, head_size = query.shape[1:]
    out = torch.zeros_like(query)
    scale = md.scale_for(head_size)
    zeros = (0,) * md.num_seqs
    if kind == AttnKind.ENCODER:
        group = num_heads // key.shape[1]
        lens = md.encoder_seq_lens
        schedule = make_schedule(lens, lens, zeros, group, query.device)
        return paged_attention(
            query,
            key,
            value,
            None,
            schedule,
            causal=False,
            scale=scale,
            paged=False,
            out=out,
            num_splits=num_splits,
        )
    key_cache, value_cache = kv_cache
    tables, slots = md.tables_for(kind)
    if key is not None:
        reshape_and_cache(key, value, key_cache, value_cache, slots, md.k_scale, md.v_scale)
    causal = kind == AttnKind.DECODER
    schedule = make_schedule(
        md.query_lens,
        md.kv_lens_for(kind),
        md.context_lens if causal else zeros,
        num_heads // key_cache.shape[2],
        query.device,
    )
    return paged_attention(
        query,
        key_cache,
        value_cache,
        tables,
        schedule,
        causal=causal,
        scale=scale,
        sliding_window=md.sliding_window if causal else None,
        out=out,
        k_scale=md.k_scale,
        v_scale=md.v_scale,
        num_splits=num_splits,
    )


def triton_unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device and TRITON_INTERPRET is not 1 (the interpreter runs on the CPU)"
    return None


class TritonBackend(BaseBackend):
    name = "triton"
    cache_layout = CacheLayout.UNIT_LAST_DIM  # addressed by strides; head_size dim dense
    kv_cache_dtypes = ("auto", "fp8_e4m3", "fp8_e5m2")  # fp8 read in-kernel, quantized on write
    num_splits: int | None = None  # None: split-K chosen by occupancy

    def unavailable_reason(self) -> str | None:
        return triton_unavailable_reason()

    def attend(self, query, key, value, kv_cache, metadata, kind) -> torch.Tensor:
        return triton_forward(query, key, value, kv_cache, metadata, kind, self.num_splits)


class TritonSplitKBackend(TritonBackend):
    """The split-K (flash-decoding) variant forced on every step, so the matrix checks it even
    where occupancy would not pick it."""

    name = "triton-splitk"
    num_splits = 4
