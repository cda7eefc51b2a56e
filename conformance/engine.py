"""The matrix engine: run every test (workload × backend) of a selection in worker processes,
stream their rows to OUT/results.jsonl, and write results.csv at the end.

    run_matrix(Plan(tests, out, tier, workers, timeout_s)) -> exit code

The command line resolves the selection once (`conformance.selection`) and starts this in a
process of its own (`python -m conformance run` supervises it, so a dying engine still leaves
results.csv). Here:

- A job is one case with all its backends: a worker builds the case's inputs, moves them to
  its device once and computes the reference there once (conformance/expected.py), then runs
  each backend in turn and sends each test's rows as it finishes. Workers are processes; this
  process is the only one that writes. On a machine without CUDA they are forked (they inherit
  every loaded module); with CUDA they come from a fork server that never touched the GPU (CUDA
  cannot be forked), and worker i takes visible GPU i mod count.
- What runs where beside what is the scheduler's decision (conformance/scheduler.py): jobs are
  granted memory (a test's peak measured by an earlier run on this card, kept in a
  `MemoryRecord` beside Triton's cache, else the memory model's estimate); a worker on CUDA is
  held to its grant, so a test that needs more runs out of memory alone and is run again with a
  larger grant, concurrently with the others. Workers free their cached memory after every
  test; one that still holds memory a test left behind (a backend that keeps its tensors) is
  replaced, and the run says which test left it.
- A worker that dies (a segfault, `os._exit`, a CUDA error that poisons its context) or hangs
  past the backstop (3x the per-call timeout: native code that SIGALRM cannot stop) is replaced;
  its test gets an `error` row that says so and the rest of its job goes back to the queue. A
  test whose case could not be built because its worker's CUDA context failed runs once more
  in a fresh worker before its error stands.
- SIGINT / SIGTERM stop the run: the workers are ended, every test that did not finish gets an
  `error` row ("not run"), and the set is marked interrupted (exit 130 / 143).
- Where the time went: each test's seconds per phase (`runner.PHASES`) come back with its rows;
  run.json and the summary line split the workers' time into them.
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
# What one worker process takes whatever it runs: the CUDA context, cuBLAS's workspace, the
# kernels it loaded, the allocator's slack. Taken off the device's memory before any job's.
WORKER_BASE_BYTES = 2 << 30
# Device memory a worker may keep (its allocator's, after emptying its cache) between tests
# before it is replaced: past it, the base above would not hold.
KEEP_LIMIT_BYTES = 1 << 30
# The device memory the engine hands out (the rest: the driver, other processes, fragments).
USABLE_FRACTION = 0.9
# Memory a worker may still hold after a test, past the least it held after any earlier one,
# before it is replaced (CONFORMANCE_LEAK_LIMIT_MB overrides it).
LEAK_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True)
class Test:
    """One test: a workload (a Shape; preset cases are lowered) run against one backend, or
    against it with a planted fault (conformance/mutants.py)."""

    shape: object  # conformance.shapes.Shape
    backend: str
    module: str = ""  # module:Class of an external backend, '' for a registered one
    fault: str = ""  # a fault of conformance.mutants.FAULTS planted around the backend

    @property
    def name(self) -> str:
        """The backend's name in the rows (a mutant's: `backend~fault`)."""
        return f"{self.backend}~{self.fault}" if self.fault else self.backend

    @property
    def key(self) -> tuple[str, str]:
        return self.shape.id, self.name


@dataclass(frozen=True)
class Plan:
    """A run: its tests, where the result set goes, how many workers, each call's limit.
    `first_catch`: once a test of a backend fails or errors, that backend's tests not yet
    started are dropped (a fault's search, `mutate`); `quiet`: no failure lines at the end."""

    tests: tuple[Test, ...]
    out: str
    tier: str
    workers: int = 1
    timeout_s: float = 300.0
    run_id: str = ""
    first_catch: bool = False
    quiet: bool = False


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


# ---- memory ----------------------------------------------------------------------------------
def needs_of(tests: tuple[Test, ...], record=None) -> list[int]:
    """Bytes each test may hold on its device: its measured peak (`record`, a MemoryRecord of
    this card) where an earlier run measured it, else the memory model's (conformance/memory.py:
    one derivation from the shape's steps, an episode's encoder included)."""
    from conformance.memory import device_bytes
    from conformance.scheduler import MemoryRecord

    needs = []
    for t in tests:
        measured = record.need(MemoryRecord.key(*t.key, t.module)) if record else None
        needs.append(measured if measured is not None else device_bytes(t.shape))
    return needs


def device_memory(workers: int = 0) -> list[int]:
    """Memory the engine may hand out to jobs per device: each visible GPU's (less each of its
    `workers`' base), else the host's RAM."""
    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [
            int(USABLE_FRACTION * torch.cuda.get_device_properties(i).total_memory)
            - len(range(i, workers, gpus)) * WORKER_BASE_BYTES
            for i in range(gpus)
        ]
    return [int(USABLE_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]


def auto_workers(tests: tuple[Test, ...] = ()) -> int:
    """`-n auto`: on the CPU one worker per core (each single-threaded); on GPUs, per GPU as
    many as its share of the cores, and no more than its memory holds with each worker at its
    base plus a typical test of the selection (the median need: bigger jobs wait their turn)."""
    import torch

    cores = os.cpu_count() or 1
    if not torch.cuda.is_available():
        return cores
    gpus = torch.cuda.device_count()
    needs = sorted(needs_of(tests)) or [0]
    per_worker = WORKER_BASE_BYTES + needs[len(needs) // 2]
    by_memory = min(device_memory()) // per_worker
    return gpus * max(1, min(cores // gpus, by_memory))


def held_bytes() -> int:
    """What this process holds: live tensors on its GPU, else its resident memory (Linux)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def kept_bytes() -> int:
    """Device memory this process's allocator still holds (0 off CUDA)."""
    import torch

    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def leak_limit() -> int:
    mb = os.environ.get("CONFORMANCE_LEAK_LIMIT_MB")
    return int(float(mb) * (1 << 20)) if mb else LEAK_LIMIT_BYTES


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
    """Receive a job ([(test index, Test), ...], bytes granted), run its tests in order and
    send (index, rows, seconds per phase, its peak, bytes held, bytes kept) for each (held and
    kept after the job's last test, its case let go; None before); None ends the worker. On
    CUDA the process is held to what it keeps plus the grant (an allocation past it fails here,
    not in a neighbour), and each test's peak is measured (the case's build and reference
    counted in every test of it)."""
    die_with_parent()
    _watch(int(os.environ[ENGINE_PID_ENV]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the engine decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    if workers > 1:  # inductor (flex) compiles in this process, not in a pool per worker
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    from optimized.kernels import interpret_without_cuda

    interpret_without_cuda()
    # A forked worker runs torch single-threaded: GNU OpenMP is not fork-safe, and a parent
    # that has used its thread pool (a test process calling `main`) leaves the child hanging
    # in its first parallel region (PyTorch's DataLoader workers do the same). Workers from the
    # fork server share the cores.
    cuda = torch.cuda.is_available()  # forked where not (as `context()` chose)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers) if cuda else 1)
    if torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    from conformance import runner
    from conformance.mutants import Mutant
    from conformance.schema import environment
    from optimized.backend import get_backend, load_backend

    env = dict(environment(), tier=tier)
    backends: dict[tuple[str, str, str], object] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        job, grant = msg
        base = _hold_to(grant) if cuda else 0
        for k, (i, test) in enumerate(job):
            before = runner.CLOCK.snapshot()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                key = (test.backend, test.module, test.fault)
                if key not in backends:
                    backend = load_backend(test.module) if test.module else get_backend(key[0])
                    backends[key] = Mutant(backend, test.fault) if test.fault else backend
                rows = runner.run_case(
                    test.shape, backends[key], timeout_s=timeout_s, module=test.module
                )
            except KeyboardInterrupt:
                return
            except BaseException as e:
                why = f"harness: {runner.error_reason(e)}"
                rows = [result_row(test.shape, test.name, "harness", Status.ERROR, why)]
                rows[0]["backend_module"] = test.module
            peak = None
            if cuda:
                peak = max(torch.cuda.max_memory_reserved(), runner.build_peak()) - base
            held = kept = None  # mid-job the case is held on purpose: measured between jobs
            if k == len(job) - 1:
                runner.forget_cases()  # the job is done: its case goes
                held, kept = held_bytes(), kept_bytes()
            elif cuda:
                torch.cuda.empty_cache()  # give back what this test's peak left cached
            after = runner.CLOCK.snapshot()
            seconds = {name: after[name] - before[name] for name in after}
            rows = [{**r, **env} for r in rows]
            conn.send((i, rows, seconds, peak, held, kept))
            if poisoned(rows):
                os._exit(3)  # the engine gives the rest of the job to a fresh worker


def _hold_to(grant: int) -> int:
    """Hold this process's CUDA allocator to what it keeps now plus `grant` bytes; returns what
    it keeps (the base the job's peak is measured from)."""
    import torch

    base = torch.cuda.memory_reserved()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + grant) / total))
    return base


def poisoned(rows: list[dict]) -> bool:
    """A CUDA error leaves its process's context unusable: that worker ends after the test."""
    return any("CUDA error" in r["reason"] or "illegal memory access" in r["reason"] for r in rows)


def _built(rows: list[dict]) -> bool:
    """False where the test's case could not be built (its one row says so)."""
    return not (len(rows) == 1 and rows[0]["step"] == "build")


@dataclass
class _Slot:
    """A worker process and when its current test started."""

    proc: mp.Process
    conn: object
    started: float = 0.0
    least_held: int | None = None


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class _Run:
    """The engine's process side: worker processes, their pipes, and the result set; every
    decision is the scheduler's (conformance/scheduler.py)."""

    def __init__(self, plan: Plan, out: Path):
        from conformance.scheduler import MemoryRecord, Scheduler

        self.plan, self.out = plan, out
        self.log = str(out / "workers.log")
        Path(self.log).write_text("")
        self.ctx = context()
        self.n = max(1, min(plan.workers, len(plan.tests)))
        self.record = MemoryRecord(_record_path())
        needs = needs_of(plan.tests, self.record)
        # A job is a case's tests (one reference for them all); in a search (`first_catch`)
        # each test is its own, so a catch drops every test not yet started.
        jobs = [t.key if plan.first_catch else t.shape.id for t in plan.tests]
        self.sched = Scheduler(jobs, needs, device_memory(self.n), self.n)
        self.slots: list[_Slot] = []
        self.done = self.bad = 0
        self.notes: dict = {"leaks": [], "out_of_memory_reruns": [], "run_alone": [],
                            "rebuilt": [], "replaced": 0}  # fmt: skip
        self.limit = leak_limit()
        self.seconds: dict[str, float] = {}
        self.dropped: set[int] = set()  # tests a first catch made needless

    def spawn(self, index: int) -> _Slot:
        parent, child = self.ctx.Pipe()
        args = (child, index, self.n, self.log, self.plan.timeout_s, self.plan.tier)
        proc = self.ctx.Process(target=_worker, args=args, daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def name(self, i: int) -> str:
        return "::".join(self.plan.tests[i].key)

    def record_rows(self, rows: list[dict]) -> None:
        with open(self.out / "results.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self.done += 1
        self.bad += any(r["status"] in (Status.FAIL, Status.ERROR) for r in rows)

    def renew(self, k: int) -> None:
        """A fresh worker in slot `k`, its old one ended."""
        with contextlib.suppress(Exception):
            self.slots[k].conn.send(None)
        self.slots[k].proc.join(10)
        if self.slots[k].proc.is_alive():
            self.slots[k].proc.kill()
        self.slots[k] = self.spawn(k)

    def hand_out(self) -> None:
        for k, slot in enumerate(self.slots):
            if self.sched.busy(k):
                continue
            job = self.sched.assign(k)
            if job is None:
                continue
            if job.alone:
                self.notes["run_alone"] += [self.name(i) for i in job.tests]
            slot.started = time.time()
            try:
                slot.conn.send(([(i, self.plan.tests[i]) for i in job.tests], job.grant))
            except OSError:  # it ended before it took the job (its pipe is gone): a fresh one
                self.sched.replaced(k)
                self.renew(k)

    def received(self, k: int, msg) -> None:
        from conformance.runner import is_oom_reason

        i, rows, spent, peak, held, kept = msg
        for name, value in spent.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        slot = self.slots[k]
        slot.started = time.time()
        oom = any(r["status"] == Status.ERROR and is_oom_reason(r["reason"]) for r in rows)
        if poisoned(rows) and not _built(rows) and self.sched.retry(k, i):
            self.notes["rebuilt"].append(self.name(i))  # its context failed: a fresh worker
            self.renew(k)
            return
        if oom:
            if self.sched.out_of_memory(k, i, kept or 0):
                self.notes["out_of_memory_reruns"].append(self.name(i))
            else:
                for r in rows:
                    if r["status"] == Status.ERROR and is_oom_reason(r["reason"]):
                        r["reason"] += " (also with its device's whole budget granted)"
                self.record_rows(rows)
                self.caught(i, rows)
        else:
            self.sched.finished(k, i, peak if _built(rows) else None, kept or 0)
            self.record_rows(rows)
            self.caught(i, rows)
        leaked = kept_too_much = False
        if held is not None:  # between jobs: what the worker holds now, it keeps
            slot.least_held = held if slot.least_held is None else min(slot.least_held, held)
            leaked = held - slot.least_held > self.limit
            kept_too_much = kept > KEEP_LIMIT_BYTES
        if leaked:
            self.notes["leaks"].append(dict(test=self.name(i), held_bytes=held - slot.least_held))
        if kept_too_much:
            self.notes["replaced"] += 1
        if leaked or poisoned(rows) or kept_too_much:  # a fresh one instead
            self.sched.replaced(k)
            self.renew(k)

    def caught(self, i: int, rows: list[dict]) -> None:
        """With `first_catch`, a failing or erroring test drops its backend's tests not yet
        started: that search is over."""
        if not self.plan.first_catch or not any(
            r["status"] in (Status.FAIL, Status.ERROR) for r in rows
        ):
            return
        name = self.plan.tests[i].name
        self.dropped |= self.sched.drop(
            {j for j, t in enumerate(self.plan.tests) if t.name == name}
        )

    def lost(self, k: int, why: str) -> None:
        """The worker of slot `k` is gone mid-test: an error row for that test; the rest of its
        job goes back to the queue; a fresh worker in its place."""
        i = self.sched.lost(k)
        if i is not None:
            test = self.plan.tests[i]
            row = result_row(test.shape, test.name, "crash", Status.ERROR, why)
            self.record_rows([{**row, "backend_module": test.module}])
            self.caught(i, [row])
        self.slots[k] = self.spawn(k)

    def loop(self) -> None:
        backstop = BACKSTOP_FACTOR * self.plan.timeout_s
        t0 = last = time.time()
        self.slots = [self.spawn(i) for i in range(self.n)]
        while not self.sched.done:
            self.hand_out()
            busy = [s for k, s in enumerate(self.slots) if self.sched.busy(k)]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
            for k, s in enumerate(self.slots):
                if not self.sched.busy(k):
                    continue
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None:
                        self.received(k, msg)
                        continue
                if s.conn in ready or s.proc.sentinel in ready:
                    s.proc.join(5)
                    self.lost(k, f"crash: the test process died (exit code {s.proc.exitcode})")
                elif time.time() - s.started > backstop:
                    s.proc.kill()
                    s.proc.join(5)
                    self.lost(k, f"timeout: no result after {backstop:g} s; the worker was killed")
            if time.time() - last > PROGRESS_EVERY_S:
                last = time.time()
                left = (last - t0) / max(self.done, 1) * (len(self.plan.tests) - self.done)
                print(
                    f"[conformance] {self.done}/{len(self.plan.tests)} tests, {self.bad} failed "
                    f"or errored, ~{left:.0f} s left",
                    flush=True,
                )

    def stop(self, complete: bool) -> None:
        for s in self.slots:
            with contextlib.suppress(Exception):
                s.conn.send(None) if complete else s.proc.kill()
        for s in self.slots:
            s.proc.join(10)
            if s.proc.is_alive():
                s.proc.kill()
        tests = self.plan.tests
        self.record.update({self.record.key(*tests[i].key, tests[i].module): peak
                            for i, peak in self.sched.measured.items()})  # fmt: skip


def _record_path():
    """Where this card's measured peaks are kept (None off CUDA: nothing is measured)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from conformance.scheduler import MemoryRecord
    from conformance.schema import device_kind

    return MemoryRecord.where(device_kind(torch.cuda.get_device_name(0)))


def run_matrix(plan: Plan) -> int:
    """Run the plan (the engine process's body); returns its exit code: 0 nothing failed or
    errored, 1 something did, 130/143 interrupted."""
    from conformance.results import finalize_run, start_run, summary_lines
    from conformance.runner import PHASES

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
    run = _Run(plan, out)
    run.seconds.update(dict.fromkeys(PHASES, 0.0))
    state, code = "complete", 0
    try:
        run.loop()
    except _Stopped as e:
        state, code = "interrupted", SIGNAL_EXIT[e.signum]
    finally:
        run.stop(state == "complete")
    for sig in SIGNAL_EXIT:  # finishing the result set is not interrupted again
        signal.signal(sig, signal.SIG_IGN)
    extra = dict(workers=run.n, seconds=run.seconds, dropped=len(run.dropped), **run.notes)
    skip = {plan.tests[i].key for i in run.dropped}
    counts = finalize_run(out, state, plan, extra, skip)
    for line in summary_lines(out, counts, state, failures=not plan.quiet):
        print(line, flush=True)
    if code:
        return code
    return 1 if counts.get(Status.FAIL, 0) or counts.get(Status.ERROR, 0) else 0


def engine_main(plan: Plan) -> None:
    """The engine process's entry point (its exit code is the result)."""
    sys.exit(run_matrix(plan))
