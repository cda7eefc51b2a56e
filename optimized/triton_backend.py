"""Every step in our own Triton kernels: `reshape_and_cache` + `paged_attention` (+ split-K).

On a machine without CUDA the same kernels run through the Triton interpreter
(TRITON_INTERPRET=1, set by the test and matrix entry points before Triton is imported).
"""

from __future__ import annotations

import torch

from optimized.backend import BaseBackend, CacheLayout, Capabilities, contiguous
from optimized.kernels import interpreting
from reference.metadata import AttnKind, StepMetadata


def triton_forward(
    query, key, value, kv_cache, md: StepMetadata, kind: AttnKind, num_splits: int | None = None
) -> torch.Tensor:
    """Cache write, then attention, both in Triton. Used by the triton and xformers backends."""
    from optimized.ops.paged_attention import paged_attention
    from optimized.ops.reshape_and_cache import reshape_and_cache

    out = torch.zeros_like(query)
    scale = md.scale_for(query.shape[-1])
    schedule = _schedule(query, key, kv_cache, md, kind)
    bias = bias_table(md, kind, query.device)
    if kind == AttnKind.ENCODER:
        return paged_attention(query, key, value, None, schedule, causal=False, scale=scale,
                               paged=False, out=out, num_splits=num_splits, bias=bias)  # fmt: skip
    key_cache, value_cache = kv_cache
    tables, slots = md.tables_for(kind)
    if key is not None:
        reshape_and_cache(key, value, key_cache, value_cache, slots, md.k_scale, md.v_scale)
    causal = kind == AttnKind.DECODER
    return paged_attention(
        query, key_cache, value_cache, tables, schedule, causal=causal, scale=scale,
        sliding_window=md.sliding_window if causal else None, out=out, k_scale=md.k_scale,
        v_scale=md.v_scale, num_splits=num_splits, bias=bias,
    )  # fmt: skip


def bias_table(md: StepMetadata, kind: AttnKind, device) -> tuple[torch.Tensor, int] | None:
    """T5's bias as the kernel takes it: the spec's lookup table (reference/position_bias.py),
    times log2(e) for the kernel's exp2 domain, on `device`; None without a bias."""
    if md.position_bias == "none":
        return None
    from optimized.ops.paged_attention import LOG2E
    from reference.position_bias import lookup_table

    lut, reach = lookup_table(md.relative_attention_bias, kind == AttnKind.ENCODER,
                              md.relative_attention_num_buckets,
                              md.relative_attention_max_distance)  # fmt: skip
    return (lut * LOG2E).to(device).contiguous(), reach


def _schedule(query, key, kv_cache, md: StepMetadata, kind: AttnKind):
    """The step's tiles (host work, once)."""
    from optimized.ops.plan import make_schedule

    zeros = (0,) * md.num_seqs
    if kind == AttnKind.ENCODER:
        lens = md.encoder_seq_lens
        return make_schedule(lens, lens, zeros, query.shape[1] // key.shape[1], query.device)
    causal = kind == AttnKind.DECODER
    return make_schedule(
        md.query_lens,
        md.kv_lens_for(kind),
        md.context_lens if causal else zeros,
        query.shape[1] // kv_cache[0].shape[2],
        query.device,
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
    # addressed by strides (the head_size dim dense); fp8 read in-kernel, quantized on write
    capabilities = Capabilities(
        cache_layout=CacheLayout.UNIT_LAST_DIM,
        kv_cache_dtypes=("auto", "fp8_e4m3", "fp8_e5m2"),
        position_biases=("none", "t5"),  # in-kernel, from the spec's per-step lookup table
    )
    num_splits: int | None = None  # None: split-K chosen by occupancy

    def unavailable_reason(self) -> str | None:
        return triton_unavailable_reason()

    def attend(self, query, key, value, kv_cache, metadata, kind) -> torch.Tensor:
        return triton_forward(query, key, value, kv_cache, metadata, kind, self.num_splits)

    def prepare(self, query, key, value, kv_cache, metadata, attn_kind):
        """Validation, the tile schedule and the launch plan once; the call launches the cache
        write and the planned kernels only (no host work: CUDA-graph capturable)."""
        from optimized.ops.paged_attention import launch, plan_attention
        from optimized.ops.reshape_and_cache import reshape_and_cache

        kind = self.validate(query, key, value, kv_cache, metadata, attn_kind)
        query, key, value = contiguous(query, key, value)
        md = metadata
        paged = kind != AttnKind.ENCODER
        causal = kind == AttnKind.DECODER
        schedule = _schedule(query, key, kv_cache, md, kind)
        k_cache, v_cache = kv_cache if paged else (key, value)
        tables, slots = md.tables_for(kind)
        common = dict(causal=causal, sliding_window=md.sliding_window if causal else None,
                      paged=paged, k_scale=md.k_scale, v_scale=md.v_scale,
                      bias=bias_table(md, kind, query.device))  # fmt: skip
        plan = plan_attention(query, k_cache, v_cache, tables, schedule, **common,
                              num_splits=self.num_splits)  # fmt: skip
        scale = md.scale_for(query.shape[-1])
        write = paged and key is not None

        def call():
            if write:
                reshape_and_cache(key, value, *kv_cache, slots, md.k_scale, md.v_scale)
            out = torch.zeros_like(query)
            return launch(plan, query, k_cache, v_cache, tables, schedule, out, scale=scale,
                          **common)  # fmt: skip

        return call


class TritonSplitKBackend(TritonBackend):
    """The split-K (flash-decoding) variant forced on every step, so the matrix checks it even
    where occupancy would not pick it."""

    name = "triton-splitk"
    num_splits = 4
