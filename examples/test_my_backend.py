"""The README's external-backend example runs through the matrix command and passes; made
wrong, the same command fails it."""

from conformance.tests.cli import cli, csv_rows


def test_the_example_backend_passes(tmp_path):
    r = cli("run", "--shard", "1/6", "--backend-module", "examples.my_backend:MyBackend",
            "--out", tmp_path)  # fmt: skip
    rows = csv_rows(tmp_path)
    assert r.returncode == 0 and rows and all(row["status"] == "pass" for row in rows), r.stdout


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
