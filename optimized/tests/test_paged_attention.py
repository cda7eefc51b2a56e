"""The paged-attention kernel's launch variants against the reference: block size and split count
are runtime arguments (one compiled kernel serves them all), so every combination must still
agree with the spec, including more splits than a sequence has K/V tiles (empty splits)."""

import pytest
import torch

from conformance.compare import compare_output
from optimized.kernels.paged_attention import make_schedule, paged_attention
from reference import attention
from reference.workload import build_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("num_splits", [1, 2, 7])
@pytest.mark.parametrize("block_size", [1, 8, 32])
@pytest.mark.parametrize(
    "heads,kv_heads,head_size,window",
    [(4, 4, 64, None), (2, 2, 80, 9), (8, 2, 32, None)],
    ids=["mha-d64", "mha-d80-window", "gqa4-d32"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_variants_match_reference(
    heads, kv_heads, head_size, window, block_size, num_splits, dtype
):
    step = build_step(
        "decoder",
        (1, 1, 1),
        (40, 7, 65),
        block_size=block_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        dtype=dtype,
        layout="shuffled",
        sliding_window=window,
        seed=11,
    )
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())  # also writes the new tokens into the reference's cache
    key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
    md = step.metadata
    schedule = make_schedule(
        md.query_lens, md.kv_lens_for(step.attn_kind), md.context_lens, heads // kv_heads, DEVICE
    )
    out = paged_attention(
        step.query.to(DEVICE),
        key_cache,
        value_cache,
        md.block_tables.to(DEVICE),
        schedule,
        causal=True,
        scale=md.scale_for(head_size),
        sliding_window=window,
        num_splits=num_splits,
        tile_n=16,
    )
    comp = compare_output(step, out.cpu(), ref)
    assert comp.ok, comp.reason
