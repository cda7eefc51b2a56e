"""Calling the command lines in-process (`main(argv)`), with what they print, fd 1 and 2 included
(the engine process `run` starts writes there)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASE = "decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0"
FAULTY = str(ROOT / "conformance/tests/faulty.py")  # loaded by file path, as a user would


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _captured():
    """sys.stdout/err and fd 1/2 both into temporary files (a forked process inherits both)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        saved = (os.dup(1), os.dup(2), sys.stdout, sys.stderr)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), line_buffering=True)
        box = {}
        try:
            yield box
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout.close(), sys.stderr.close()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            sys.stdout, sys.stderr = saved[2], saved[3]
            for name, f in (("stdout", out), ("stderr", err)):
                f.seek(0)
                box[name] = f.read().decode(errors="replace")


def cli(*argv: str, module: str = "conformance") -> Result:
    """`python -m MODULE ARGV...` run in this process; SystemExit (argparse) becomes its code."""
    import importlib

    try:
        main = importlib.import_module(f"{module}.__main__").main
    except ModuleNotFoundError:
        main = importlib.import_module(module).main
    with _captured() as box:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return Result(code, box["stdout"], box["stderr"])


def jsonl_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


def csv_rows(out: Path) -> list[dict]:
    with open(Path(out) / "results.csv") as f:
        return list(csv.DictReader(f))
