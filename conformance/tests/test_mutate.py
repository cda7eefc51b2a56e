"""`mutate`: the project holds itself to its catalogue (the smoke tier catches every planted
fault on torch and on our Triton backends); a fault a selection cannot see survives and says
so (exit 1); the command writes its table, CSV and page."""

import csv

import pytest

from conformance.cases import Case, lower
from conformance.generate import generate
from conformance.mutants import FAULTS, Mutant, affects, run_catalogue
from conformance.tests.cli import CASE, cli
from optimized.backend import get_backend

SMOKE = [lower(c) for c in generate("smoke")]


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-splitk"])
def test_the_smoke_tier_catches_every_planted_fault(backend):
    verdicts = run_catalogue(SMOKE, get_backend(backend))
    assert [v.fault for v in verdicts] == list(FAULTS)
    survivors = [v.fault for v in verdicts if not v.caught]
    assert not survivors, f"the smoke tier misses {survivors} on {backend}"


def test_a_fault_the_selection_cannot_see_survives(tmp_path):
    """One decode case without a window cannot catch a window off by one: it is not even run
    for it, and the verdict says it survives (exit 1)."""
    shape = lower(Case.from_id(CASE))
    assert not affects("window_off_by_one", shape.build())
    (v,) = run_catalogue([shape], get_backend("torch"), faults=["window_off_by_one"])
    assert not v.caught and v.tests_run == 0
    r = cli("mutate", "--case", CASE, "--backend", "torch", "--fault", "window_off_by_one",
            "--fault", "scale_ignored", "--out", tmp_path)  # fmt: skip
    assert r.returncode == 1 and "SURVIVES" in r.stdout
    assert "this selection catches 1 of 2 planted faults" in r.stdout
    rows = list(csv.DictReader((tmp_path / "mutate.csv").read_text().splitlines()))
    assert {(row["fault"], row["caught"]) for row in rows} == {
        ("window_off_by_one", "False"), ("scale_ignored", "True")}  # fmt: skip
    assert "catches 1 of 2 planted faults" in (tmp_path / "index.html").read_text()


def test_a_mutant_is_its_backend_where_its_fault_does_not_apply():
    """On a step the fault does not touch, the mutant's rows are its backend's: every row of a
    correct backend passes."""
    from conformance import runner

    shape = lower(Case.from_id(CASE))  # no window, no fp8, no padding
    for fault in ("window_off_by_one", "fp8_scales_twice", "padding_slots_written"):
        rows = runner.run_case(shape, Mutant(get_backend("torch"), fault))
        assert all(r["status"] == "pass" for r in rows), (fault, rows)


def test_bad_usage_is_one_line():
    for argv, message in ((["mutate", "--case", CASE], "give the backend"),
                          (["mutate", "--case", CASE, "--backend", "torch", "--fault", "nope"],
                           "--fault: expected one of")):  # fmt: skip
        r = cli(*argv)
        assert r.returncode == 2 and message in r.stderr
