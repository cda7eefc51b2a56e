"""pytest is the matrix engine: options, parametrization over case × backend, streaming of
result rows to JSONL, progress, and the CSV at the end.

    pytest conformance/test_matrix.py --tier smoke [--backend triton ...] [-k EXPR]
        [--shard i/n] [--cases FILE] [--case ID] [--out DIR] [--backend-module mod:Class]

`python -m conformance run ...` is the same with a stable command line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before Triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conformance.cases import Case
from conformance.generate import generate, shard


def pytest_addoption(parser):
    g = parser.getgroup("conformance")
    g.addoption("--tier", default="smoke", help="smoke | full | exhaustive")
    g.addoption(
        "--backend",
        action="append",
        default=None,
        help="backend name (repeatable); default: every registered backend",
    )
    g.addoption(
        "--backend-module",
        action="append",
        default=[],
        help="package.module:ClassName of an external backend (repeatable)",
    )
    g.addoption("--shard", default=None, help="i/n: run the i-th of n deterministic shards")
    g.addoption("--cases", default=None, help="JSON lines of case axis values instead of a tier")
    g.addoption("--case", action="append", default=None, help="a case id (repeatable)")
    g.addoption("--out", default="reports/out", help="results directory")
    g.addoption("--case-timeout", type=float, default=300.0, help="seconds per backend call")


def _backends(config) -> list:
    from optimized.backend import backend_names, get_backend, load_backend

    chosen = [load_backend(spec) for spec in config.getoption("backend_module")]
    names = config.getoption("backend")
    if names is None:
        names = [] if chosen else [n for n in backend_names() if n != "reference"]
    return [get_backend(n) for n in names] + chosen


def selected_cases(config) -> list[Case]:
    if config.getoption("case"):
        cases = [Case.from_id(i) for i in config.getoption("case")]
    elif config.getoption("cases"):
        cases = []
        for n, line in enumerate(Path(config.getoption("cases")).read_text().splitlines(), 1):
            if line.strip():
                try:
                    cases.append(Case.from_dict(json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise pytest.UsageError(f"--cases line {n}: {e}") from None
    else:
        cases = generate(config.getoption("tier"))
    return shard(cases, config.getoption("shard"))


def rerun_command(config, case: Case, backend_name: str, module: str | None) -> str:
    extra = f" --backend-module {module}" if module else f" --backend {backend_name}"
    return f"python -m conformance run --case {case.id}{extra}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    try:
        cases, backends = selected_cases(config), _backends(config)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config._matrix_backends = {b.name: b for b in backends}
    # Case-major order: xdist's `load` hands out consecutive tests, so a case's backends mostly
    # share a worker and its reference (runner.expected_for keeps the last few). `loadgroup`
    # would guarantee it, but its scheduler fails on a replaced (crashed) worker (xdist 3.8:
    # KeyError in loadscope._assign_work_unit), and a crash must never stop the run.
    params = [pytest.param(c, b.name, id=f"{c.id}::{b.name}") for c in cases for b in backends]
    metafunc.parametrize("case,backend_name", params)


class Matrix:
    """Streams rows to OUT/results.jsonl, one write per line (O_APPEND: safe across workers)."""

    def __init__(self, config):
        self.config = config
        self.out = Path(config.getoption("out"))
        self.path = self.out / "results.jsonl"

    def record(self, rows: list[dict]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for r in rows:
                os.write(fd, (json.dumps(r) + "\n").encode())
        finally:
            os.close(fd)


@pytest.fixture
def matrix(request) -> Matrix:
    return Matrix(request.config)


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def _matrix_session(config) -> bool:
    """The engine (fresh JSONL, progress, CSV) runs only when the matrix itself was asked for:
    `pytest conformance` or `pytest conformance/test_matrix.py`, not its unit tests."""
    here = Path(__file__).parent.resolve()
    targets = {here, here / "test_matrix.py"}
    return any(Path(a.split("::")[0]).resolve() in targets for a in config.args)


def pytest_sessionstart(session):
    config = session.config
    if _is_controller(config) and _matrix_session(config):
        out = Path(config.getoption("out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")  # a new run starts a new result set
        config._progress = dict(start=time.time(), done=0, bad=0, last=0.0)


def pytest_collection_finish(session):
    if _is_controller(session.config) and hasattr(session.config, "_progress"):
        session.config._progress["total"] = len(session.items)


def _record_crash(config, report) -> None:
    """A worker that died (segfault, a hung kernel killed by pytest-timeout, os._exit) wrote no
    row for its test: the controller records one, so the result set says what happened."""
    from conformance.runner import result_row

    param = report.nodeid.split("[", 1)[-1].rsplit("]", 1)[0]
    case_id, _, backend = param.partition("::")
    try:
        case = Case.from_id(case_id)
    except ValueError:
        return
    text = str(report.longrepr).strip().splitlines()
    why = text[0][:200] if text else "worker crashed"
    row = result_row(case, backend, "crash", "error", f"crash: the test process died ({why})")
    Matrix(config).record([row])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    p = getattr(node.config, "_progress", None)
    if p is not None:
        p["total"] = len(ids)


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and workers > 1:
        # Share the cores: N workers each running torch's default one thread per core
        # oversubscribe the CPU (the comparisons and the CPU reference run on it).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if worker.startswith("gw") and torch.cuda.device_count() > 1:
        # One GPU per worker where several exist ("cuda" then means this worker's card).
        torch.cuda.set_device(int(worker[2:]) % torch.cuda.device_count())

    class Progress:
        @pytest.hookimpl
        def pytest_runtest_logreport(self, report):
            p = getattr(config, "_progress", None)
            if report.when == "???":  # xdist: the worker died running this test
                _record_crash(config, report)
            if p is None or (
                report.when not in ("call", "???")
                and not (report.when == "setup" and report.skipped)
            ):
                return
            p["done"] += 1
            p["bad"] += report.failed
            now = time.time()
            total = p.get("total") or p["done"]
            if now - p["last"] > 15 or p["done"] == total:
                p["last"] = now
                elapsed = now - p["start"]
                left = elapsed / p["done"] * (total - p["done"])
                tr = config.pluginmanager.get_plugin("terminalreporter")
                if tr:
                    tr.write_line(
                        f"[conformance] {p['done']}/{total} done, {p['bad']} failed "
                        f"or errored, ~{left:.0f} s left"
                    )

    if _is_controller(config) and _matrix_session(config):
        config.pluginmanager.register(Progress(), "conformance-progress")


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not (_is_controller(config) and _matrix_session(config)):
        return
    from reports.schema import environment, read_jsonl, to_result_row, write_csv

    out = Path(config.getoption("out"))
    path = out / "results.jsonl"
    if not path.exists():
        return
    env = environment()
    rows = [to_result_row(r, env, config.getoption("tier")) for r in read_jsonl(path)]
    rows.sort(key=lambda r: (r["case_id"], r["backend"], r["step"]))
    write_csv(rows, out / "results.csv")
    info = dict(
        tier=config.getoption("tier"),
        wall_s=time.time() - config._progress["start"],
        rows=len(rows),
    )
    (out / "run.json").write_text(json.dumps(info))
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr:
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "error", "skip")}
        tr.write_line(f"[conformance] {len(rows)} rows -> {out / 'results.csv'}: {counts}")
