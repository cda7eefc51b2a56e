"""Fail closed: every fault a backend (or the reference) can show ends as `error` or `fail`,
never `pass` or `skip`, and one backend's fault is never charged to another."""

import pytest
import torch

from conformance import runner
from conformance.cases import Case
from conformance.tests import faulty
from optimized.backend import get_backend

CASE = Case.from_id("decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0")
EPISODE = Case.from_id("episode-episode-encshorter-bs16-h8kv2-d64-fp16-interleaved-s0")

# fault -> (status every step row must have, text its reason must hold)
FAULTS = {
    faulty.Raises: ("error", "runtime error: RuntimeError: simulated kernel failure"),
    faulty.Exits: ("error", "SystemExit"),
    faulty.ExitsInReasons: ("error", "not_supported_reasons() raised: runtime error: SystemExit"),
    faulty.RaisesInReasons: ("error", "not_supported_reasons() raised"),
    faulty.RaisesInUnavailable: ("error", "unavailable_reason() raised"),
    faulty.RaisesInDevice: ("error", "device() raised"),
    faulty.ReturnsNone: ("error", "forward returned NoneType, expected a tensor"),
    faulty.NaNOutput: ("fail", "NaN/Inf: 1 non-finite outputs"),
    faulty.MutatesInputs: ("fail", "backend modified its inputs: query"),
    faulty.StrayCacheWrite: ("fail", "cache corruption: key_cache differs in 1 slot"),
    faulty.ReadsUnwrittenSlots: ("fail", "numerical mismatch: max_abs_err 1 >"),
}


def _step_rows(rows):
    return [r for r in rows if r["step"] not in ("permuted", "rerun")]


@pytest.mark.parametrize("fault", list(FAULTS), ids=lambda f: f.name)
def test_each_fault_is_an_error_or_a_failure(fault):
    status, text = FAULTS[fault]
    rows = runner.run_case(CASE, fault(), timeout_s=30)
    assert rows and all(r["status"] in ("error", "fail") for r in rows)
    for r in _step_rows(rows):
        assert r["status"] == status and text in r["reason"], r["reason"]


@pytest.mark.parametrize(
    "fault,text",
    [
        (faulty.Hangs, "timeout: no result after 0.5 s"),
        (faulty.SwallowsTimeout, "timeout: no result after 0.5 s"),
        (faulty.SwallowsEverything, "the backend swallowed the timeout"),
    ],
    ids=["hangs", "except-Exception", "except-BaseException"],
)
def test_a_timeout_cannot_be_swallowed(fault, text, monkeypatch):
    monkeypatch.setenv("FAULT_SLEEP_S", "1.5")
    rows = runner.run_case(CASE, fault(), timeout_s=0.5)
    assert rows and all(r["status"] == "error" and text in r["reason"] for r in rows), rows


def test_an_input_mutation_is_not_charged_to_the_next_backend():
    """The mutating backend fails its own row; a correct backend after it on the same case
    (sharing the cached reference inputs) still passes."""
    bad = runner.run_case(CASE, faulty.MutatesInputs(), timeout_s=30)
    assert "backend modified its inputs" in bad[0]["reason"]
    good = runner.run_case(CASE, get_backend("torch"), timeout_s=30)
    assert all(r["status"] == "pass" for r in good), good


def test_a_fault_in_an_episode_step_does_not_cascade():
    """A stray write fails its step; the cache is reset to the reference's, so the episode's
    later steps are judged on their own."""
    rows = runner.run_case(EPISODE, faulty.StrayCacheWrite(), timeout_s=60)
    assert all(r["status"] == "fail" for r in rows if r["step"] != "0:encoder")
    rows = runner.run_case(EPISODE, get_backend("torch"), timeout_s=60)
    assert all(r["status"] == "pass" for r in rows)


def test_a_non_finite_reference_makes_every_row_an_error(monkeypatch):
    """A reference that produced NaN must never let anything pass (NaN > tol is False)."""

    from conformance import expected

    def broken_reference(*args, **kw):
        answers = batched(*args, **kw)
        for out, _ in answers:
            out.view(-1)[5] = float("nan")
        return answers

    batched = expected.batched_attention
    monkeypatch.setattr(expected, "batched_attention", broken_reference)
    runner.forget_cases()
    for backend in (get_backend("torch"), faulty.NaNOutput()):
        rows = _step_rows(runner.run_case(CASE, backend, timeout_s=30))
        assert rows and all(r["status"] == "error" for r in rows)
        assert all("reference produced 1 non-finite values" in r["reason"] for r in rows)


def test_a_random_output_fails_even_where_a_nan_would_have_hidden_it():
    from conformance.compare import compare_output
    from conformance.workloads import build_step
    from reference import attention

    step = build_step("decoder", (3, 1), (0, 5), block_size=4)
    ref = attention(*step.with_fresh_cache().args())
    wrong = torch.randn_like(ref).float() * 100
    assert compare_output(step, wrong, ref).status == "fail"
    ref_nan = ref.clone()
    ref_nan[0, 0, 0] = float("nan")
    assert compare_output(step, wrong, ref_nan).status == "error"


def test_a_low_precision_accumulator_fails_the_precision_class():
    """Running output and softmax sum kept in bf16: within the max-abs tolerance (err ÷ tol
    well below 1), caught by rms_ratio on a long K/V walk; our kernels and torch pass it."""
    case = Case("decoder", "decode", "few_long", 16, "h8kv1", 64, "bfloat16", "contiguous")
    case = Case(**{**case.__dict__, "size": "large"})
    (row,) = _step_rows(runner.run_case(case, faulty.LowPrecisionAccumulator(), timeout_s=300))
    assert row["status"] == "fail" and row["reason"].startswith("precision: RMS error")
    assert row["err_ratio"] < 0.5 and row["rms_ratio"] > 4
    for name in ("torch", "triton"):
        (good,) = _step_rows(runner.run_case(case, get_backend(name), timeout_s=600))
        assert good["status"] == "pass" and good["rms_ratio"] < 2.5, good


@pytest.mark.parametrize("which", [CASE, EPISODE], ids=["step", "episode"])
def test_expected_caches_replay_the_references_writes(which):
    """The runner keeps only each step's writes; replayed onto the pristine caches they give
    exactly (bitwise, NaN where unwritten) the caches the reference left after every step."""
    from conformance.cases import build_inputs
    from conformance.compare import compare_caches

    inputs = build_inputs(which)
    ref = inputs.with_fresh_cache()
    pool = runner.ExpectedCaches(inputs)
    steps = ref.steps if hasattr(ref, "steps") else (ref,)
    for step in steps:
        exp = runner.expect_step(step)
        after = pool.advance(exp)
        if step.kv_cache is not None:
            assert compare_caches(after, step.kv_cache) == ""
            slots = step.metadata.tables_for(step.attn_kind)[1]
            assert len(exp.writes[0]) == int((slots >= 0).sum())  # rows, not whole caches
