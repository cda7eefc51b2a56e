"""`mutate`: the project holds itself to its catalogue (the smoke tier catches every planted
fault, the position bias's included, on torch and on our Triton backends, run on the engine
with two workers); a fault's search stops at its first catch unless --all; a crash is that
test's error and the search goes on; a fault a selection cannot see survives and says so
(exit 1); the command writes its table, CSV and page."""

import csv
import json

from conformance.cases import Case, lower
from conformance.generate import generate
from conformance.mutants import FAULTS, Mutant, affects, run_catalogue, touches
from conformance.tests.cli import CASE, FAULTY, cli
from optimized.backend import get_backend

SMOKE = [lower(c) for c in generate("smoke")]


def _mutate_csv(out) -> list[dict]:
    return list(csv.DictReader((out / "mutate.csv").read_text().splitlines()))


def test_the_smoke_tier_catches_every_planted_fault_on_the_engine(tmp_path):
    r = cli("mutate", "--tier", "smoke", "-n", "2", "--backend", "torch", "--backend", "triton",
            "--backend", "triton-splitk", "--out", tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    rows = _mutate_csv(tmp_path)
    assert len(rows) == 3 * len(FAULTS)
    survivors = [(row["backend"], row["fault"]) for row in rows if row["caught"] != "True"]
    assert not survivors, f"the smoke tier misses {survivors}"
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["workers"] == 2 and info["dropped"] > 0  # searches cut at their first catch


def test_a_search_stops_at_its_first_catch_unless_all(tmp_path):
    """Cut: the fault's tests not yet started are never run (and never 'missing'); --all: every
    test it touches runs, and more rows fail."""
    argv = ("mutate", "--tier", "smoke", "-k", "decoder", "--backend", "torch", "--fault",
            "scale_ignored")  # fmt: skip
    first, every = tmp_path / "first", tmp_path / "all"
    assert cli(*argv, "--out", first).returncode == 0
    assert cli(*argv, "--all", "--out", every).returncode == 0
    (cut,), (whole,) = _mutate_csv(first), _mutate_csv(every)
    touched = [s for s in SMOKE if "decoder" in s.id and touches("scale_ignored", s)]
    assert int(cut["tests_run"]) == 1 and int(whole["tests_run"]) == len(touched)
    assert int(whole["failing_rows"]) > int(cut["failing_rows"])
    with open(first / "results.csv") as f:
        assert not [row for row in csv.DictReader(f) if row["status"] == "error"]


def test_a_crash_is_that_tests_error_and_the_search_goes_on(tmp_path):
    """A backend that kills its process under a fault: the fault is caught (an error row), the
    engine replaces the worker and the other faults' searches finish."""
    crashes = "decoder-decode-ragged-bs8-h8kv2-d64-fp32-shuffled-s0"  # block size 8: it dies
    r = cli("mutate", "--case", crashes, "--case", CASE, "-n", "2", "--backend-module",
            f"{FAULTY}:KillsItsProcess", "--fault", "scale_ignored", "--fault", "wrong_kv_head",
            "--out", tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    rows = _mutate_csv(tmp_path)
    assert {row["fault"] for row in rows} == {"scale_ignored", "wrong_kv_head"}
    assert all(row["caught"] == "True" for row in rows), r.stdout[-2000:]
    with open(tmp_path / "results.csv") as f:
        assert any("crash" in row["reason"] for row in csv.DictReader(f))


def test_a_fault_the_selection_cannot_see_survives(tmp_path):
    """One decode case without a window cannot catch a window off by one: it is not even run
    for it, and the verdict says it survives (exit 1)."""
    shape = lower(Case.from_id(CASE))
    assert not affects("window_off_by_one", shape.build())
    assert not touches("window_off_by_one", shape)
    (v,) = run_catalogue([shape], get_backend("torch"), faults=["window_off_by_one"])
    assert not v.caught and v.tests_run == 0
    r = cli("mutate", "--case", CASE, "--backend", "torch", "--fault", "window_off_by_one",
            "--fault", "scale_ignored", "--out", tmp_path)  # fmt: skip
    assert r.returncode == 1 and "SURVIVES" in r.stdout
    assert "this selection catches 1 of 2 planted faults" in r.stdout
    assert {(row["fault"], row["caught"]) for row in _mutate_csv(tmp_path)} == {
        ("window_off_by_one", "False"), ("scale_ignored", "True")}  # fmt: skip
    assert "catches 1 of 2 planted faults" in (tmp_path / "index.html").read_text()


def test_what_a_fault_touches_is_read_from_the_shape_as_from_its_steps():
    """`touches` (from the fields, nothing built) agrees with `affects` on every built smoke
    step (bias on cross-attention: a T5 episode's cross steps, after its decoder's bias)."""
    from conformance.expected import steps_of

    for shape in SMOKE[::2]:
        steps = steps_of(shape.build())
        for fault in FAULTS:
            seen = any(s.metadata.position_bias != "none" for s in steps)
            built = any(affects(fault, s, seen) for s in steps)
            assert touches(fault, shape) == built, (fault, shape.id)


def test_a_mutant_is_its_backend_where_its_fault_does_not_apply():
    """On a step the fault does not touch, the mutant's rows are its backend's: every row of a
    correct backend passes."""
    from conformance import runner

    shape = lower(Case.from_id(CASE))  # no window, no fp8, no padding, no bias
    for fault in ("window_off_by_one", "fp8_scales_twice", "padding_slots_written",
                  "bias_direction_reversed", "bias_on_cross"):  # fmt: skip
        rows = runner.run_case(shape, Mutant(get_backend("torch"), fault))
        assert all(r["status"] == "pass" for r in rows), (fault, rows)


def test_bad_usage_is_one_line():
    mutate = ["mutate", "--case", CASE]
    torch_ = [*mutate, "--backend", "torch"]
    for argv, message in ((mutate, "give the backend"),
                          ([*torch_, "--fault", "nope"], "--fault: expected"),
                          ([*torch_, "-n", "x"], "-n: expected")):  # fmt: skip
        r = cli(*argv)
        assert r.returncode == 2 and message in r.stderr
