"""Explicit shapes (`--cases FILE` rows with `attn_kind`): the shipped files load and build
valid steps; ids are stable and name the content; bad rows are one line naming the field
(exit 2); a shape's rows carry its id and file through the CSV, the re-run command, the
report, the gate and the rows of tests that never reported."""

import csv
import json
from pathlib import Path

import pytest

from conformance.cases import build_inputs, read_cases_file, select_cases
from conformance.results import finalize_run, start_run
from conformance.schema import rerun_command
from conformance.shapes import Shape
from conformance.tests.cli import FAULTY, ROOT, cli
from conformance.workloads import Episode
from reference.validation import check_inputs

SHIPPED = sorted((ROOT / "conformance" / "explicit").glob("*.jsonl"))
ODD = "conformance/explicit/odd_shapes.jsonl"


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_files_build_valid_steps(path):
    shapes = read_cases_file(path)
    assert len(shapes) >= 9 and all(isinstance(s, Shape) for s in shapes)
    for s in shapes:
        inputs = build_inputs(s)
        steps = inputs.steps if isinstance(inputs, Episode) else (inputs,)
        for step in steps:
            check_inputs(*step.args())  # the spec accepts every step
        if s.attn_kind != "episode":
            md = steps[0].metadata
            assert md.query_lens == (s.query_lens or md.query_lens)
            assert md.encoder_seq_lens == s.encoder_seq_lens
            assert steps[0].query.shape[1:] == (s.num_heads, s.head_size)


def test_the_vllm_file_holds_the_vllm_test_configurations():
    shapes = read_cases_file(ROOT / "conformance" / "explicit" / "vllm_encdec.jsonl")
    configs = {(s.num_heads, s.head_size, len(s.query_lens)) for s in shapes}
    assert configs == {(h, d, b) for h in (1, 16) for d in (64, 256) for b in (1, 16)}
    assert {s.phase for s in shapes} == {"episode", "decode"}
    assert all(s.block_size == 16 for s in shapes)
    lens = [n for s in shapes for n in s.query_lens + (s.encoder_seq_lens or ())]
    assert max(lens) <= 128 and min(lens) >= 1


def test_ids_are_stable_and_name_the_content():
    row = dict(attn_kind="decoder", query_lens=[1, 1], context_lens=[54, 97], num_heads=8,
               num_kv_heads=2, head_size=80, dtype="fp16")  # fmt: skip
    a, b = Shape.from_dict(row), Shape.from_dict(dict(row))
    assert a.id == b.id and a.id.startswith("shape~dec-b2-h8kv2-d80-bs16-fp16-contiguous-")
    assert Shape.from_dict({**row, "context_lens": [54, 98]}).id != a.id
    assert Shape.from_dict({**row, "name": "mine"}).id == "mine"
    assert Shape.from_dict(a.to_dict()) == a  # round trip (what run.json keeps)
    assert a.phase == "decode" and a.columns()["shape"] == a.id


BAD_ROWS = [
    ({"attn_kind": "cross"}, "attn_kind: expected one of"),
    ({"bogus": 1}, "unknown field(s) ['bogus']"),
    ({"query_lens": None}, "query_lens: required for attn_kind 'decoder'"),
    ({"num_kv_heads": 3}, "num_kv_heads: 3 does not divide num_heads 8"),
    ({"context_lens": [1, 2, 3]}, "lengths disagree on the number of sequences"),
    ({"query_lens": [1, 0]}, "query_lens[1]: expected an integer >= 1, got 0"),
    ({"query_lens": "5"}, "query_lens: expected a non-empty list"),
    ({"head_size": 64.5}, "head_size: expected an integer >= 1"),
    ({"dtype": "float8"}, "dtype: expected one of"),
    ({"layout": "diagonal"}, "layout: expected one of"),
    ({"encoder_seq_lens": [3, 4]}, "encoder_seq_lens: does not apply to attn_kind 'decoder'"),
    ({"scale": -1}, "scale: expected > 0"),
    ({"sliding_window": 0}, "sliding_window: expected an integer >= 1"),
    ({"name": "has space"}, "name: 'has space' must start with a letter"),
]


