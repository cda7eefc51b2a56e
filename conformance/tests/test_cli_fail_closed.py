"""The command line fails closed: bad usage is one line and exit 2 with the last results
untouched; Ctrl-C / SIGTERM keep a result set marked interrupted (130 / 143); an engine that
dies still leaves results.csv with the tests it never finished as errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conformance.tests.cli import CASE, FAULTY, ROOT, cli, csv_rows


@pytest.fixture(scope="module")
def last_run(tmp_path_factory):
    """An --out directory holding a previous run's results."""
    out = tmp_path_factory.mktemp("last") / "out"
    r = cli("run", "--case", CASE, "--backend", "torch", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:]
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


NO_GPU = ["--gpus", "0"] if not torch.cuda.is_available() else ["--gpus", "99"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend-module", "no_colon"], "--backend-module: expected 'package.module:ClassName'"),
        (["--backend-module", "no_such_mod:X"], "ModuleNotFoundError"),
        (["--backend-module", "no_such_mod:X"], "give the file: --backend-module path/to/file.py"),
        (["--backend-module", "/no/such/file.py:X"], "no such file"),
        (["--backend-module", f"{FAULTY}:Nope"], "has no attribute 'Nope'"),
        (["-k", "torch and ("], "-k: not a valid expression"),
        (["-k", "no_such_thing"], "no cases selected (-k 'no_such_thing' matches no"),
        (["--case-timeout", "-1"], "--case-timeout: expected seconds > 0"),
        (["--case-timeout", "0"], "--case-timeout: expected seconds > 0"),
        (["--shard", "7/5"], "--shard: expected i/n"),
        (["-n", "many"], "-n: expected 'auto' or a number"),
        (NO_GPU, "--gpus: "),
        (["--tier", "nope"], "--tier: expected one of"),
        (["--backend", "nope"], "--backend: unknown backend 'nope'"),
        (["--case", "not-a-case"], "not a case id"),
        (["--model", "nosuch"], "--model: unknown model 'nosuch'; known: all, whisper-tiny"),
        (["--model", "t5-small"], f"--case {CASE}: not a case of --model t5-small"),
        (
            ["--backend-module", f"{FAULTY}:TritonImpostor", "--backend", "triton"],
            "two backends named 'triton'",
        ),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-module-hint",
        "no-file",
        "no-class",
        "k-syntax",
        "k-nothing",
        "timeout-neg",
        "timeout-0",
        "shard",
        "workers",
        "gpus",
        "tier",
        "backend",
        "case",
        "model-typo",
        "model-other",
        "name-collision",
    ],
)
def test_bad_usage_is_one_line_and_keeps_the_last_results(last_run, args, message):
    out, before = last_run
    r = cli("run", "--case", CASE, "--backend", "torch", "--out", out, *args)
    assert r.returncode == 2, (r.stdout[-1500:], r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert r.stdout == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_backend_named_twice_runs_once(tmp_path):
    r = cli("run", "--case", CASE, "--backend", "torch", "--backend", "torch", "--out", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    rows = csv_rows(tmp_path)
    assert len(rows) == len({(row["case_id"], row["backend"], row["step"]) for row in rows})
    assert {row["backend"] for row in rows} == {"torch"}


def test_empty_cases_file_and_bad_out(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for args, message in (
        (["--cases", empty], "no cases selected"),
        (["--case", CASE, "--out", a_file], "exists and is not a directory"),
        (["--case", CASE, "--out", a_file / "sub"], "--out: cannot create"),
    ):
        r = cli("run", "--backend", "torch", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert a_file.read_text() == "keep me"


def test_other_commands_print_one_line(tmp_path, last_run):
    out, _ = last_run
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\xff\n\x01\x02")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"case_id": "x"}) + "\n")
    results = out / "results.csv"
    calls = [
        ("conformance", ["list", "--shard", "7/500"], "no cases selected"),
        ("conformance", ["dump", CASE, "--out", a_file / "d"], "--out"),
        ("conformance", ["dump", CASE, "--model", "nosuch", "--out", tmp_path], "unknown model"),
        ("conformance", ["list", "--model", "nosuch", "--cases", a_file], "unknown model"),
        ("bench", ["--model", "nosuch", "--cases", a_file], "unknown model"),
        ("reports", ["render", results, "--bench", garbage], "--bench"),
        ("reports", ["render", results, "--bench", tmp_path / "nope.csv"], "--bench: no such file"),
        ("reports", ["render", results, "--bench", results], "not a bench CSV"),
        ("reports", ["merge", jsonl, "--out", tmp_path / "m.csv"], "not a runner row"),
        (
            "reports",
            ["merge", results, "--out", tmp_path / "m.csv", "--set", "commit"],
            "--set: expected COLUMN=VALUE",
        ),
    ]
    for module, argv, message in calls:
        r = cli(*argv, module=module)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            argv,
            r.stderr[-1500:],
        )
        assert message in lines[0], (argv, lines)


def _run_and_signal(tmp_path, sig):
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
            "-n",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=dict(os.environ, FAULT_SLEEP_S="0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    path, deadline = out / "results.jsonl", time.time() + 120
    while time.time() < deadline and not (
        path.exists() and len(path.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr, out


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)]
)
def test_an_interrupted_run_is_kept_and_marked(tmp_path, sig, code):
    """Ctrl-C and SIGTERM reach the engine through `run`; a SIGKILLed `run` cannot write
    anything, but its engine is told (parent-death signal) and marks the set itself. No
    traceback: one INTERRUPTED line."""
    returncode, stdout, stderr, out = _run_and_signal(tmp_path, sig)
    assert returncode == code, stdout[-2000:] + stderr[-2000:]
    if sig != signal.SIGKILL:
        assert "INTERRUPTED" in stdout and "Traceback" not in stdout + stderr, stdout + stderr
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "results.csv").exists():
        time.sleep(0.2)  # after a SIGKILL the engine finishes on its own
    time.sleep(0.5)
    rows = csv_rows(out)
    assert {r["run_state"] for r in rows} == {"interrupted"}
    assert sum(r["status"] == "pass" for r in rows) >= 3
    not_run = [r for r in rows if r["reason"].startswith("not run: the run was interrupted")]
    assert not_run and all(r["status"] == "error" for r in not_run)
    assert json.loads((out / "run.json").read_text())["state"] == "interrupted"
    g = cli("--results", out / "results.csv", "--baseline",
            ROOT / "conformance/baselines/smoke-cpu.csv", module="reports.gate")  # fmt: skip
    assert g.returncode == 2 and "interrupted run" in g.stderr


def test_an_engine_that_dies_still_leaves_its_csv(tmp_path):
    """The engine process itself is killed (by a backend, on block size 8): `run` writes
    results.csv from what finished; every test the engine did not finish is an error row."""
    cases = tmp_path / "cases.jsonl"
    common = dict(kind="decoder", phase="decode", batch="single", heads="h4kv4", head_size=64,
                  dtype="float32", layout="shuffled")  # fmt: skip
    cases.write_text("".join(json.dumps({**common, "block_size": bs}) + "\n" for bs in (16, 8, 32)))
    out = tmp_path / "out"
    r = cli("run", "--cases", cases, "--backend-module", f"{FAULTY}:KillsTheEngine",
            "--backend-module", f"{FAULTY}:Raises", "--out", out)  # fmt: skip
    assert r.returncode == 1, r.stdout[-2000:]
    rows = csv_rows(out)
    by = {(row["case_id"].split("-")[3], row["backend"]): row for row in rows}
    assert by[("bs16", "fault-kills-engine")]["status"] == "pass"
    missing = [row for row in rows if row["step"] == "missing"]
    assert {row["case_id"].split("-")[3] for row in missing} >= {"bs8", "bs32"}
    assert all(row["status"] == "error" and "recorded no row" in row["reason"] for row in missing)
    # the re-run command of an external backend names its module, in the HTML report too
    assert all(row["backend_module"].endswith(("faulty.py:KillsTheEngine", "faulty.py:Raises"))
               for row in rows)  # fmt: skip
    assert "the engine ended with exit code" in r.stdout
    page = (out / "index.html").read_text()
    assert f"--backend-module {FAULTY}:Raises" in page


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


def test_the_gpu_process_model_runs_and_fails_closed_on_the_cpu(tmp_path, monkeypatch):
    """With CUDA the engine is spawned and its workers come from a fork server (CUDA cannot be
    forked): forced here on the CPU, a run prints through `run`'s own stdout, and a killed
    engine still leaves results.csv with its unfinished tests as errors."""
    monkeypatch.setenv("CONFORMANCE_START_METHOD", "spawn")
    r = cli("run", "--case", CASE, "--backend", "torch", "--out", tmp_path / "ok")
    assert r.returncode == 0 and "[conformance] 2 rows (2 pass" in r.stdout, r.stdout
    test_an_engine_that_dies_still_leaves_its_csv(tmp_path)
