"""The matrix engine: run every test (workload × backend) of a selection in worker processes,
stream their rows to OUT/results.jsonl, and write results.csv at the end.

    run_matrix(Plan(tests, out, tier, workers, timeout_s)) -> exit code

The command line resolves the selection once (`conformance.selection`) and starts this in a
process of its own (`python -m conformance run` supervises it, so a dying engine still leaves
results.csv). Here:

- A job is one case with all its backends: a worker builds the case's inputs and runs the
  reference once, then each backend in turn, and sends each test's rows as it finishes. Workers
  are processes; this process is the only one that writes. On a machine without CUDA they are
  forked (they inherit every loaded module); with CUDA they come from a fork server that never
  touched the GPU (CUDA cannot be forked), and worker i takes visible GPU i mod count.
- Memory: each job's need is estimated from its shape before it starts (`job_need`); a worker
  takes a job only while the jobs running on its device fit its memory together (a job alone
  always may). A test whose rows say the device ran out of memory anyway is run again alone,
  once every other test is done, and is an `error` only if it fails alone too. Workers free
  their cached memory after every test; one that still holds memory a test left behind (a
  backend that keeps its tensors) is replaced, and the run says which test left it.
- A worker that dies (a segfault, `os._exit`, a CUDA error that poisons its context) or hangs
  past the backstop (3x the per-call timeout: native code that SIGALRM cannot stop) is replaced;
  its test gets an `error` row that says so and the rest of its job goes back to the queue.
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
from dataclasses import dataclass, field
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


# ---- memory ----------------------------------------------------------------------------------
def job_need(shapes) -> int:
    """Bytes a job (one case, its backends in turn) may hold on its device at once: the
    reference's and one backend's copy of the inputs (`runner.COPIES` counts the host's
    pristine copy too) and the dense scores a step's attention may form (float32, a few
    temporaries: what a gather-then-SDPA backend such as `torch` allocates)."""
    from conformance.runner import COPIES

    need = 0
    for s in shapes:
        q = s.encoder_seq_lens if s.attn_kind == "encoder" else s.query_lens
        kv = list(s.encoder_seq_lens or ()) if s.attn_kind != "decoder" else []
        if s.attn_kind in ("decoder", "episode"):
            ctx = s.context_lens or (0,) * len(s.query_lens)
            kv.append(max(c + n for c, n in zip(ctx, s.query_lens)) + s.decode_steps)
        scores = len(q) * s.num_heads * max(q, default=1) * max(kv, default=1) * 4
        need = max(need, COPIES * s.footprint() + 3 * scores)
    return need


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
    base plus a typical job of the selection (the median need: bigger jobs wait their turn)."""
    import torch

    cores = os.cpu_count() or 1
    if not torch.cuda.is_available():
        return cores
    gpus = torch.cuda.device_count()
    needs = sorted(job_need([t.shape]) for t in tests) or [0]
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
    """Receive a job ([(test index, Test), ...]), run its tests in order and send (index, rows,
    seconds per phase, bytes held after it) for each; None ends the worker."""
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
    from conformance.runner import CLOCK, error_reason, run_case
    from conformance.schema import environment
    from optimized.backend import get_backend, load_backend

    env = dict(environment(), tier=tier)
    backends: dict[tuple[str, str], object] = {}
    while True:
        job = conn.recv()
        if job is None:
            return
        for i, test in job:
            before = CLOCK.snapshot()
            try:
                key = (test.backend, test.module)
                if key not in backends:
                    backends[key] = (
                        load_backend(test.module) if test.module else get_backend(key[0])
                    )
                rows = run_case(test.shape, backends[key], timeout_s=timeout_s, module=test.module)
            except KeyboardInterrupt:
                return
            except BaseException as e:
                why = f"harness: {error_reason(e)}"
                rows = [result_row(test.shape, test.backend, "harness", Status.ERROR, why)]
                rows[0]["backend_module"] = test.module
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what this test's peak left cached
            after = CLOCK.snapshot()
            seconds = {k: after[k] - before[k] for k in after}
            conn.send((i, [{**r, **env} for r in rows], seconds, held_bytes(), kept_bytes()))
            if poisoned(rows):
                os._exit(3)  # the engine gives the rest of the job to a fresh worker


def poisoned(rows: list[dict]) -> bool:
    """A CUDA error leaves its process's context unusable: that worker ends after the test."""
    return any("CUDA error" in r["reason"] or "illegal memory access" in r["reason"] for r in rows)


@dataclass
class _Slot:
    """A worker process, the tests of its job still to come (empty: idle), and its memory."""

    proc: mp.Process
    conn: object
    device: int = 0
    tests: list[int] = field(default_factory=list)
    need: int = 0
    started: float = 0.0
    least_held: int | None = None


