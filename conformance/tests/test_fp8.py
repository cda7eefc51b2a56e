"""fp8 KV caches in the matrix: the smoke tier holds fp8 rows for every kind x phase, both
formats and both scale schemes, and fails each planted fp8 fault; the prefill convention and
the one-ulp write rule are judged only as declared."""

import pytest
import torch

from conformance import runner
from conformance.cases import lower
from conformance.compare import compare_caches
from conformance.generate import generate
from conformance.tests.faulty import FP8Fault

SMOKE_FP8 = [c for c in generate("smoke") if c.kv_cache_dtype != "auto"]


def test_the_smoke_tier_has_fp8_rows_for_every_kind_phase_format_and_scheme():
    kinds = {(c.kind, c.phase) for c in SMOKE_FP8}
    assert kinds == {("decoder", p) for p in ("prefill", "decode", "mixed", "chunked")} | {
        ("cross", p) for p in ("prefill", "decode", "mixed", "chunked")
    } | {("episode", "episode")}
    assert {c.kv_cache_dtype for c in SMOKE_FP8} == {"fp8_e4m3", "fp8_e5m2"}
    assert {c.kv_scale for c in SMOKE_FP8} == {"tensor", "head"}
    per_head_gqa = [
        c for c in SMOKE_FP8 if c.kv_scale == "head" and 1 < c.num_kv_heads < c.num_heads
    ]
    assert len(per_head_gqa) >= 5  # where a scale indexed by query head shows
    ids = [c.id for c in SMOKE_FP8]
    assert all("-kv8e4m3" in i or "-kv8e5m2" in i for i in ids)
    assert any(i.endswith("-ph-s0") for i in ids)
    # scales are not 1, per-head ones differ, and per-tensor k scales saturate normal keys
    for c in SMOKE_FP8:
        s = lower(c)
        assert 1.0 not in s.k_scale + s.v_scale
        assert len(set(s.k_scale)) == len(s.k_scale) and len(set(s.v_scale)) == len(s.v_scale)
        if c.kv_scale == "tensor":
            assert (
                448 * s.k_scale[0] < 3
                if c.kv_cache_dtype == "fp8_e4m3"
                else 57344 * s.k_scale[0] < 3
            )


def _verdicts(backend, cases, until_fail: bool = False):
    statuses = []
    for c in cases:
        rows = runner.run_case(lower(c), backend, timeout_s=120, metamorphic=False, rerun=False)
        statuses += [(c.id, r["step"], r["status"], r["reason"]) for r in rows]
        if until_fail and any(r["status"] == "fail" for r in rows):
            break
    return statuses


def test_a_correct_fp8_backend_passes_every_fp8_smoke_row():
    rows = _verdicts(FP8Fault("none"), SMOKE_FP8)
    assert rows and all(st == "pass" for _, _, st, _ in rows), [r for r in rows if r[2] != "pass"]


@pytest.mark.parametrize("fault", ["no_clamp", "swaps_formats"])
def test_the_smoke_tier_fails_each_planted_fp8_fault(fault):
    """The cache write's faults (the read's: scales forgotten, applied twice, indexed by query
    head, are the catalogue's: test_mutate.py)."""
    cases = SMOKE_FP8
    if fault == "no_clamp":  # saturation lives in the per-tensor cases, e4m3 first
        cases = sorted(cases, key=lambda c: (c.kv_scale != "tensor", c.kv_cache_dtype))
    rows = _verdicts(FP8Fault(fault), cases, until_fail=True)
    assert all(st in ("pass", "fail") for _, _, st, _ in rows), rows
    failed = [r for r in rows if r[2] == "fail"]
    assert failed, f"{fault}: no smoke fp8 row failed"


def test_the_prefill_convention_is_judged_as_declared():
    """Attending over a prefill's K/V as given (vLLM V0) fails against the write-then-read
    reference, and passes once the backend declares it (the reference then reads the same)."""
    prefill = [c for c in SMOKE_FP8 if c.phase in ("prefill", "episode")]
    undeclared = _verdicts(FP8Fault("reads_inputs"), prefill)
    assert any(st == "fail" for _, _, st, _ in undeclared)
    declared = _verdicts(FP8Fault("reads_inputs", declares_reads_inputs=True), prefill)
    assert declared and all(st == "pass" for _, _, st, _ in declared), declared


def test_a_write_one_ulp_off_passes_only_where_declared_and_only_in_written_slots():
    codes = torch.tensor([[0x38, 0x3A], [0x40, 0xC1]], dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).reshape(2, 1, 1, 2)  # 2 slots, 1 head, d 2
    got = expected.view(torch.uint8).clone()
    got[1, 0, 0, 1] += 1  # slot 1: one ulp (same sign)
    got = got.view(torch.float8_e4m3fn)
    written = torch.tensor([1])
    pair = lambda t: (t, t.clone())
    assert "cache corruption" in compare_caches(pair(got), pair(expected), written, 0)
    assert compare_caches(pair(got), pair(expected), written, 1) == ""
    assert "slot 1" in compare_caches(pair(got), pair(expected), torch.tensor([0]), 1)
    two = got.view(torch.uint8).clone()
    two[1, 0, 0, 1] += 1  # now two ulps
    assert "cache corruption" in compare_caches(pair(two.view(torch.float8_e4m3fn)),
                                                pair(expected), written, 1)  # fmt: skip
