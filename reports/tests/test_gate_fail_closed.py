"""The gate fails closed: exit 1 for every way a baseline pass can vanish, exit 2 (one line) for
every input it cannot judge, never a traceback and never a silent 0."""

import pandas as pd
import pytest

from conformance.schema import read_csv, write_csv
from reports import gate
from reports.tests.known import BENCH_KEY_VALUES, known_rows


@pytest.fixture
def files(tmp_path):
    results, base = tmp_path / "results.csv", tmp_path / "baseline.csv"
    write_csv(known_rows(), results)
    assert gate.main(["--results", str(results), "--baseline", str(base), "--write-baseline"]) == 0
    return results, base


def _gate(results, base, *extra) -> int:
    return gate.main(["--results", str(results), "--baseline", str(base), *extra])


def _rewrite(path, change) -> None:
    df = read_csv(path)
    change(df)
    df.to_csv(path, index=False)


def test_passes_turned_into_skips_are_regressions(files, capsys):
    """What the registry makes of a backend whose module no longer imports: every pass a skip."""
    results, base = files
    assert _gate(results, base) == 0

    def to_skip(df):
        mask = (df.backend == "triton") & (df.status == "pass")
        df.loc[mask, "status"] = "skip"
        df.loc[mask, "reason"] = "not supported: triton could not be imported: No module named x"

    _rewrite(results, to_skip)
    capsys.readouterr()
    assert _gate(results, base) == 1
    out = capsys.readouterr().out
    assert "regressions: 3" in out and "triton could not be imported" in out


def test_a_backend_absent_from_the_results_is_a_regression(files, capsys):
    results, base = files
    _rewrite(results, lambda df: df.drop(df[df.backend == "xformers"].index, inplace=True))
    assert _gate(results, base) == 1
    out = capsys.readouterr().out
    assert "backends missing: 1" in out and "the backend did not run at all" in out


