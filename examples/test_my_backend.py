"""The README's external-backend example runs through the matrix command and passes; made
wrong, the same command fails it."""

from conformance.tests.cli import cli, csv_rows


def test_the_example_backend_passes(tmp_path):
    r = cli("run", "--shard", "1/6", "--backend-module", "examples.my_backend:MyBackend",
            "--out", tmp_path)  # fmt: skip
    rows = csv_rows(tmp_path)
    assert r.returncode == 0 and rows and any(row["status"] == "pass" for row in rows), r.stdout
    # It stores K/V in the model dtype only: fp8 steps are skips that say so, the rest pass.
    for row in rows:
        fp8 = row["kv_cache_dtype"] != "auto"
        assert row["status"] == ("skip" if fp8 else "pass"), row
        assert not fp8 or "kv_cache_dtype fp8_e" in row["reason"]


def test_a_wrong_variant_of_it_fails(tmp_path):
    (tmp_path / "wrong_backend.py").write_text(
        "from examples.my_backend import MyBackend\n\n\n"
        "class Wrong(MyBackend):\n"
        "    name = 'my-wrong'\n\n"
        "    def attend(self, *args):\n"
        "        return super().attend(*args) * 1.01\n"
    )
    r = cli("run", "--shard", "1/6", "--backend-module", f"{tmp_path}/wrong_backend.py:Wrong",
            "--out", tmp_path / "out")  # fmt: skip
    assert r.returncode == 1 and "numerical mismatch" in r.stdout
    assert any(row["status"] == "fail" for row in csv_rows(tmp_path / "out"))
