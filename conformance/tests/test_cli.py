"""The command line and the engine, in-process through `main(argv)`: exit codes, external
backends (good, wrong, crashing, killing its process) given by file path, --cases replay,
dump. Interruptions and misuse: test_cli_fail_closed.py."""

import json
import textwrap

import numpy as np
import pytest

from conformance.tests.cli import CASE, FAULTY, cli, csv_rows, jsonl_rows

EXTERNAL = textwrap.dedent('''
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


@pytest.fixture
def ext(tmp_path):
    (tmp_path / "ext_backends.py").write_text(EXTERNAL)
    return tmp_path


def test_external_good_backend_passes_and_keeps_to_its_own_folder(ext, monkeypatch):
    """Given by file path, from another directory, with the default --out: its results go to
    reports/out/backends/<name>, never over the project's reports/out."""
    monkeypatch.chdir(ext)
    r = cli("run", "--tier", "smoke", "--shard", "1/8", "--backend-module",
            f"{ext}/ext_backends.py:Good")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    out = ext / "reports/out/backends/ext-good"
    rows = jsonl_rows(out)
    assert rows and {row["backend"] for row in rows} == {"ext-good"}
    assert all(row["status"] == "pass" for row in rows)
    assert (out / "results.csv").read_text().startswith("case_id,backend,step,")
    assert (out / "index.html").exists() and not (ext / "reports/out/results.csv").exists()
    assert r.stdout.strip().splitlines()[-2].startswith("[conformance] ")  # summary, report


def test_deliberately_wrong_backend_fails_the_smoke_tier(ext):
    out = ext / "wrong"
    r = cli("run", "--tier", "smoke", "--shard", "2/8", "--backend-module",
            f"{ext}/ext_backends.py:Wrong", "--out", out)  # fmt: skip
    assert r.returncode == 1
    rows = jsonl_rows(out)
    assert sum(row["status"] == "fail" for row in rows) > len(rows) // 2
    assert "numerical mismatch" in r.stdout
    # the printed command re-runs the row from anywhere: the module's absolute path
    assert "re-run alone: python -m conformance run --case " in r.stdout
    assert f"--backend-module {ext}/ext_backends.py:Wrong" in r.stdout


def test_a_crash_in_one_case_is_recorded_and_the_run_goes_on(ext):
    out = ext / "crashy"
    r = cli("run", "--tier", "smoke", "-k", "bs8 or bs16", "--backend-module",
            f"{ext}/ext_backends.py:Crashy", "--out", out)  # fmt: skip
    assert r.returncode == 1
    rows = jsonl_rows(out)
    errors = [row for row in rows if row["status"] == "error"]
    assert errors and all(row["block_size"] == 8 for row in errors)
    assert all("runtime error: RuntimeError: simulated kernel crash" in e["reason"] for e in errors)
    assert any(row["status"] == "pass" for row in rows)  # every other case still ran


def test_a_process_crash_is_recorded_and_the_run_goes_on(tmp_path):
    """A backend that kills its process (like a segfault) on block size 8: a fresh worker takes
    over, the crash becomes an error row, every selected case still runs."""
    out = tmp_path / "dying"
    r = cli("run", "--tier", "smoke", "-k", "bs8 or bs32", "--backend-module",
            f"{FAULTY}:KillsItsProcess", "-n", "2", "--out", out)  # fmt: skip
    assert r.returncode == 1
    rows = jsonl_rows(out)
    crashes = [row for row in rows if row["step"] == "crash"]
    assert len(crashes) > 8 and all(row["block_size"] == 8 for row in crashes)
    assert all(row["status"] == "error" for row in crashes)
    assert all(row["reason"].startswith("crash: the test process died") for row in crashes)
    assert sum(row["status"] == "pass" for row in rows) >= 8  # the block-size-32 cases
    from conformance.generate import generate

    selected = {c.id for c in generate("smoke") if c.block_size in (8, 32)}
    assert {row["case_id"] for row in rows} == selected
    assert any(r["step"] == "crash" and r["status"] == "error" for r in csv_rows(out))


def test_cases_file_replays_rows_and_rejects_unknown_axes(tmp_path):
    good = dict(kind="cross", phase="decode", batch="single", block_size=8, heads="h8kv1",
                head_size=64, dtype="float32", layout="shuffled", seed=5)  # fmt: skip
    f = tmp_path / "cases.jsonl"
    f.write_text(json.dumps(good) + "\n")
    r = cli("run", "--cases", f, "--backend", "torch", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert jsonl_rows(tmp_path / "o")[0]["case_id"] == (
        "cross-decode-single-bs8-h8kv1-d64-fp32-shuffled-s5"
    )
    f.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    r = cli("run", "--cases", f, "--backend", "torch", "--out", tmp_path / "o")
    assert r.returncode == 2 and "unknown case axes ['colour']" in r.stderr


def test_list_prints_cases_and_coverage():
    r = cli("list", "--tier", "smoke")
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and "kind=" in lines[0]
    assert lines[-1].startswith("# ") and "coverage:" in lines[-1]
    got, want = lines[-1].split("coverage: ")[1].split(" valid")[0].split(" of ")
    assert got == want  # every valid pair of axis values
    r = cli("list", "--tier", "smoke", "--format", "csv")
    assert r.stdout.splitlines()[0].startswith("case_id,kind,phase,batch")


def test_dump_writes_inputs_caches_and_reference(tmp_path):
    r = cli("dump", CASE, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    npz = np.load(tmp_path / "d" / "case.npz")
    for key in ("step0_query", "step0_block_tables", "step0_slot_mapping",
                "step0_key_cache_before", "step0_key_cache_after",
                "step0_reference_output"):  # fmt: skip
        assert key in npz.files
    before, after = npz["step0_key_cache_before"], npz["step0_key_cache_after"]
    assert np.isnan(before).sum() > np.isnan(after).sum()  # the step wrote its slots
    assert json.loads((tmp_path / "d" / "case.json").read_text())["case_id"] == CASE


def test_dump_with_a_backend_writes_its_output_and_verdict_beside(tmp_path):
    """The loop back from a failure: the printed dump command writes the backend's outputs and
    caches beside the reference's, and its verdict into case.json (exit 1 when it fails)."""
    from conformance.schema import dump_command

    row = dict(case_id=CASE, backend="fault-nan", backend_module=f"{FAULTY}:NaNOutput")
    cmd = dump_command(row).split()[3:]
    cmd[cmd.index("--out") + 1] = str(tmp_path / "d")
    r = cli(*cmd)
    assert r.returncode == 1, r.stdout + r.stderr
    npz = np.load(tmp_path / "d" / "case.npz")
    assert {"step0_backend_output", "step0_backend_key_cache_after"} <= set(npz.files)
    (step,) = json.loads((tmp_path / "d" / "case.json").read_text())["steps"]
    assert step["backend"]["status"] == "fail" and "NaN" in step["backend"]["reason"]
    ok = cli("dump", CASE, "--out", tmp_path / "ok", "--backend", "torch")
    assert ok.returncode == 0 and "step 0: torch pass" in ok.stdout
