"""T5's relative position bias, the spec: the bucket function against buckets worked out by hand
from Hugging Face's definition, its boundaries, the lookup table kernels use (exact however far
a key is), where the bias lands in the scores, and every validation rule."""

import math

import pytest
import torch

from conformance.workloads import PositionBias, build_step
from reference.attention import attention
from reference.position_bias import bias, lookup_table, relative_position_bucket
from reference.validation import check_inputs

# key position - query position -> bucket, 32 buckets up to 128 (the module docstring's example)
BIDIRECTIONAL = {0: 0, -1: 1, 1: 17, -7: 7, 7: 23, -8: 8, 8: 24, -12: 9, -16: 10, 16: 26,
                 -100: 15, 100: 31, 1000: 31, -1000: 15}  # fmt: skip
UNIDIRECTIONAL = {0: 0, 3: 0, -1: 1, -15: 15, -16: 16, -20: 17, -64: 26, -127: 31, -1000: 31}


@pytest.mark.parametrize(
    "bidirectional,known", [(True, BIDIRECTIONAL), (False, UNIDIRECTIONAL)], ids=["enc", "dec"]
)
def test_buckets_are_the_models(bidirectional, known):
    rel = torch.tensor(list(known))
    assert relative_position_bucket(rel, bidirectional, 32, 128).tolist() == list(known.values())


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16), (16, 32), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_shape_and_the_lookup_table_is_exact_however_far(buckets, distance, bidirectional):
    """Buckets never decrease with distance on a side, stay in range, the nearest distances get a
    bucket each; the kernels' table (clamped at max_distance + 1) gives every distance's bias."""
    rel = torch.arange(-20 * distance, 20 * distance + 1)
    b = relative_position_bucket(rel, bidirectional, buckets, distance)
    assert b.min() >= 0 and b.max() < buckets
    left = b[rel <= 0].flip(0)  # by growing distance to the left
    assert (left[1:] >= left[:-1]).all() and left[0] == 0
    exact = buckets // 4 if bidirectional else buckets // 2
    assert left[:exact].tolist() == list(range(exact))
    table = torch.randn(buckets, 3)  # a model dtype: float32 holds it exactly
    lut, reach = lookup_table(table, bidirectional, buckets, distance)
    direct = bias(table, torch.zeros(1, dtype=torch.long), rel, bidirectional, buckets, distance)
    assert torch.equal(lut[:, rel.clamp(-reach, reach) + reach].double(), direct[:, 0])


def test_the_bias_is_added_to_the_scaled_scores_by_absolute_position():
    """One decoder query at position 9 over 10 keys: its output is textbook attention with the
    table's entry for each key's bucket added to the scaled scores, per head."""
    gen = PositionBias("t5", 8, 16)
    step = build_step("decoder", (1,), (9,), num_heads=2, head_size=4, position_bias=gen)
    md = step.metadata
    out = attention(*step.with_fresh_cache().args())
    q, k, v = step.query.double()[0], step.key_history[0].double(), step.value_history[0].double()
    for h in range(2):
        scores = k[:, h] @ q[h] * md.scale_for(4)
        for j in range(10):
            bucket = relative_position_bucket(torch.tensor(j - 9), False, 8, 16)
            scores[j] += md.relative_attention_bias[bucket, h].double()
        want = torch.softmax(scores, 0) @ v[:, h]
        assert torch.allclose(out[0, h], want, atol=1e-12), h


def _bias_step(kind="decoder", **change):
    q = (3,) if kind != "encoder" else None
    step = build_step(kind, q or (1,), None if kind == "encoder" else (0,),
                      (5,) if kind != "decoder" else None, num_heads=4, head_size=8,
                      position_bias=PositionBias("t5"))  # fmt: skip
    from dataclasses import replace

    return replace(step, metadata=replace(step.metadata, **change))


@pytest.mark.parametrize(
    "kind,change,message",
    [
        ("decoder", dict(position_bias="alibi"), "position_bias: expected one of"),
        ("decoder", dict(relative_attention_bias=torch.zeros(32, 3)), "relative_attention_bias"),
        ("decoder", dict(relative_attention_bias=torch.zeros(32, 4, dtype=torch.float64)),
         "expected dtype torch.float32"),
        ("decoder", dict(relative_attention_bias=torch.full((32, 4), math.nan)), "non-finite"),
        ("encoder", dict(relative_attention_num_buckets=3), "3 leaves no exact bucket"),
        ("decoder", dict(relative_attention_num_buckets=32, relative_attention_max_distance=16),
         "16 is not beyond the 16 exact buckets of 32"),
        ("decoder", dict(relative_attention_num_buckets=1), "int >= 2"),
        ("decoder", dict(position_bias="none"), "is for position_bias t5 only"),
    ],
    ids=["kind", "shape", "dtype", "nan", "no-exact", "distance", "buckets", "stray-table"],
)  # fmt: skip
def test_bad_bias_input_is_one_error_naming_it(kind, change, message):
    step = _bias_step(kind, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_inputs(*step.args())


def test_the_bias_on_a_cross_step_is_refused():
    from dataclasses import replace

    step = build_step("encoder_decoder", (2,), (0,), (5,), num_heads=4, head_size=8)
    md = replace(step.metadata, position_bias="t5", relative_attention_bias=torch.zeros(32, 4))
    with pytest.raises(ValueError, match="position_bias: t5 applies to encoder and decoder self"):
        check_inputs(*replace(step, metadata=md).args())


CONFIGS = [
    (b, d)
    for b in (2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 32, 33)
    for d in (1, 2, 3, 4, 5, 8, 15, 16, 17, 128)
]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_every_configuration_hugging_face_computes_is_accepted_and_only_those(bidirectional):
    """A table of HF's behaviour (reference/tests/hf.py, its function written again in NumPy):
    odd and small tables, max distances at and around the exact buckets. Where HF computes, the
    spec accepts it and its buckets are HF's on every position; where HF cannot, one error."""
    from reference.position_bias import config_problem, relative_position_bucket
    from reference.tests.hf import hf_bucket, hf_computes

    for buckets, distance in CONFIGS:
        ok = hf_computes(buckets, distance, bidirectional)
        problem = config_problem(buckets, distance, bidirectional)
        assert (problem == "") == ok, (buckets, distance, problem)
        if ok:
            rel = torch.arange(-3000, 3001)
            ours = relative_position_bucket(rel, bidirectional, buckets, distance)
            theirs = hf_bucket(rel.numpy(), bidirectional, buckets, distance)
            assert (ours.numpy() == theirs).all(), (buckets, distance)
        else:
            assert problem.startswith(("relative_attention_num_buckets: ",
                                       "relative_attention_max_distance: "))  # fmt: skip
    # the two the issue names: an odd encoder table, 32 buckets up to 16 in the encoder
    assert config_problem(31, 128, True) == "" and config_problem(32, 16, True) == ""
