"""The matrix engine: run every test (workload × backend) of a selection in worker processes,
stream their rows to OUT/results.jsonl, and write results.csv at the end.

    run_matrix(Plan(tests, out, tier, workers, timeout_s)) -> exit code

The command line resolves the selection once (`conformance.selection`) and starts this in a
process of its own (`python -m conformance run` supervises it, so a dying engine still leaves
results.csv). Here:

- Workers are processes that run one test at a time (`runner.run_case`) and send its rows back;
  this process is the only one that writes. On a machine without CUDA they are forked (they
  inherit every loaded module); with CUDA they come from a fork server that never touched the
  GPU (CUDA cannot be forked), and worker i takes visible GPU i mod count.
- A worker that dies (a segfault, `os._exit`, a CUDA error that poisons its context) or hangs
  past the backstop (3x the per-call timeout: native code that SIGALRM cannot stop) is replaced,
  and its test gets an `error` row that says so. The run goes on.
- SIGINT / SIGTERM stop the run: the workers are ended, every test that did not finish gets an
  `error` row ("not run"), and the set is marked interrupted (exit 130 / 143).
- Worker output (a backend's prints, library warnings) goes to OUT/workers.log, not the terminal.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from conformance.schema import Status, result_row

PROGRESS_EVERY_S = 15.0
BACKSTOP_FACTOR = 3.0  # a test running longer than this × the per-call timeout is killed
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class Test:
    """One test: a workload (a Shape; preset cases are lowered) run against one backend."""

    shape: object  # conformance.shapes.Shape
    backend: str
    module: str = ""  # module:Class of an external backend, '' for a registered one

    @property
    def key(self) -> tuple[str, str]:
        return self.shape.id, self.backend


@dataclass(frozen=True)
class Plan:
    tests: tuple[Test, ...]
    out: str
    tier: str
    workers: int = 1
    timeout_s: float = 300.0
    run_id: str = ""


def die_with_parent() -> None:
    """A SIGTERM when the parent dies, even by SIGKILL (Linux; a no-op elsewhere): no orphans."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


START_ENV = "CONFORMANCE_START_METHOD"  # fork | spawn: force one process model (tests)
ENGINE_PID_ENV = "CONFORMANCE_ENGINE_PID"  # set for workers: the engine they report to


def _gpu_model() -> bool:
    import torch

    forced = os.environ.get(START_ENV)
    if forced:
        return forced != "fork"
    return torch.cuda.is_available() or torch.cuda.is_initialized()


def engine_context() -> mp.context.BaseContext:
    """How `run` starts the engine: forked where no GPU exists (nothing is imported again);
    spawned otherwise (CUDA cannot be forked), so the engine is `run`'s own child with `run`'s
    stdout and stderr, and dies with it."""
    return mp.get_context("spawn" if _gpu_model() else "fork")


def context() -> mp.context.BaseContext:
    """How the engine starts workers: forked where no GPU exists; from a fork server that never
    touched the GPU otherwise (it imports torch once; each worker is a fork of it)."""
    if _gpu_model():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "conformance.runner"])
        return ctx
    return mp.get_context("fork")


def auto_workers() -> int:
    """`-n auto`: one worker per core on the CPU (each single-threaded), six per GPU (the most
    that fit an 80 GB card on the full tier's largest fp32 cases)."""
    import torch

    if torch.cuda.is_available():
        return 6 * torch.cuda.device_count()
    return os.cpu_count() or 1


# ---- workers ---------------------------------------------------------------------------------
def _watch(pid: int) -> None:
    """End this process when process `pid` (the engine) is gone: a worker from the fork server
    is not the engine's child, so its parent-death signal follows the fork server instead."""
    import threading

    def loop():
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)

    threading.Thread(target=loop, daemon=True).start()


