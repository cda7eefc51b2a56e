"""The comparison: what passes, what fails, and why."""

import math

import pytest
import torch

from conformance.compare import compare_caches, compare_output
from conformance.tolerance import baseline_attention
from conformance.workloads import build_step
from reference import attention


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


def test_out_of_memory_is_retried_then_reported(monkeypatch):
    """Workers sharing a GPU: an OOM is retried after freeing memory; a lasting one propagates
    (run_case turns it into an `error` row, which the engine runs again alone); other errors
    are never retried."""
    from conformance import runner

    monkeypatch.setattr(runner, "OOM_RETRY_WAITS_S", (0.0, 0.0))
    monkeypatch.setattr(runner, "_recover", lambda device: None)
    cuda = torch.device("cuda")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return "ok"

    assert runner.retry_on_oom(flaky, cuda) == "ok" and len(calls) == 3

    def always_oom():
        raise RuntimeError("Triton Error [CUDA]: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        runner.retry_on_oom(always_oom, cuda)
    calls.clear()

    def other():
        calls.append(1)
        raise RuntimeError("an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal"):
        runner.retry_on_oom(other, cuda)
    assert len(calls) == 1
