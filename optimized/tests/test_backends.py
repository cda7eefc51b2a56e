"""Backends on what the matrix does not vary: non-finite padding rows in every kind, the same
error for bad input everywhere, and a reason where a backend cannot run. (Each backend against
the reference on every kind, phase and layout is the smoke tier's job.)"""

import math

import pytest
import torch

from conformance import runner
from conformance.workloads import build_step
from optimized.backend import backend_names, get_backend

CUDA = torch.cuda.is_available()

PADDED = [
    ("encoder", (), None, (3, 5)),
    ("decoder", (3, 1), (0, 6), None),
    ("encoder_decoder", (2, 1), (0, 4), (5, 9)),
]


@pytest.mark.parametrize("kind,q,c,e", PADDED, ids=[p[0] for p in PADDED])
@pytest.mark.parametrize("backend_name", [n for n in backend_names() if n != "reference"])
def test_nan_and_inf_in_padding_rows_never_reach_a_real_row(backend_name, kind, q, c, e):
    """Padding rows (past the last real token) hold NaN in query and value and Inf in key: the
    spec ignores them, so every real output row must still be right."""
    step = build_step(kind, q, c, e, num_padding_tokens=2, block_size=4, num_heads=4,
                      num_kv_heads=2, head_size=32, seed=0)  # fmt: skip
    pad = slice(step.query.shape[0] - 2, None)
    assert step.query[pad].isnan().all()
    if step.key is not None:
        assert step.key[-2:].isinf().all() and step.value[-2:].isnan().all()
    backend = get_backend(backend_name)
    device = backend.device()
    exp = runner.expect_step(step.with_fresh_cache())
    mine = step.to(device, copy=True)
    if backend.capabilities.finite_unowned_slots:  # as the runner gives it (flex)
        runner.poison_finite(mine)
    after = runner.ExpectedCaches(mine).advance(exp)
    verdict = runner.judge_step(backend, mine, step, exp, after, device, timeout_s=600)
    if verdict.status == "skip":
        pytest.skip(verdict.reason)
    assert verdict.status == "pass", verdict.reason
    assert math.isfinite(verdict.comparison.max_abs_err)


@pytest.mark.parametrize("backend_name", ["triton", "torch", "reference"])
def test_bad_input_gives_the_same_error_everywhere(backend_name):
    step = build_step("decoder", (3, 1), (0, 5), block_size=4)
    backend = get_backend(backend_name)
    if backend.unavailable_reason():
        pytest.skip(backend.unavailable_reason())
    step = step.to(backend.device())
    md = step.metadata
    bad_tables = md.block_tables + 100
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"block_tables: entry \[0, 0\] = 10\d is outside"):
        backend.forward(
            step.query,
            step.key,
            step.value,
            step.kv_cache,
            replace(md, block_tables=bad_tables),
            step.attn_kind,
        )


def test_unavailable_backends_say_why():
    for name in ("xformers", "xformers-paged"):
        reason = get_backend(name).unavailable_reason()
        if not CUDA:
            assert reason and ("CUDA" in reason), reason
        else:  # with CUDA: available, or the reason names what is missing of xFormers
            assert reason is None or "xFormers" in reason, reason


ONE_HEAD_SHORT = [
    ("encoder", (), None, (3, 16, 9, 1)),  # packed K/V, sequences of at most 16 tokens
    ("decoder", (1, 1, 1, 1), (40, 447, 7, 130), None),  # paged decode, batch 4
    ("encoder_decoder", (1, 1), (0, 5), (1500, 33)),  # paged cross decode
]


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("kind,q,c,e", ONE_HEAD_SHORT, ids=[p[0] for p in ONE_HEAD_SHORT])
def test_one_head_short_steps_in_16_bits(kind, q, c, e, head_size):
    """MHA with 16-bit queries on a few short rows: one kv head a 16-row program, where on
    sm_90 the plan weighs the double-buffered launch (five stages) for paged decode and must
    not for packed K/V (there it needs 270 KB of shared memory at d128: the encoder of short
    sequences failed to launch on the H200 before the plan knew paged from packed)."""
    step = build_step(kind, q, c, e, block_size=16, num_heads=4, num_kv_heads=4, seed=3,
                      head_size=head_size, dtype=torch.bfloat16, layout="shuffled")  # fmt: skip
    backend = get_backend("triton")
    device = backend.device()
    exp = runner.expect_step(step.with_fresh_cache())
    mine = step.to(device, copy=True)
    after = runner.ExpectedCaches(mine).advance(exp)
    verdict = runner.judge_step(backend, mine, step, exp, after, device, timeout_s=600)
    assert verdict.status == "pass", verdict.reason
