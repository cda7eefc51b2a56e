"""The conformance matrix: one test per case × backend (parametrized in conftest.py)."""

import os

import pytest

from conformance.runner import error_reason, run_case
from conformance.schema import rerun_command, result_row


def test_case(case, backend_name, matrix, request):
    backend, module = request.config._matrix_backends[backend_name]
    try:
        rows = run_case(case, backend, timeout_s=request.config.getoption("case_timeout"))
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        rows = [result_row(case, backend_name, "harness", "error", f"harness: {error_reason(e)}")]
    matrix.record(rows, module)
    if os.environ.get("PYTEST_XDIST_WORKER") and any(
        "CUDA error" in r["reason"] or "illegal memory access" in r["reason"] for r in rows
    ):
        # A CUDA error poisons this process's context: leave, and xdist starts a fresh worker.
        os._exit(3)
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    if bad:
        lines = [f"{r['step']}: {r['status']}: {r['reason']}" for r in bad]
        row = dict(case_id=case.id, backend=backend_name, backend_module=module)
        lines.append("re-run alone: " + rerun_command(row))
        pytest.fail("\n".join(lines), pytrace=False)
    if all(r["status"] == "skip" for r in rows):
        pytest.skip(rows[0]["reason"])