@pytest.mark.parametrize("change,message", BAD_ROWS, ids=[m.split(":")[0] for _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_the_field(tmp_path, change, message):
    good = dict(attn_kind="decoder", query_lens=[1, 1], context_lens=[5, 9], num_heads=8,
                num_kv_heads=2, head_size=64)  # fmt: skip
    row = {k: v for k, v in {**good, **change}.items() if v is not None}
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out"
    r = cli("run", "--cases", cases, "--out", out)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "line 2:" in r.stderr and message in r.stderr, r.stderr
    assert not (out / "results.csv").exists()


def test_duplicate_ids_and_unknown_case_are_usage_errors(tmp_path):
    row = json.dumps(dict(attn_kind="encoder", encoder_seq_lens=[3], num_heads=2, head_size=8))
    cases = tmp_path / "cases.jsonl"
    cases.write_text(row + "\n" + row + "\n")
    with pytest.raises(ValueError, match=r"line 2: id shape~enc-b1-.* is already on line 1"):
        read_cases_file(cases)
    with pytest.raises(ValueError, match="--case nope: no such case in --cases"):
        select_cases(["nope"], ODD)
    with pytest.raises(ValueError, match="explicit shape's id is resolved by its file"):
        select_cases(["odd-dec-mixed"], None)


def test_a_shape_runs_through_the_matrix_report_and_gate(tmp_path):
    out = tmp_path / "out"
    ids = ["odd-dec-decode-block-plus-one", "odd-cross-decode-enc-1-129"]
    args = ["run", "--cases", ODD, "--backend", "triton", "--backend", "torch"]
    picks = [a for i in ids for a in ("--case", i)]
    r = cli(*args, *picks, "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = _rows(out)
    assert {row["case_id"] for row in rows} == set(ids)
    assert all(row["status"] == "pass" for row in rows)
    assert {row["shape"] for row in rows} == set(ids) and {row["cases_file"] for row in rows} == {
        ODD
    }
    decode = next(r for r in rows if r["case_id"] == ids[0] and r["backend"] == "triton")
    assert (decode["attn_kind"], decode["phase"]) == ("decoder", "decode")
    assert decode["num_kv_heads"] == "1"
    cmd = rerun_command(decode)
    assert cmd == f"python -m conformance run --cases {ODD} --case {ids[0]} --backend triton"
    again = cli(*cmd.split()[3:], "--out", tmp_path / "again")
    assert again.returncode == 0 and len(_rows(tmp_path / "again")) == sum(
        r["case_id"] == ids[0] and r["backend"] == "triton" for r in rows
    )
    from reports.gate import main as gate
    from reports.html import write_report

    results, baseline = str(out / "results.csv"), str(tmp_path / "baseline.csv")
    assert gate(["--results", results, "--baseline", baseline, "--write-baseline"]) == 0
    assert gate(["--results", results, "--baseline", baseline]) == 0
    page = write_report([results], str(out / "report.html")).read_text()
    assert "Explicit shapes" in page
    assert "odd-cross-decode-enc-1-129 (encoder_decoder decode" in page


def test_tests_that_never_report_keep_their_shape(tmp_path):
    """The engine dies on block size 8: the shapes it never finished are error rows with their
    shape columns (the plan holds the shapes; no id alone can rebuild them)."""
    common = dict(attn_kind="decoder", query_lens=[1], context_lens=[9], num_heads=2, head_size=8)
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({**common, "block_size": b}) + "\n" for b in (16, 8, 32)))
    out = tmp_path / "out"
    r = cli("run", "--cases", cases, "--backend-module", f"{FAULTY}:KillsTheEngine", "--out", out)
    assert r.returncode == 1, r.stdout[-2000:]
    missing = [row for row in _rows(out) if row["step"] == "missing"]
    assert {row["block_size"] for row in missing} == {"8", "32"}
    assert all(row["shape"] == row["case_id"] for row in missing)
    assert all(row["cases_file"] == str(cases) for row in missing)


def test_finalize_rebuilds_planned_shapes(tmp_path):
    from conformance.engine import Plan, Test

    shape = read_cases_file(ODD)[0]
    plan = Plan((Test(shape, "triton"),), str(tmp_path), "")
    start_run(tmp_path, plan)
    counts = finalize_run(tmp_path, "interrupted", plan)
    assert counts["error"] == 1
    (row,) = _rows(tmp_path)
    assert (row["shape"], row["cases_file"], row["num_kv_heads"]) == (shape.id, ODD, "4")


def test_a_shape_no_machine_holds_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """`context_lens: [1e9]` is about 2 TB of cache: `--cases` refuses it (exit 2, naming the
    case, the bytes and the memory), nothing in --out is touched and nothing is allocated."""
    f = tmp_path / "huge.jsonl"
    f.write_text(json.dumps(dict(attn_kind="decoder", query_lens=[1], context_lens=[10**9],
                                 num_heads=8, head_size=64, name="huge")) + "\n")  # fmt: skip
    monkeypatch.setattr("conformance.shapes.build_step", _never_built)
    for argv in (["run", "--cases", f, "--out", tmp_path / "o"], ["dump", "huge", "--cases", f,
                 "--out", tmp_path / "d"], ["list", "--cases", f]):  # fmt: skip
        r = cli(*argv)
        if argv[0] == "list":  # listing builds nothing: the shape is shown with its id
            assert r.returncode == 0 and "huge" in r.stdout
            continue
        assert r.returncode == 2, (argv, r.stderr[-800:])
        line = r.stderr.strip()
        assert "case huge needs about" in line and "bytes" in line and "host RAM is" in line
    r = cli("--cases", f, module="bench")
    assert r.returncode == 2 and "case huge needs about" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_a_generated_case_too_large_for_the_machine_is_a_skip_with_its_reason(monkeypatch):
    """Every step of it a skip naming the bytes, and nothing built (the runner asks first)."""
    from conformance import runner
    from conformance.cases import Case, lower
    from conformance.memory import device_bytes
    from optimized.backend import get_backend

    case = lower(Case.from_id("episode-episode-ragged-bs16-h8kv2-d64-fp16-interleaved-s0"))
    monkeypatch.setattr(runner, "machine_memory", lambda: [("host RAM", case.footprint())])
    monkeypatch.setattr(runner, "case_run", _never_built)
    rows = runner.run_case(case, get_backend("torch"))
    assert [r["step"] for r in rows] == [f"{i}:{k}" for i, k in enumerate(case.step_kinds())]
    assert len(rows) == 1 + 2 * (case.decode_steps + 1)
    assert all(r["status"] == "skip" and "too large for this machine" in r["reason"] for r in rows)
    enough = case.footprint() + device_bytes(case)  # built on the host, and run there
    monkeypatch.setattr(runner, "machine_memory", lambda: [("host RAM", enough)])
    assert runner.memory_problem(case) == ""
    monkeypatch.setattr(runner, "machine_memory", lambda: [("host RAM", enough - 1)])
    assert runner.memory_problem(case) != ""
    gpu = [("host RAM", case.footprint()), ("GPU memory", device_bytes(case))]
    monkeypatch.setattr(runner, "machine_memory", lambda: gpu)  # run on the GPU
    assert runner.memory_problem(case) == ""


def test_the_footprint_estimate_is_what_build_allocates():
    """Within 0.9-1.6x of the bytes a built step holds (cross decode counts encoder K/V it no
    longer gets), for each kind, layout and cache dtype of a sample of the smoke tier."""
    from conformance.cases import lower
    from conformance.generate import generate
    from conformance.workloads import Episode

    for case in generate("smoke")[::9]:
        shape = lower(case)
        built = shape.build()
        steps = built.steps if isinstance(built, Episode) else (built,)
        storages = {}
        for s in steps:
            for t in (s.query, s.key, s.value, *(s.kv_cache or ()), *s.key_history,
                      *s.value_history):  # fmt: skip
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        ratio = shape.footprint() / sum(storages.values())
        assert 0.9 <= ratio <= 1.6, (case.id, ratio)


def _never_built(*args, **kwargs):
    raise AssertionError("a case that does not fit was built")
