"""pytest is the matrix engine: options, parametrization over case × backend, streaming of
result rows to JSONL, progress, and the CSV at the end.

    pytest conformance/test_matrix.py --tier smoke [--backend triton ...] [-k EXPR]
        [--shard i/n] [--cases FILE] [--case ID] [--out DIR] [--backend-module mod:Class]

`python -m conformance run ...` is the same with a stable command line (and a supervising
process that still writes results.csv when this one dies). SIGTERM stops the run like Ctrl-C:
the result set is kept and marked `interrupted`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from optimized.kernels import interpret_without_cuda

interpret_without_cuda()  # before Triton is imported

from conformance.cases import Case, select_cases
from conformance.generate import generate, generate_for_models, shard
from conformance.runner import DEFAULT_TIMEOUT_S
from conformance.shapes import Shape


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


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
    g.addoption("--model", default=None, help="a model preset (or all): cases around its geometry")
    g.addoption("--cases", default=None, help="JSON lines of case axis values instead of a tier")
    g.addoption("--case", action="append", default=None, help="a case id (repeatable)")
    g.addoption("--out", default="reports/out", help="results directory")
    g.addoption(
        "--case-timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per backend call (> 0)",
    )


def matrix_backends(config) -> list[tuple[object, str]]:
    """(backend, its --backend-module spec or '') for every backend of this run."""
    from optimized.backend import backend_names, get_backend, load_backend

    chosen = [(load_backend(spec), spec) for spec in config.getoption("backend_module")]
    names = config.getoption("backend")
    if names is None:
        names = [] if chosen else [n for n in backend_names() if n != "reference"]
    return [(get_backend(n), "") for n in names] + chosen


def selected_cases(config) -> list[Case | Shape]:
    """--case / --cases, else the cases around --model, else the tier's."""
    cases = select_cases(config.getoption("case"), config.getoption("cases"))
    if cases is None:
        tier, model = config.getoption("tier"), config.getoption("model")
        cases = generate_for_models(tier, model) if model else generate(tier)
    return shard(cases, config.getoption("shard"))


def case_by_id(config, case_id: str) -> Case | Shape | None:
    """The selected case of an id (what the controller needs for a crashed test's row)."""
    known = getattr(config, "_cases_by_id", None)
    if known is None:
        known = config._cases_by_id = {c.id: c for c in selected_cases(config)}
    return known.get(case_id)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    try:
        cases, backends = selected_cases(config), matrix_backends(config)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config._matrix_backends = {b.name: (b, module) for b, module in backends}
    # Case-major order: xdist's `load` hands out consecutive tests, so a case's backends mostly
    # share a worker and its reference (runner.expected_for keeps the last few). `loadgroup`
    # would guarantee it, but its scheduler fails on a replaced (crashed) worker (xdist 3.8:
    # KeyError in loadscope._assign_work_unit), and a crash must never stop the run.
    params = [pytest.param(c, b.name, id=f"{c.id}::{b.name}") for c in cases for b, _ in backends]
    metafunc.parametrize("case,backend_name", params)


class Matrix:
    """Streams rows to OUT/results.jsonl, one write per line (O_APPEND: safe across workers)."""

    def __init__(self, config):
        self.config = config
        self.out = Path(config.getoption("out"))
        self.path = self.out / "results.jsonl"

    def record(self, rows: list[dict], module: str = "") -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for r in rows:
                os.write(fd, (json.dumps({**r, "backend_module": module}) + "\n").encode())
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


def _param(nodeid: str) -> tuple[str, str]:
    """(case_id, backend) of a matrix test id `...test_case[CASE::BACKEND]`."""
    param = nodeid.split("[", 1)[-1].rsplit("]", 1)[0]
    case_id, _, backend = param.partition("::")
    return case_id, backend


def _start(config, nodeids: list[str]) -> None:
    """The selection is known and not empty: a new result set starts (once)."""
    p = getattr(config, "_progress", None)
    if p is None or p.get("started"):
        return
    from conformance.results import start_run

    modules = {name: module for name, (_, module) in config._matrix_backends.items()}
    planned = [(c, b, modules.get(b, "")) for c, b in map(_param, nodeids)]
    if planned:
        shapes = {}
        for case_id in dict.fromkeys(c for c, _, _ in planned):
            case = case_by_id(config, case_id)
            if isinstance(case, Shape):
                shapes[case_id] = dict(case.to_dict(), source=case.source)
        start_run(Path(config.getoption("out")), config.getoption("tier"), planned, shapes)
        p.update(started=True, total=len(planned), start=time.time())


def pytest_collection_finish(session):
    config = session.config
    if _is_controller(config) and hasattr(config, "_progress") and session.items:
        _start(config, [item.nodeid for item in session.items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    config = node.config
    if hasattr(config, "_progress") and ids:
        if not hasattr(config, "_matrix_backends"):  # the controller collects nothing itself
            config._matrix_backends = {b.name: (b, m) for b, m in matrix_backends(config)}
        _start(config, list(ids))


def _record_crash(config, report) -> None:
    """A worker that died (segfault, a hung kernel killed by pytest-timeout, os._exit) wrote no
    row for its test: the controller records one, so the result set says what happened."""
    from conformance.schema import result_row

    case_id, backend = _param(report.nodeid)
    try:
        case = case_by_id(config, case_id)
    except ValueError:
        case = None
    if case is None:
        return  # not a matrix test; finalize_run still marks a planned test without rows
    text = str(report.longrepr).strip().splitlines()
    why = text[0][:200] if text else "worker crashed"
    row = result_row(case, backend, "crash", "error", f"crash: the test process died ({why})")
    modules = getattr(config, "_matrix_backends", {})
    Matrix(config).record([row], modules.get(backend, (None, ""))[1])


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
        config._progress = dict(start=time.time(), done=0, bad=0, last=0.0)
        config.pluginmanager.register(Progress(), "conformance-progress")
        # SIGTERM ends the run like Ctrl-C: pytest stops, and sessionfinish marks the result
        # set interrupted (a killed CI job still leaves what finished).
        signal.signal(signal.SIGTERM, _stop_on_sigterm)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    p = getattr(config, "_progress", None)
    if not (_is_controller(config) and p and p.get("started")):
        return  # not the matrix, or nothing selected: the last result set stays as it was
    from conformance.results import finalize_run, summary_line

    state = "interrupted" if exitstatus == pytest.ExitCode.INTERRUPTED else "complete"
    counts = finalize_run(Path(config.getoption("out")), state)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr:
        tr.write_line(summary_line(Path(config.getoption("out")), counts, state))