@dataclass
class _Jobs:
    """The tests to run, as jobs of one case each, in plan order; and the tests that ran out
    of memory beside others, to run again alone at the end."""

    queue: list[list[int]]
    needs: dict[int, int]  # a job's need, by its first test
    deferred: list[int] = field(default_factory=list)
    alone: set[int] = field(default_factory=set)  # tests being run again alone

    @classmethod
    def of(cls, tests: tuple[Test, ...]) -> _Jobs:
        queue: list[list[int]] = []
        for i, t in enumerate(tests):
            if queue and tests[queue[-1][0]].shape.id == t.shape.id:
                queue[-1].append(i)
            else:
                queue.append([i])
        needs = {job[0]: job_need([tests[job[0]].shape]) for job in queue}
        return cls(queue, needs)

    def take(self, in_use: int, budget: int) -> list[int] | None:
        """The first queued job that fits beside `in_use` bytes (any job when nothing runs)."""
        for k, job in enumerate(self.queue[:256]):
            if in_use == 0 or in_use + self.needs.get(job[0], 0) <= budget:
                return self.queue.pop(k)
        return None


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def run_matrix(plan: Plan) -> int:
    """Run the plan (the engine process's body); returns its exit code: 0 nothing failed or
    errored, 1 something did, 130/143 interrupted."""
    from conformance.results import finalize_run, start_run, summary_lines
    from conformance.runner import PHASES, is_oom_reason

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
    jobs = _Jobs.of(plan.tests)
    n = max(1, min(plan.workers, len(plan.tests)))
    budgets = device_memory(n)
    in_use = [0] * len(budgets)
    slots: list[_Slot] = []
    done, bad, last = 0, 0, time.time()
    t0 = time.time()
    state, code = "complete", 0
    seconds = dict.fromkeys(PHASES, 0.0)
    notes: dict = {"leaks": [], "run_alone": [], "replaced": 0}
    limit = leak_limit()

    def spawn(index: int) -> _Slot:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker, args=(child, index, n, log, plan.timeout_s, plan.tier), daemon=True
        )
        proc.start()
        child.close()
        return _Slot(proc, parent, device=index % len(budgets))

    def record(rows: list[dict]) -> None:
        nonlocal done, bad
        with open(out / "results.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        done += 1
        bad += any(r["status"] in (Status.FAIL, Status.ERROR) for r in rows)

    def release(slot: _Slot) -> None:
        in_use[slot.device] -= slot.need
        slot.tests, slot.need = [], 0

    def requeue(slot: _Slot, tests: list[int]) -> None:
        """`tests` (the rest of the slot's job) go back to the front of the queue."""
        if tests:
            jobs.queue.insert(0, tests)
            jobs.needs[tests[0]] = slot.need
        release(slot)

    def renew(k: int) -> None:
        """A fresh worker in slot `k`, its old one ended."""
        with contextlib.suppress(Exception):
            slots[k].conn.send(None)
        slots[k].proc.join(10)
        if slots[k].proc.is_alive():
            slots[k].proc.kill()
        slots[k] = spawn(k)

    def lost(slot: _Slot, why: str) -> None:
        """The worker of `slot` is gone mid-test: an error row for that test; the rest of its
        job goes back to the queue."""
        test = plan.tests[slot.tests[0]]
        row = result_row(test.shape, test.backend, "crash", Status.ERROR, why)
        record([{**row, "backend_module": test.module}])
        requeue(slot, slot.tests[1:])

    def received(k: int, slot: _Slot, msg) -> None:
        i, rows, spent, held, kept = msg
        for name, value in spent.items():
            seconds[name] = seconds.get(name, 0.0) + value
        oom = any(r["status"] == Status.ERROR and is_oom_reason(r["reason"]) for r in rows)
        if oom and i not in jobs.alone:
            jobs.deferred.append(i)  # beside others: run it again alone at the end
        else:
            if i in jobs.alone:
                notes["run_alone"].append(plan.tests[i].shape.id + "::" + plan.tests[i].backend)
                for r in rows:
                    if r["status"] == Status.ERROR and is_oom_reason(r["reason"]):
                        r["reason"] += " (also when run alone, after every other test)"
            record(rows)
        slot.tests.pop(0)
        slot.started = time.time()
        if not slot.tests:
            release(slot)
        slot.least_held = held if slot.least_held is None else min(slot.least_held, held)
        leaked = held - slot.least_held > limit
        if kept > KEEP_LIMIT_BYTES:
            notes["replaced"] += 1
        if leaked or poisoned(rows) or kept > KEEP_LIMIT_BYTES:  # a fresh one instead
            test = plan.tests[i]
            if leaked:
                notes["leaks"].append(
                    dict(test=f"{test.shape.id}::{test.backend}", held_bytes=held - slot.least_held)
                )
            if slot.tests:
                requeue(slot, slot.tests)
            renew(k)

    try:
        slots = [spawn(i) for i in range(n)]
        backstop = BACKSTOP_FACTOR * plan.timeout_s
        while jobs.queue or jobs.deferred or any(s.tests for s in slots):
            if not jobs.queue and jobs.deferred and not any(s.tests for s in slots):
                if not jobs.alone:  # fresh workers first: idle ones hold no device memory
                    for k in range(len(slots)):
                        renew(k)
                i = jobs.deferred.pop(0)  # every other test is done: this one runs alone
                jobs.alone.add(i)
                jobs.queue.append([i])
                jobs.needs[i] = max(budgets)
            for k, s in enumerate(slots):  # hand out work
                if s.tests or not jobs.queue:
                    continue
                if jobs.alone and any(x.tests for x in slots):
                    break
                job = jobs.take(in_use[s.device], budgets[s.device])
                if job is None:
                    continue
                s.tests, s.need, s.started = list(job), jobs.needs.get(job[0], 0), time.time()
                in_use[s.device] += s.need
                try:
                    s.conn.send([(i, plan.tests[i]) for i in job])
                except OSError:  # it ended before it took the job (its pipe is gone): a fresh one
                    requeue(s, s.tests)
                    renew(k)
            busy = [s for s in slots if s.tests]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
            for k, s in enumerate(slots):
                if not s.tests:
                    continue
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None:
                        received(k, s, msg)
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
    extra = dict(workers=n, seconds=seconds, **notes)
    counts = finalize_run(out, state, plan, extra)
    for line in summary_lines(out, counts, state):
        print(line, flush=True)
    if code:
        return code
    return 1 if counts.get(Status.FAIL, 0) or counts.get(Status.ERROR, 0) else 0


def engine_main(plan: Plan) -> None:
    """The engine process's entry point (its exit code is the result)."""
    sys.exit(run_matrix(plan))
