"""The README's external-backend example runs through the matrix command and passes; made
wrong, the same command fails it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, spec):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    out = tmp_path / "out"
    argv = ["run", "--tier", "smoke", "--shard", "1/6", "--backend-module", spec, "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "conformance", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r, (out / "results.csv").read_text().splitlines()[1:]


def test_the_example_backend_passes(tmp_path):
    r, rows = _run(tmp_path, "examples.my_backend:MyBackend")
    assert r.returncode == 0 and rows and all(",pass," in row for row in rows), r.stdout[-2000:]


def test_a_wrong_variant_of_it_fails(tmp_path):
    (tmp_path / "wrong_backend.py").write_text(
        "from examples.my_backend import MyBackend\n\n\n"
        "class Wrong(MyBackend):\n"
        "    name = 'my-wrong'\n\n"
        "    def forward(self, *args):\n"
        "        return super().forward(*args) * 1.01\n"
    )
    r, rows = _run(tmp_path, "wrong_backend:Wrong")
    assert r.returncode == 1 and "numerical mismatch" in r.stdout
    assert any(",fail," in row for row in rows)