def _worker(conn, index: int, workers: int, log: str, timeout_s: float, tier: str) -> None:
    """Receive (test index, Test), run it, send (index, rows); None ends the worker."""
    die_with_parent()
    _watch(int(os.environ[ENGINE_PID_ENV]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the engine decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import torch

    from optimized.kernels import interpret_without_cuda

    interpret_without_cuda()
    # A forked worker runs torch single-threaded: GNU OpenMP is not fork-safe, and a parent
    # that has used its thread pool (a test process calling `main`) leaves the child hanging
    # in its first parallel region (PyTorch's DataLoader workers do the same). Workers from the
    # fork server share the cores.
    forked = not torch.cuda.is_available()  # as `context()` chose
    torch.set_num_threads(1 if forked else max(1, (os.cpu_count() or 1) // workers))
    if torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    from conformance.runner import error_reason, run_case
    from conformance.schema import environment
    from optimized.backend import get_backend, load_backend

    env = dict(environment(), tier=tier)
    backends: dict[tuple[str, str], object] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        i, test = msg
        try:
            key = (test.backend, test.module)
            if key not in backends:
                backends[key] = load_backend(test.module) if test.module else get_backend(key[0])
            rows = run_case(test.shape, backends[key], timeout_s=timeout_s, module=test.module)
        except KeyboardInterrupt:
            return
        except BaseException as e:
            why = f"harness: {error_reason(e)}"
            rows = [result_row(test.shape, test.backend, "harness", Status.ERROR, why)]
            rows[0]["backend_module"] = test.module
        conn.send((i, [{**r, **env} for r in rows]))
        if any("CUDA error" in r["reason"] or "illegal memory access" in r["reason"] for r in rows):
            os._exit(3)  # a CUDA error poisons this process: a fresh worker takes over


@dataclass
class _Slot:
    """A worker process and the test it is running (None: idle)."""

    proc: mp.Process
    conn: object
    test: int | None = None
    started: float = 0.0


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def run_matrix(plan: Plan) -> int:
    """Run the plan (the engine process's body); returns its exit code: 0 nothing failed or
    errored, 1 something did, 130/143 interrupted."""
    from conformance.results import finalize_run, start_run, summary_lines

    die_with_parent()

    def stop(signum, frame):
        for s in SIGNAL_EXIT:  # one stop: a second signal (`timeout` signals the whole
            signal.signal(s, signal.SIG_IGN)  # process group, `run` passes it on too) waits
        raise _Stopped(signum)

    for s in SIGNAL_EXIT:
        signal.signal(s, stop)
    os.environ[ENGINE_PID_ENV] = str(os.getpid())
    out = Path(plan.out)
    start_run(out, plan)
    log = str(out / "workers.log")
    Path(log).write_text("")
    ctx = context()
    n = max(1, min(plan.workers, len(plan.tests)))
    queue = list(range(len(plan.tests)))
    queue.reverse()  # pop() takes them in plan order (case-major: a case's backends share
    #                  a worker's cached reference while they run back to back)
    slots: list[_Slot] = []
    done, bad, last = 0, 0, time.time()
    t0 = time.time()
    state, code = "complete", 0

    def spawn(index: int) -> _Slot:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker, args=(child, index, n, log, plan.timeout_s, plan.tier), daemon=True
        )
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def record(rows: list[dict]) -> None:
        nonlocal done, bad
        with open(out / "results.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        done += 1
        bad += any(r["status"] in (Status.FAIL, Status.ERROR) for r in rows)

    def lost(slot: _Slot, why: str) -> None:
        """The worker of `slot` is gone mid-test: an error row for its test."""
        test = plan.tests[slot.test]
        row = result_row(test.shape, test.backend, "crash", Status.ERROR, why)
        record([{**row, "backend_module": test.module}])

    try:
        slots = [spawn(i) for i in range(n)]
        backstop = BACKSTOP_FACTOR * plan.timeout_s
        while queue or any(s.test is not None for s in slots):
            for s in slots:  # hand out work
                if s.test is None and queue:
                    s.test, s.started = queue.pop(), time.time()
                    s.conn.send((s.test, plan.tests[s.test]))
            busy = [s for s in slots if s.test is not None]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
            for k, s in enumerate(slots):
                if s.test is None:
                    continue
                if s.conn in ready:
                    try:
                        _, rows = s.conn.recv()
                    except (EOFError, OSError):
                        rows = None
                    if rows is not None:
                        record(rows)
                        s.test = None
                        continue
                if s.conn in ready or s.proc.sentinel in ready:
                    s.proc.join(5)
                    lost(s, f"crash: the test process died (exit code {s.proc.exitcode})")
                elif time.time() - s.started > backstop:
                    s.proc.kill()
                    s.proc.join(5)
                    lost(s, f"timeout: no result after {backstop:g} s; the worker was killed")
                else:
                    continue
                slots[k] = spawn(k)
            if time.time() - last > PROGRESS_EVERY_S:
                last = time.time()
                left = (last - t0) / max(done, 1) * (len(plan.tests) - done)
                print(
                    f"[conformance] {done}/{len(plan.tests)} tests, {bad} failed or errored, "
                    f"~{left:.0f} s left",
                    flush=True,
                )
    except _Stopped as e:
        state, code = "interrupted", SIGNAL_EXIT[e.signum]
    finally:
        for s in slots:
            with contextlib.suppress(Exception):
                s.conn.send(None) if state == "complete" else s.proc.kill()
        for s in slots:
            s.proc.join(10)
            if s.proc.is_alive():
                s.proc.kill()
    for sig in SIGNAL_EXIT:  # finishing the result set is not interrupted again
        signal.signal(sig, signal.SIG_IGN)
    counts = finalize_run(out, state, plan)
    for line in summary_lines(out, counts, state):
        print(line, flush=True)
    if code:
        return code
    return 1 if counts.get(Status.FAIL, 0) or counts.get(Status.ERROR, 0) else 0


def engine_main(plan: Plan) -> None:
    """The engine process's entry point (its exit code is the result)."""
    sys.exit(run_matrix(plan))
