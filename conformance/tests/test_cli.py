"""The command line and the engine: exit codes, external backends (good, wrong, crashing,
killing its process), --cases replay, dump. Interruptions: test_cli_fail_closed.py."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CASE = "decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0"

EXTERNAL = textwrap.dedent('''
    import torch
    from optimized.torch_backend import TorchBackend

    class Good(TorchBackend):
        name = "ext-good"

    class Wrong(TorchBackend):
        """Scales its output by 1.001: the smoke tier must fail it."""
        name = "ext-wrong"
        def forward(self, *args):
            return super().forward(*args) * 1.001

    class Crashy(TorchBackend):
        """Raises inside forward on block size 8 (a 'kernel crash')."""
        name = "ext-crashy"
        def forward(self, query, key, value, kv_cache, metadata, attn_kind):
            if metadata.block_size == 8:
                raise RuntimeError("simulated kernel crash")
            return super().forward(query, key, value, kv_cache, metadata, attn_kind)
''')


def _env(extra: Path) -> dict:
    """The current environment with the repo and `extra` in front of PYTHONPATH (kept: on the
    GPU machine it points at the carried wheels)."""
    path = os.pathsep.join(p for p in (str(ROOT), str(extra), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _cli(*args, tmp_path, timeout=600):
    env = _env(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "conformance", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def ext(tmp_path):
    (tmp_path / "ext_backends.py").write_text(EXTERNAL)
    return tmp_path


def _rows(out: Path):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_external_good_backend_passes_the_smoke_tier(ext):
    out = ext / "good"
    r = _cli(
        "run",
        "--tier",
        "smoke",
        "--shard",
        "1/3",  # a third of the tier: the built-in torch backend runs all of it in make test
        "--backend-module",
        "ext_backends:Good",
        "--out",
        str(out),
        tmp_path=ext,
    )
    assert r.returncode == 0, r.stdout[-2000:]
    rows = _rows(out)
    assert rows and {row["backend"] for row in rows} == {"ext-good"}
    assert all(row["status"] == "pass" for row in rows)
    assert (out / "results.csv").read_text().startswith("case_id,backend,step,")


def test_deliberately_wrong_backend_fails_the_smoke_tier(ext):
    out = ext / "wrong"
    r = _cli(
        "run",
        "--tier",
        "smoke",
        "--shard",
        "2/3",
        "--backend-module",
        "ext_backends:Wrong",
        "--out",
        str(out),
        tmp_path=ext,
    )
    assert r.returncode == 1
    rows = _rows(out)
    assert sum(row["status"] == "fail" for row in rows) > len(rows) // 2
    assert "numerical mismatch" in r.stdout
    assert "re-run alone: python -m conformance run --case " in r.stdout


def test_a_crash_in_one_case_is_recorded_and_the_run_goes_on(ext):
    out = ext / "crashy"
    r = _cli(
        "run",
        "--tier",
        "smoke",
        "-k",
        "bs8 or bs16",
        "--backend-module",
        "ext_backends:Crashy",
        "--out",
        str(out),
        tmp_path=ext,
    )
    assert r.returncode == 1
    rows = _rows(out)
    errors = [row for row in rows if row["status"] == "error"]
    assert errors and all(row["block_size"] == 8 for row in errors)
    assert all("runtime error: RuntimeError: simulated kernel crash" in e["reason"] for e in errors)
    assert any(row["status"] == "pass" for row in rows)  # every other case still ran


def test_cases_file_replays_rows_and_rejects_unknown_axes(tmp_path):
    good = dict(
        kind="cross",
        phase="decode",
        batch="single",
        block_size=8,
        heads="h8kv1",
        head_size=64,
        dtype="float32",
        layout="shuffled",
        seed=5,
    )
    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps(good) + "\n")
    r = _cli(
        "run",
        "--cases",
        str(f),
        "--backend",
        "torch",
        "--out",
        str(tmp_path / "o"),
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (
        _rows(tmp_path / "o")[0]["case_id"] == "cross-decode-single-bs8-h8kv1-d64-fp32-shuffled-s5"
    )
    f.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    r = _cli("run", "--cases", str(f), "--backend", "torch", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown case axes ['colour']" in r.stderr


def test_bad_usage_exits_2(tmp_path):
    for args in (
        ["run", "--tier", "nope"],
        ["run", "--backend", "nope"],
        ["run", "--shard", "0/2"],
        ["run", "--case", "not-a-case"],
    ):
        r = _cli(*args, tmp_path=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ")


def test_list_prints_cases_and_coverage(tmp_path):
    r = _cli("list", "--tier", "smoke", tmp_path=tmp_path)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and "kind=" in lines[0]
    assert lines[-1].startswith("# ") and "coverage: 903 of 903" in lines[-1]
    r = _cli("list", "--tier", "smoke", "--format", "csv", tmp_path=tmp_path)
    assert r.stdout.splitlines()[0].startswith("case_id,kind,phase,batch")


def test_dump_writes_inputs_caches_and_reference(tmp_path):
    r = _cli("dump", CASE, "--out", str(tmp_path / "d"), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    npz = np.load(tmp_path / "d" / "case.npz")
    for key in (
        "step0_query",
        "step0_block_tables",
        "step0_slot_mapping",
        "step0_key_cache_before",
        "step0_key_cache_after",
        "step0_reference_output",
    ):
        assert key in npz.files
    before, after = npz["step0_key_cache_before"], npz["step0_key_cache_after"]
    assert np.isnan(before).sum() > np.isnan(after).sum()  # the step wrote its slots
    assert json.loads((tmp_path / "d" / "case.json").read_text())["case_id"] == CASE


def test_a_process_crash_is_recorded_and_the_run_goes_on(ext):
    """A backend that kills its process (like a segfault) on block size 8: with workers, the
    run continues in a fresh worker and the crash becomes an error row."""
    out = ext / "dying"
    r = _cli(
        "run",
        "--tier",
        "smoke",
        "-k",
        "bs8 or bs32",
        "--backend-module",
        "conformance.tests.faulty:KillsItsProcess",
        "-n",
        "2",
        "--out",
        str(out),
        tmp_path=ext,
    )
    assert r.returncode == 1
    rows = _rows(out)
    crashes = [row for row in rows if row["step"] == "crash"]
    assert crashes and all(row["block_size"] == 8 and row["status"] == "error" for row in crashes)
    assert all(row["reason"].startswith("crash: the test process died") for row in crashes)
    assert sum(row["status"] == "pass" for row in rows) >= 8  # the block-size-32 cases
    # more crashes than xdist's default worker restarts (4 per worker): still every case ran
    from conformance.generate import generate

    assert len(crashes) > 8
    selected = {c.id for c in generate("smoke") if c.block_size in (8, 32)}
    assert {row["case_id"] for row in rows} == selected
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert any(r["step"] == "crash" and r["status"] == "error" for r in table)
