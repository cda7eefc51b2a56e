"""The generated matrix: validity by rule, stable ids, full pair coverage, shards."""

import pytest
import torch

from conformance.cases import AXES, PAIRWISE_SIZES, Case, build_inputs, invalid_reasons
from conformance.generate import (
    LONG_EDGE_CASES,
    TIERS,
    covered_pairs,
    generate,
    shard,
    valid_pairs,
)


@pytest.mark.parametrize("tier", ["smoke", "full"])
def test_tier_covers_every_valid_pair(tier):
    cases = generate(tier)
    axes = {k: v for k, v in AXES.items() if tier != "smoke" or k != "size"}
    if tier == "full":
        axes["size"] = PAIRWISE_SIZES
    fixed = {"size": "small"} if tier == "smoke" else {}
    missing = valid_pairs(axes, fixed) - covered_pairs(cases, axes)
    assert not missing, sorted(missing)[:10]


def test_smoke_holds_every_axis_value():
    cases = generate("smoke")
    for axis, values in AXES.items():
        if axis != "size":
            assert {getattr(c, axis) for c in cases} == set(values), axis


@pytest.mark.parametrize("tier", TIERS)
def test_tiers_are_valid_deterministic_and_unique(tier):
    a, b = generate(tier), generate(tier)
    assert [c.id for c in a] == [c.id for c in b]
    assert len({c.id for c in a}) == len(a)
    assert all(not invalid_reasons(c) for c in a)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter's split rule (CPU); the GPU picks by occupancy",
)
def test_smoke_reaches_long_sequences_and_16_and_32_splits():
    """The CPU tier takes the paths the GPU takes: > 128 blocks in one sequence, and split-K with
    16 and 32 splits under the interpreter (its launch model assumes 4 SMs)."""
    from optimized.ops.paged_attention import plan_attention
    from optimized.triton_backend import _schedule

    smoke = {c.id for c in generate("smoke")}
    splits, most_blocks = [], 0
    for edge in LONG_EDGE_CASES:
        case = Case(**edge)
        assert case.id in smoke
        step = build_inputs(case)
        md, kind = step.metadata, step.attn_kind
        kv_lens = md.kv_lens_for(kind)
        most_blocks = max(most_blocks, max(-(-n // case.block_size) for n in kv_lens))
        schedule = _schedule(step.query, step.key, step.kv_cache, md, kind)
        plan = plan_attention(step.query, *step.kv_cache, md.tables_for(kind)[0], schedule,
                              causal=kind == "decoder")  # fmt: skip
        splits.append(plan.num_splits)
    assert most_blocks > 128
    assert {16, 32} <= set(splits), splits


def test_invalid_combinations_are_excluded_by_rule():
    assert invalid_reasons(dict(kind="encoder", phase="decode"))
    assert invalid_reasons(dict(kind="cross", window="on"))
    assert invalid_reasons(dict(kind="decoder", batch="enc_longer"))
    assert not invalid_reasons(dict(kind="decoder", phase="chunked", window="on"))


def test_id_round_trips_and_names_every_axis():
    for c in generate("smoke") + generate("full")[::50]:
        assert Case.from_id(c.id) == c
    c = Case("cross", "decode", "ragged", 16, "h8kv2", 80, "bfloat16", "shuffled", seed=3)
    assert c.id == "cross-decode-ragged-bs16-h8kv2-d80-bf16-shuffled-s3"
    with pytest.raises(ValueError, match="not a case id"):
        Case.from_id("cross-decode-nope")


def test_from_dict_rejects_unknown_axes_and_invalid_combinations():
    base = dict(
        kind="decoder",
        phase="decode",
        batch="ragged",
        block_size=16,
        heads="h8kv2",
        head_size=64,
        dtype="float16",
        layout="shuffled",
    )
    assert Case.from_dict(base).kind == "decoder"
    with pytest.raises(ValueError, match="unknown case axes"):
        Case.from_dict({**base, "colour": "red"})
    with pytest.raises(ValueError, match="invalid case"):
        Case.from_dict({**base, "kind": "encoder"})


def test_shards_partition_the_tier():
    cases = generate("smoke")
    parts = [shard(cases, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cases)
    assert shard(cases, "2/3") == parts[1]
    with pytest.raises(ValueError, match="--shard"):
        shard(cases, "4/3")


def test_ragged_batch_has_the_block_edges():
    c = Case("decoder", "prefill", "ragged", 16, "h4kv4", 64, "float32", "contiguous")
    assert build_inputs(c).metadata.query_lens == (1, 15, 16, 17, 54)
