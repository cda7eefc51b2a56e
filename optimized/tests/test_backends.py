"""Each backend against the reference on focused steps per attention kind and phase.

Caches start as NaN, so a kernel that reads an unwritten or foreign slot fails loudly; after the
step the caches must equal the reference's bit for bit (written slots hold the tokens, every
other slot is still NaN). Backends that cannot run here are skipped with their reason.
"""

import pytest
import torch

from conformance import runner
from conformance.workloads import build_episode, build_step
from optimized.backend import get_backend

BACKENDS = ["triton", "triton-splitk", "torch", "xformers", "xformers-paged"]
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.bfloat16]

# (id, kind, query_lens, context_lens, encoder_seq_lens, extra build_step arguments)
STEPS = [
    ("enc-ragged", "encoder", (), None, (5, 1, 17), {}),
    ("enc-gqa4-d80", "encoder", (), None, (9, 3), dict(num_heads=8, num_kv_heads=2, head_size=80)),
    ("dec-prefill", "decoder", (7, 1, 16), None, None, dict(block_size=16)),
    ("dec-prefill-window", "decoder", (12, 5), None, None, dict(sliding_window=4, block_size=8)),
    ("dec-decode-bs1", "decoder", (1, 1, 1), (5, 16, 1), None, dict(block_size=1)),
    (
        "dec-decode-bs256-mqa",
        "decoder",
        (1, 1),
        (3, 40),
        None,
        dict(block_size=256, num_heads=4, num_kv_heads=1),
    ),
    ("dec-decode-bs64", "decoder", (1, 1), (63, 130), None, dict(block_size=64)),
    (
        "dec-chunked-shuffled",
        "decoder",
        (5, 3),
        (11, 16),
        None,
        dict(block_size=8, layout="shuffled"),
    ),
    (
        "dec-mixed-pad",
        "decoder",
        (6, 1, 1),
        (0, 9, 30),
        None,
        dict(block_size=16, num_padding_tokens=3, layout="nullblock"),
    ),
    (
        "dec-decode-window-frag",
        "decoder",
        (1, 1),
        (20, 37),
        None,
        dict(sliding_window=7, block_size=8, layout="fragmented"),
    ),
    (
        "dec-decode-shared",
        "decoder",
        (1, 1, 1),
        (33, 40, 35),
        None,
        dict(block_size=16, layout="shared"),
    ),
    (
        "cross-prefill-interleaved",
        "encoder_decoder",
        (3, 1),
        (0, 0),
        (10, 23),
        dict(block_size=16, layout="interleaved", num_padding_tokens=2),
    ),
    (
        "cross-decode-d80-gqa",
        "encoder_decoder",
        (1, 1),
        (4, 2),
        (70, 15),
        dict(block_size=64, num_heads=8, num_kv_heads=2, head_size=80),
    ),
    (
        "cross-decode-bs256",
        "encoder_decoder",
        (1, 1, 1),
        (1, 2, 3),
        (5, 31, 90),
        dict(block_size=256, layout="highest"),
    ),
    ("cross-mixed", "encoder_decoder", (4, 1), (0, 6), (12, 20), dict(block_size=8)),
]


def _run(backend_name, step):
    """The runner's judgement of one step (reasons, isolated forward, output, inputs, caches)."""
    backend = get_backend(backend_name)
    device = backend.device()
    exp = runner.expect_step(step.with_fresh_cache())
    mine = step.to(device, copy=True)
    after = runner.ExpectedCaches(step).advance(exp)
    verdict = runner.judge_step(backend, mine, step, exp, after, device, timeout_s=600)
    if verdict.status == "skip":
        pytest.skip(verdict.reason)
    assert verdict.status == "pass", verdict.reason
    return verdict.output


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", STEPS, ids=[s[0] for s in STEPS])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_matches_reference(backend_name, case, dtype):
    _, kind, q, c, e, extra = case
    args = dict(num_heads=4, num_kv_heads=2, head_size=64) | extra
    step = build_step(kind, q, c, e, dtype=dtype, seed=7, **args)
    _run(backend_name, step)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_episode_through_backend(backend_name):
    """Encoder → decoder prefill → 3 decodes, caches carried, one pool for self and cross."""
    dtype = torch.float16 if CUDA else torch.float32
    ep = build_episode(
        (9, 20),
        (3, 1),
        3,
        block_size=8,
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        dtype=dtype,
        seed=2,
    )
    backend = get_backend(backend_name)
    device = backend.device()
    mine, ref_ep = ep.to(device, copy=True), ep.with_fresh_cache()
    verdicts, pool = [], runner.ExpectedCaches(ep)
    for step, pristine, ref_step in zip(mine.steps, ep.steps, ref_ep.steps):
        exp = runner.expect_step(ref_step)
        after = pool.advance(exp)
        verdict = runner.judge_step(backend, step, pristine, exp, after, device, timeout_s=600)
        assert verdict.status in ("pass", "skip"), f"{step.attn_kind.value}: {verdict.reason}"
        if verdict.status == "skip":  # later steps still need what this one should have written
            runner._take_expected_cache(step, after)
        verdicts.append(verdict)
    if all(v.status == "skip" for v in verdicts):
        pytest.skip(verdicts[-1].reason)


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
