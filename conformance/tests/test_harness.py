"""The harness's own checks, each against a planted bug it must catch: the determinism check on
every device, the output dtype, non-finite tolerance inputs, the inputs-unchanged check over
every token of every tensor, every field of a preset or a shape reaching the built step, and
one id meaning one workload."""

import json
import math

import pytest
import torch

from conformance import runner
from conformance.cases import Case, lower, read_cases_file
from conformance.compare import compare_output
from conformance.models import MODELS
from conformance.shapes import Shape
from conformance.tests import faulty
from conformance.workloads import Episode, build_step
from optimized.backend import get_backend
from reference import attention

ENCODER = Case.from_id("encoder-prefill-ragged-bs16-h8kv1-d80-bf16-contiguous-s0")
DECODER = Case.from_id("decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0")


def _by_step(rows):
    return {r["step"]: r for r in rows}


def test_a_backend_wrong_from_its_second_call_fails_rerun_on_the_cpu():
    """No cache (the encoder): only the rerun can see it. With a cache, the permuted row says
    the cause is nondeterminism, not the block permutation."""
    rows = _by_step(runner.run_case(ENCODER, faulty.WrongFromItsSecondCall(), timeout_s=60))
    assert rows["0:encoder"]["status"] == "pass"
    assert rows["rerun"]["status"] == "fail" and "nondeterministic" in rows["rerun"]["reason"]
    rows = _by_step(runner.run_case(DECODER, faulty.WrongFromItsSecondCall(), timeout_s=60))
    assert rows["rerun"]["status"] == "fail"
    assert rows["permuted"]["status"] == "fail"
    assert "not deterministic either: see its rerun row" in rows["permuted"]["reason"]
    good = _by_step(runner.run_case(ENCODER, get_backend("torch"), timeout_s=60))
    assert good["rerun"]["status"] == "pass"


def test_an_upcast_output_fails_only_the_reference_may_return_float64():
    (row,) = [
        r
        for r in runner.run_case(ENCODER, faulty.Upcasts(), timeout_s=60)
        if r["step"] == "0:encoder"
    ]
    assert row["status"] == "fail" and "dtype mismatch: output torch.float64" in row["reason"]
    ref = _by_step(runner.run_case(ENCODER, get_backend("reference"), timeout_s=60))
    assert ref["0:encoder"]["status"] == "pass"


@pytest.mark.parametrize("baseline_err", [math.nan, math.inf, -math.inf])
def test_a_non_finite_tolerance_input_is_an_error_never_a_pass(baseline_err):
    step = build_step("decoder", (3, 1), (0, 5), block_size=4)
    ref = attention(*step.with_fresh_cache().args())
    comp = compare_output(step, ref.float(), ref, baseline_err=baseline_err)
    assert comp.status == "error" and "tolerance is" in comp.reason


MUTATIONS = [
    ("query", 0),
    ("query", -1),  # a padding row
    ("key", 0),
    ("key", -1),
    ("value", 0),
    ("value", -1),
    ("block_tables", 0),
    ("block_tables", -1),
    ("slot_mapping", 0),
    ("slot_mapping", -1),
]


@pytest.mark.parametrize("where,row", MUTATIONS, ids=[f"{w}[{r}]" for w, r in MUTATIONS])
def test_one_changed_element_of_any_input_fails(where, row):
    """A backend that changes one element of one input (its first or last row, padding
    included) after computing correctly fails 'modified its inputs'."""
    case = Case.from_id("decoder-decode-ragged-bs8-h4kv4-d64-fp32-nullblock-s0")  # 2 padding rows
    rows = runner.run_case(case, faulty.MutatesOne(where, row), timeout_s=60, rerun=False)
    step = next(r for r in rows if r["step"] == "0:decoder")
    assert step["status"] == "fail", step
    assert step["reason"] == f"backend modified its inputs: {where}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_field_of_a_model_preset_reaches_the_built_step(name):
    """Heads, kv heads, head size, dtype, scale (T5: 1.0) and window of every preset are what
    the built step holds, for every kind its cases have."""
    preset = MODELS[name]
    from conformance.generate import generate_for_models

    cases = generate_for_models("smoke", name)
    first = {}  # one case of each kind and phase: what varies is the lengths, not the fields
    for case in cases:
        first.setdefault((case.kind, case.phase, case.window), case)
    kinds = set()
    for case in first.values():
        inputs = lower(case).build()
        steps = inputs.steps if isinstance(inputs, Episode) else (inputs,)
        for step in steps:
            kinds.add(step.attn_kind.value)
            md = step.metadata
            assert step.query.shape[1:] == (preset.num_heads, preset.head_size)
            assert step.query.dtype == getattr(torch, preset.dtype)
            kv = step.key if step.key is not None else step.kv_cache[0]
            assert kv.shape[-2] == preset.num_kv_heads
            want = preset.scale if preset.scale is not None else preset.head_size**-0.5
            assert md.scale_for(preset.head_size) == want
            assert md.block_size == case.block_size
            if step.attn_kind.value == "decoder":
                assert md.sliding_window == case.window_size
    assert kinds == {"encoder", "decoder", "encoder_decoder"}


SHAPE = dict(attn_kind="decoder", query_lens=[3, 1], context_lens=[0, 9], num_heads=8,
             num_kv_heads=2, head_size=80, block_size=8, dtype="float16", layout="highest",
             sliding_window=5, scale=0.3, seed=4, padding_tokens=2)  # fmt: skip


def test_every_field_of_an_explicit_shape_reaches_the_built_step():
    step = Shape.from_dict(SHAPE).build()
    md = step.metadata
    assert (md.query_lens, md.context_lens) == ((3, 1), (0, 9))
    assert step.query.shape == (3 + 1 + 2, 8, 80) and step.query.dtype == torch.float16
    assert step.key.shape[1] == 2 and md.block_size == 8 and step.kv_cache[0].shape[1] == 8
    assert md.sliding_window == 5 and md.scale == 0.3
    assert step.query[-2:].isnan().all() and (md.slot_mapping[-2:] == -1).all()
    other = Shape.from_dict({**SHAPE, "seed": 5}).build()
    assert not torch.equal(other.query[:4], step.query[:4])
    ordered = Shape.from_dict({**SHAPE, "layout": "contiguous"}).build()
    assert not torch.equal(ordered.metadata.block_tables, md.block_tables)


def test_a_shape_named_like_a_preset_case_is_refused(tmp_path):
    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps({**SHAPE, "name": DECODER.id}) + "\n")
    with pytest.raises(ValueError, match="is the id of a preset case"):
        read_cases_file(f)
