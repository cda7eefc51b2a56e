"""The paged-attention kernel's launch variants against the reference: block size and split count
are runtime arguments (one compiled kernel serves them all), so every combination must still
agree with the spec, including more splits than a sequence has K/V tiles (empty splits)."""

import pytest
import torch
import triton

from conformance.compare import compare_output
from optimized.kernels.paged_attention import make_schedule, paged_attention
from reference import attention
from reference.workload import build_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("num_splits,reduce_rows", [(1, None), (2, None), (7, None), (3, 1)])
@pytest.mark.parametrize("block_size", [1, 8, 32])
@pytest.mark.parametrize(
    "heads,kv_heads,head_size,window",
    [(4, 4, 64, None), (2, 2, 80, 9), (8, 2, 32, None)],
    ids=["mha-d64", "mha-d80-window", "gqa4-d32"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_variants_match_reference(
    heads, kv_heads, head_size, window, block_size, num_splits, reduce_rows, dtype
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
        reduce_rows=reduce_rows,  # 1: the GPU's one row per reduce program
    )
    comp = compare_output(step, out.cpu(), ref)
    assert comp.ok, comp.reason


def test_shared_memory_model_and_every_launch_config_fits(monkeypatch):
    """The shared-memory model against what Triton/ncu reported on the GPU, and every GPU
    launch configuration (head size × dtype × phase) under the sm_90 limit. fp32 with head size
    256 at prefill once asked for 344,320 bytes and failed to launch on the H100."""
    from optimized.kernels import paged_attention as pa

    assert pa.smem_bytes(64, 64, 256, 4, 3) == 344_320  # Triton's OutOfResources message
    # ncu (H200), decode: GQA 8:1 d128 bf16 tile 64 → 38,912; MHA d64 tile 32 → 11,264
    assert 0 <= pa.smem_bytes(16, 64, 128, 2, 2) - 38_912 < 4096
    assert 0 <= pa.smem_bytes(16, 32, 64, 2, 2) - 11_264 < 4096
    monkeypatch.setattr(pa, "interpreting", lambda: False)  # the GPU's configurations
    for head_size in (64, 80, 96, 128, 256):
        for elem_bytes in (2, 4):
            for prefill, block_m in ((True, 64), (False, 16)):
                head_pad = triton.next_power_of_2(head_size)
                cfg = pa.launch_config(head_pad, prefill, block_m, elem_bytes)
                used = pa.smem_bytes(
                    block_m, cfg["tile_n"], head_pad, elem_bytes, cfg["num_stages"]
                )
                assert used <= pa.SMEM_LIMIT_BYTES, (head_size, elem_bytes, prefill, cfg)
    # the configurations that fit already are the tuned ones, unchanged
    assert pa.launch_config(128, True, 64, 2) == dict(tile_n=64, num_warps=4, num_stages=3)
    assert pa.launch_config(256, True, 64, 4)["num_stages"] == 2


def test_split_count_fills_half_the_resident_programs(monkeypatch):
    """choose_num_splits on an H100-sized GPU (132 SMs): d64 programs are small (10 fit an SM),
    so few of them are split; d128 ones (4 per SM) only below two per SM."""
    import optimized.kernels.paged_attention as pa

    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert pa.choose_num_splits(512, 64, cuda, head_pad=64) == 2  # 0.39 waves -> 0.78
    assert pa.choose_num_splits(512, 64, cuda, head_pad=128) == 1  # 0.97 waves already
    assert pa.choose_num_splits(128, 512, cuda, head_pad=128) == 4
    assert pa.choose_num_splits(128, 512, cuda, head_pad=64) == 8
    assert pa.choose_num_splits(16, 4096, cuda, head_pad=128) == 32  # capped
    assert pa.choose_num_splits(16, 20, cuda, head_pad=128) == 5  # each split >= 4 tiles
    assert pa.choose_num_splits(16, 7, cuda, head_pad=128) == 1  # too short to split
    assert pa.choose_num_splits(1280, 14, cuda, head_pad=64) == 1  # Whisper self decode B64
    assert pa.choose_num_splits(512, 32, cuda, head_pad=64) == 1  # short context: two per SM
