"""The comparison: what passes, what fails, and why."""

import math

import torch

from conformance.compare import compare_caches, compare_output
from conformance.tolerance import FLOOR, baseline_attention
from reference import attention
from reference.workload import build_step


def _step(dtype=torch.float16):
    return build_step(
        "decoder", (5, 1), (0, 9), block_size=4, dtype=dtype, num_heads=4, num_kv_heads=2, seed=1
    )


def test_naive_low_precision_passes_and_a_tf32_sized_error_fails_in_fp32():
    step = _step(torch.float32)
    ref = attention(*step.with_fresh_cache().args())
    assert compare_output(step, baseline_attention(step).float(), ref).ok
    noisy = ref + 1e-3 * torch.randn_like(ref)  # TF32-sized error
    comp = compare_output(step, noisy.float(), ref)
    assert not comp.ok and comp.reason.startswith("numerical mismatch") and comp.err_ratio > 1


def test_nan_where_the_reference_is_finite_fails():
    step = _step()
    ref = attention(*step.with_fresh_cache().args())
    out = ref.half().clone()
    out[0, 0, 0] = math.nan
    comp = compare_output(step, out, ref)
    assert not comp.ok and comp.nan_count == 1 and "NaN" in comp.reason


def test_shape_mismatch_is_named():
    step = _step()
    ref = attention(*step.with_fresh_cache().args())
    assert compare_output(step, ref[:-1], ref).reason.startswith("shape mismatch")


def test_an_off_by_one_mask_fails():
    step = _step()
    shifted = build_step(
        "decoder",
        (5, 1),
        (0, 9),
        block_size=4,
        dtype=torch.float16,
        num_heads=4,
        num_kv_heads=2,
        seed=1,
        sliding_window=9,
    )
    ref = attention(*step.with_fresh_cache().args())
    wrong = attention(*shifted.with_fresh_cache().args())
    assert not compare_output(step, wrong.half(), ref).ok


def test_cache_checks_are_bitwise_and_see_nan_slots():
    step = _step()
    a = step.with_fresh_cache()
    attention(*a.args())
    b = tuple(c.clone() for c in a.kv_cache)
    assert compare_caches(b, a.kv_cache) == ""
    b[0].view(-1)[b[0].numel() - 1] = 0.0  # an unwritten (NaN) slot overwritten
    assert compare_caches(b, a.kv_cache).startswith("cache corruption: key_cache")
    assert FLOOR[torch.float32] < 1e-4  # a TF32 kernel (~1e-3) could not pass