@pytest.mark.parametrize("status", ["error", "fail", "skip"])
def test_a_pass_now_anything_else_is_a_regression(files, status):
    results, base = files
    df = read_csv(results)
    i = df.index[df.status == "pass"][0]
    df.loc[i, "status"] = status
    found = gate.compare(df, gate.load_baseline(str(base)))
    assert len(found["regressions"]) == 1


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda df: df.__setitem__("err_ratio", "abc"), "column err_ratio row 2: 'abc' is not"),
        (lambda df: df.__setitem__("status", "passed"), "status holds ['passed']"),
        (lambda df: df.drop(columns=["reason"], inplace=True), "missing columns ['reason']"),
        (lambda df: df.__setitem__("run_state", "interrupted"), "is from an interrupted run"),
        (lambda df: df.drop(columns=["run_state"], inplace=True), "has no run_state column"),
    ],
    ids=["non-numeric", "unknown-status", "missing-column", "interrupted", "older-file"],
)
def test_results_the_gate_cannot_judge_exit_2(files, capsys, change, message):
    results, base = files
    _rewrite(results, change)
    capsys.readouterr()
    assert _gate(results, base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --results") and message in err and "\n" not in err


def test_duplicate_rows_exit_2(files, capsys):
    results, base = files
    df = read_csv(results)
    pd.concat([df, df.iloc[[0]]]).to_csv(results, index=False)
    assert _gate(results, base) == 2
    assert "more than once" in capsys.readouterr().err


def test_bench_inputs_the_gate_cannot_judge_exit_2(files, tmp_path, capsys):
    results, base = files
    bench = tmp_path / "bench.csv"
    pd.DataFrame([{**BENCH_KEY_VALUES, "gbps": 2500.0}]).to_csv(bench, index=False)
    assert _gate(results, base, "--bench", str(bench), "--bench-baseline", str(bench)) == 0
    assert _gate(results, base, "--bench", str(bench)) == 2  # the check would silently not run
    assert "go together" in capsys.readouterr().err
    keyless = tmp_path / "keyless.csv"
    pd.DataFrame([{"gbps": 1.0}]).to_csv(keyless, index=False)
    assert _gate(results, base, "--bench", str(keyless), "--bench-baseline", str(bench)) == 2
    assert "missing key columns" in capsys.readouterr().err
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\x00\n\x01")
    assert _gate(results, base, "--bench", str(garbage), "--bench-baseline", str(bench)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --bench") and "\n" not in err


def test_a_malformed_baseline_exits_2(files, capsys):
    results, base = files
    df = pd.read_csv(base).astype({"err_ratio": object})
    df.loc[0, "err_ratio"] = "x"
    df.to_csv(base, index=False)
    assert _gate(results, base) == 2
    assert "--baseline" in capsys.readouterr().err


def test_an_interrupted_result_set_is_not_written_as_a_baseline(files, tmp_path):
    results, _ = files
    _rewrite(results, lambda df: df.__setitem__("run_state", "interrupted"))
    assert _gate(results, tmp_path / "b2.csv", "--write-baseline") == 2
    assert not (tmp_path / "b2.csv").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(err_ratio=5.0), "says pass but its err_ratio is over 1"),
        (dict(nan_count=3), "says pass but has non-finite outputs"),
        (dict(rms_ratio=9.0), "says pass but its rms_ratio is over the precision limit"),
        (dict(err_ratio=float("nan")), "says pass but was never compared"),
    ],
    ids=["err-ratio", "nan-count", "rms-ratio", "uncompared"],
)
def test_a_pass_whose_own_numbers_say_fail_is_refused(files, capsys, change, message):
    """A planted `pass` row with failing numbers: exit 2 from the gate (one line), refused by the
    report too, never 'passed · new: 1' or 'Failures and errors (0)'."""
    results, base = files
    df = read_csv(results)
    i = df.index[(df.status == "pass") & (df.dtype == "bfloat16")][0]
    for k, v in change.items():
        df.loc[i, k] = v
    df.loc[i, "case_id"] = "new-" + df.loc[i, "case_id"]  # new in the results
    df.to_csv(results, index=False)
    capsys.readouterr()
    assert _gate(results, base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    from reports.__main__ import main as reports_main

    assert reports_main(["render", str(results), "--out", str(results.parent / "r.html")]) == 2
    assert message in capsys.readouterr().err


def test_a_merge_never_launders_an_unknown_or_interrupted_run(files, tmp_path, capsys):
    """An older CSV without run_state merges as `unknown`; an interrupted run's results.jsonl
    merges as `interrupted` (its run.json says so): the gate refuses both."""
    from reports.merge import merge

    results, base = files
    older = tmp_path / "older.csv"
    df = read_csv(results).drop(columns=["run_state"])
    df.to_csv(older, index=False)
    merged = tmp_path / "m1.csv"
    merge([older], merged)
    assert set(read_csv(merged).run_state) == {"unknown"}
    capsys.readouterr()
    assert _gate(merged, base) == 2
    assert "run_state=unknown" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    rows = read_csv(results).to_dict("records")
    (run / "results.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    (run / "run.json").write_text('{"state": "interrupted"}')
    merge([run / "results.jsonl"], tmp_path / "m2.csv")
    assert set(read_csv(tmp_path / "m2.csv").run_state) == {"interrupted"}
    assert _gate(tmp_path / "m2.csv", base) == 2
    (run / "run.json").unlink()
    merge([run / "results.jsonl"], tmp_path / "m3.csv")
    assert set(read_csv(tmp_path / "m3.csv").run_state) == {"unknown"}


@pytest.mark.parametrize(
    "column,value,message",
    [("tier", "full", "different tier"), ("device", "NVIDIA H200", "different device")],
)
def test_results_of_another_tier_or_device_are_not_judged(files, capsys, column, value, message):
    """Full-tier results against the smoke baseline (or H200 results against a CPU one): exit 2
    with one line, not exit 1 with a table of thousands of disappeared and new rows."""
    results, base = files
    _rewrite(results, lambda df: df.__setitem__(column, value))
    capsys.readouterr()
    assert _gate(results, base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_baseline_without_tier_and_device_is_refused(files, capsys):
    results, base = files
    pd.read_csv(base).drop(columns=["tier", "device"]).to_csv(base, index=False)
    assert _gate(results, base) == 2
    assert "lacks columns ['tier', 'device']" in capsys.readouterr().err


def test_a_rerun_replaces_every_row_of_its_test_in_a_merge(files, tmp_path):
    """A cut-off run leaves a test as one `not run` row (step `missing`); its re-run's step rows
    replace that row, never sit beside it."""
    from reports.merge import merge

    results, _ = files
    df = read_csv(results)
    test = df[df.status == "pass"].iloc[0]
    cut = df[~((df.case_id == test.case_id) & (df.backend == test.backend))].copy()
    placeholder = test.copy()
    placeholder["step"], placeholder["status"] = "missing", "error"
    placeholder["reason"] = "not run: the run was interrupted before this test finished"
    placeholder["err_ratio"] = float("nan")
    cut = pd.concat([cut, placeholder.to_frame().T])
    cut.to_csv(tmp_path / "cut.csv", index=False)
    df[(df.case_id == test.case_id) & (df.backend == test.backend)].to_csv(
        tmp_path / "rerun.csv", index=False
    )
    merge([tmp_path / "cut.csv", tmp_path / "rerun.csv"], tmp_path / "m.csv")
    merged = read_csv(tmp_path / "m.csv")
    assert not merged.reason.str.startswith("not run").any()
    assert len(merged) == len(df)
