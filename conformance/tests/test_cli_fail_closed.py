"""The command line fails closed: bad usage is one line and exit 2 with the last results
untouched; Ctrl-C / SIGTERM keep a result set marked interrupted (130 / 143); an engine that
dies without workers still leaves results.csv with the tests it never finished as errors."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conformance.tests.test_cli import ROOT, _cli, _env

CASE = "decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0"
FAULTY = "conformance.tests.faulty"


def _table(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def last_run(tmp_path):
    """An --out directory holding a previous run's results."""
    out = tmp_path / "out"
    r = _cli("run", "--case", CASE, "--backend", "torch", "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend-module", "no_colon"], "--backend-module: expected 'package.module:ClassName'"),
        (["--backend-module", "no_such_mod:X"], "ModuleNotFoundError"),
        (["--backend-module", f"{FAULTY}:Nope"], "has no attribute 'Nope'"),
        (["-k", "torch and ("], "-k: not a valid expression"),
        (["-k", "no_such_thing"], "no cases selected"),
        (["--case-timeout", "-1"], "--case-timeout: expected seconds > 0"),
        (["--case-timeout", "0"], "--case-timeout: expected seconds > 0"),
        (["--shard", "7/5"], "--shard: expected i/n"),
        (["-n", "many"], "-n: expected 'auto' or a number"),
        (["--gpus", "0"] if not torch.cuda.is_available() else ["--gpus", "99"], "--gpus: "),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-class",
        "k-syntax",
        "k-nothing",
        "timeout-neg",
        "timeout-0",
        "shard",
        "workers",
        "gpus",
    ],
)
def test_bad_usage_is_one_line_and_keeps_the_last_results(last_run, tmp_path, args, message):
    out, before = last_run
    r = _cli(
        "run", "--case", CASE, "--backend", "torch", "--out", str(out), *args, tmp_path=tmp_path
    )
    assert r.returncode == 2, (r.stdout[-1500:], r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_empty_cases_file_and_bad_out(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for args, message in (
        (["--cases", str(empty)], "no cases selected"),
        (["--case", CASE, "--out", str(a_file)], "exists and is not a directory"),
        (["--case", CASE, "--out", str(a_file / "sub")], "--out: cannot create"),
    ):
        r = _cli("run", "--backend", "torch", *args, tmp_path=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert a_file.read_text() == "keep me"


def test_other_commands_print_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\n\x01\x02")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"case_id": "x"}) + "\n")
    results = tmp_path / "results.csv"
    r = _cli("run", "--case", CASE, "--backend", "torch", "--out", str(tmp_path), tmp_path=tmp_path)
    assert r.returncode == 0
    calls = [
        ([sys.executable, "-m", "conformance", "list", "--shard", "7/500"], "no cases selected"),
        ([sys.executable, "-m", "conformance", "dump", CASE, "--out", str(a_file / "d")], "--out"),
        ([sys.executable, "-m", "reports", "render", str(results), "--bench", str(garbage)], ""),
        (
            [
                sys.executable,
                "-m",
                "reports",
                "merge",
                str(jsonl),
                "--out",
                str(tmp_path / "m.csv"),
            ],
            "not a runner row",
        ),
        (
            [
                sys.executable,
                "-m",
                "reports",
                "merge",
                str(results),
                "--out",
                str(tmp_path / "m.csv"),
                "--set",
                "commit",
            ],
            "--set: expected COLUMN=VALUE",
        ),
    ]
    for argv, message in calls:
        r = subprocess.run(
            argv, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            argv,
            r.stderr[-1500:],
        )
        assert message in lines[0]


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)]
)
def test_an_interrupted_run_is_kept_and_marked(tmp_path, sig, code):
    """Ctrl-C and SIGTERM reach the engine through `run`; a SIGKILLed `run` cannot write
    anything, but its engine is told (parent-death signal) and marks the set itself."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conformance",
            "run",
            "--tier",
            "smoke",
            "--backend-module",
            f"{FAULTY}:Hangs",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=dict(_env(tmp_path), FAULT_SLEEP_S="0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    path, deadline = out / "results.jsonl", time.time() + 120
    while time.time() < deadline and not (
        path.exists() and len(path.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout[-2000:]
    assert "INTERRUPTED" in stdout
    rows = _table(out)
    assert {r["run_state"] for r in rows} == {"interrupted"}
    assert sum(r["status"] == "pass" for r in rows) >= 3
    not_run = [r for r in rows if r["reason"].startswith("not run: the run was interrupted")]
    assert not_run and all(r["status"] == "error" for r in not_run)
    assert json.loads((out / "run.json").read_text())["state"] == "interrupted"
    g = subprocess.run(
        [
            sys.executable,
            "-m",
            "reports.gate",
            "--results",
            str(out / "results.csv"),
            "--baseline",
            str(ROOT / "conformance/baselines/smoke-cpu.csv"),
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert g.returncode == 2 and "interrupted run" in g.stderr


def test_an_engine_that_dies_without_workers_still_leaves_its_csv(tmp_path):
    cases = tmp_path / "cases.jsonl"
    common = dict(
        kind="decoder",
        phase="decode",
        batch="single",
        heads="h4kv4",
        head_size=64,
        dtype="float32",
        layout="shuffled",
    )
    cases.write_text("".join(json.dumps({**common, "block_size": bs}) + "\n" for bs in (16, 8, 32)))
    out = tmp_path / "out"
    r = _cli(
        "run",
        "--cases",
        str(cases),
        "--backend-module",
        f"{FAULTY}:KillsItsProcess",
        "--backend-module",
        f"{FAULTY}:Raises",
        "--out",
        str(out),
        tmp_path=tmp_path,
    )
    assert r.returncode == 1, r.stdout[-2000:]
    rows = _table(out)
    by = {(row["case_id"].split("-")[3], row["backend"]): row for row in rows}
    assert by[("bs16", "fault-kills-process")]["status"] == "pass"
    missing = [row for row in rows if row["step"] == "missing"]
    assert {row["case_id"].split("-")[3] for row in missing} == {"bs8", "bs32"}
    assert all(row["status"] == "error" and "recorded no row" in row["reason"] for row in missing)
    # the re-run command of an external backend names its module, in the HTML report too
    assert all(row["backend_module"].startswith(FAULTY) for row in rows)
    from conformance.schema import read_csv
    from reports.html import render

    page = render(read_csv(out / "results.csv"))
    assert f"--backend-module {FAULTY}:Raises" in page
    assert f"--backend-module {FAULTY}:KillsItsProcess" in page


def test_gpus_name_visible_devices(monkeypatch):
    from conformance.__main__ import parse_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_gpus("1,0", 2) == "1,0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert parse_gpus("2", 3) == "6"  # an index among the visible ones
    for bad in ("", "a", "0,0", "3", "-1"):
        with pytest.raises(ValueError, match="--gpus: expected distinct GPU indices"):
            parse_gpus(bad, 3)
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_gpus("0", 0)
