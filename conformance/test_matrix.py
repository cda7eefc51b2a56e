"""The conformance matrix: one test per case × backend (parametrized in conftest.py)."""

import os

import pytest

from conformance.conftest import rerun_command
from conformance.runner import run_case


def test_case(case, backend_name, matrix, request):
    backend = request.config._matrix_backends[backend_name]
    rows = run_case(case, backend, timeout_s=request.config.getoption("case_timeout"))
    matrix.record(rows)
    if os.environ.get("PYTEST_XDIST_WORKER") and any(
        "CUDA error" in r["reason"] or "illegal memory access" in r["reason"] for r in rows
    ):
        # A CUDA error poisons this process's context: leave, and xdist starts a fresh worker.
        os._exit(3)
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    if bad:
        module = next(
            (
                m
                for m in request.config.getoption("backend_module")
                if m.endswith(":" + type(backend).__name__)
            ),
            None,
        )
        lines = [f"{r['step']}: {r['status']}: {r['reason']}" for r in bad]
        lines.append("re-run alone: " + rerun_command(request.config, case, backend_name, module))
        pytest.fail("\n".join(lines), pytrace=False)
    if all(r["status"] == "skip" for r in rows):
        pytest.skip(rows[0]["reason"])
