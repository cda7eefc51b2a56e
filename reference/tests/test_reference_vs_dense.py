"""The reference against an independent dense computation, over random steps (hypothesis)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.workloads import Layout, build_step
from reference import AttnKind, attention
from reference.tests.dense import dense_attention

HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]  # MHA, GQA 2:1, MQA, GQA 2:1 with 3 kv heads


@st.composite
def steps(draw):
    kind = draw(st.sampled_from(list(AttnKind)))
    num_seqs = draw(st.integers(1, 4))
    phase = draw(st.sampled_from(["prefill", "decode", "chunked", "mixed"]))
    max_len = 40
    if phase == "prefill":
        q = [draw(st.integers(1, max_len)) for _ in range(num_seqs)]
        c = [0] * num_seqs
    elif phase == "decode":
        q = [1] * num_seqs
        c = [draw(st.integers(1, max_len)) for _ in range(num_seqs)]
    elif phase == "chunked":
        q = [draw(st.integers(1, 12)) for _ in range(num_seqs)]
        c = [draw(st.integers(1, max_len)) for _ in range(num_seqs)]
    else:  # prefill sequences first, then decodes
        n_pre = draw(st.integers(1, num_seqs))
        q = [draw(st.integers(1, 12)) for _ in range(n_pre)] + [1] * (num_seqs - n_pre)
        c = [draw(st.integers(0, 20)) for _ in range(n_pre)] + [
            draw(st.integers(1, max_len)) for _ in range(num_seqs - n_pre)
        ]
    enc = [draw(st.integers(1, max_len)) for _ in range(num_seqs)]
    kv_max = max(e for e in enc) if kind != AttnKind.DECODER else max(a + b for a, b in zip(q, c))
    block_size = draw(st.sampled_from([1, 8, 16, 32, kv_max + 5]))
    h, kvh = draw(st.sampled_from(HEADS))
    return build_step(
        kind,
        tuple(q),
        tuple(c),
        tuple(enc),
        block_size=block_size,
        num_heads=h,
        num_kv_heads=kvh,
        head_size=draw(st.sampled_from([8, 16])),
        layout=draw(st.sampled_from(list(Layout))),
        sliding_window=draw(st.sampled_from([None, None, 1, 5])),
        scale=draw(st.sampled_from([None, 0.3])),
        num_padding_tokens=draw(st.sampled_from([0, 0, 2])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_reference_matches_dense(step):
    out = attention(*step.args())
    expected = dense_attention(step)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all(), "the reference read a NaN slot"
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_dense_check_notices_a_wrong_mask():
    """Guard: the dense check is sensitive (an off-by-one window changes the answer)."""
    step = build_step("decoder", (5,), (3,), block_size=4, sliding_window=3, seed=1)
    shifted = build_step("decoder", (5,), (3,), block_size=4, sliding_window=4, seed=1)
    assert not torch.allclose(attention(*step.args()), dense_attention(shifted))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_materialize_matches_the_rule(step):
    from reference.tests.dense import mask_by_rule

    assert torch.equal(step.metadata.materialize(step.attn_kind), mask_by_rule(step))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_heads_in_chunks_give_the_same_answer(step):
    """Long sequences process kv heads in chunks (SCORES_BYTES): one head at a time must match."""
    import importlib

    ref_attention = importlib.import_module("reference.attention")  # the package re-exports

    old = ref_attention.SCORES_BYTES
    ref_attention.SCORES_BYTES = 1  # every chunk is one kv head
    try:
        chunked = attention(*step.with_fresh_cache().args())
    finally:
        ref_attention.SCORES_BYTES = old
    torch.testing.assert_close(chunked, dense_attention(step), rtol=1e-10, atol=1e-10)
