"""The engine's policy, without processes: which job next, on which device, beside what.

A job is one case with its selected backends, run in order by one worker (they share the case's
inputs and reference). Memory is granted, not hoped for: each test needs `needs[i]` bytes of
its device (its peak as measured by an earlier run on this kind of card, `MemoryRecord`, else
the memory model's estimate, conformance/memory.py), and a job is granted the largest need of
its tests. A worker starts a job only while the grants of the jobs running on its device, and
the memory idle and busy workers keep between jobs, fit the device's budget. The worker holds
its process to its grant, so a test that needs more fails alone, not its neighbours.

- A test out of memory is deferred with twice its grant (at most the device's budget). Once the
  queue is empty, deferred tests are regrouped by case and run concurrently, each job under its
  own grant; one out of memory under the whole budget is an error.
- A job that needs more than half its device runs alone on it (nothing else starts there while
  it runs, and it starts when nothing else runs there); such jobs run after the others.
- A worker that dies or hangs mid-test: that test is lost (the engine records its error row),
  the rest of its job goes back to the front of the queue. A test whose case could not be built
  because its worker's CUDA context failed runs once more, in a fresh worker.

Tested on a fake device (conformance/tests/test_scheduler.py); the engine (conformance/engine.py)
only moves jobs and results between this and the worker processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# A measured peak is granted with this margin (allocator rounding differs between runs).
MEASURED_MARGIN = 1.15
MEASURED_SLACK = 32 << 20


@dataclass(frozen=True)
class Assignment:
    """A job for a worker: its tests (indices into the plan), in order, and the bytes granted."""

    tests: tuple[int, ...]
    grant: int
    alone: bool = False


@dataclass
class _Job:
    tests: list[int]
    grant: int
    alone: bool = False


@dataclass
class _Worker:
    device: int
    job: _Job | None = None
    kept: int = 0  # what its allocator holds between jobs (reported after each test)


@dataclass
class Scheduler:
    """`cases[i]`: the case of test i (its id, or any key: consecutive tests of one case make
    a job); `needs[i]`: its bytes; `budgets[d]`: what device d hands out; `workers`: how many
    (worker w runs on device w mod the devices)."""

    cases: Sequence
    needs: list[int]
    budgets: Sequence[int]
    workers: int
    lookahead: int = 256
    queue: list[_Job] = field(default_factory=list)
    later: list[_Job] = field(default_factory=list)  # jobs that run alone, after the others
    deferred: dict = field(default_factory=dict)  # case -> its tests out of memory
    measured: dict[int, int] = field(default_factory=dict)  # test -> its peak, as reported
    retried: set[int] = field(default_factory=set)
    finals: set[int] = field(default_factory=set)  # tests whose grant was the whole budget
    _workers: list[_Worker] = field(default_factory=list)

    def __post_init__(self):
        self.needs = [min(n, min(self.budgets)) for n in self.needs]  # at most a whole device
        self._workers = [_Worker(w % len(self.budgets)) for w in range(self.workers)]
        jobs: list[list[int]] = []
        for i, case in enumerate(self.cases):
            if jobs and self.cases[jobs[-1][0]] == case:
                jobs[-1].append(i)
            else:
                jobs.append([i])
        for tests in jobs:
            self._enqueue(tests)

    # ---- what the engine asks ---------------------------------------------------------------
    def in_use(self, device: int) -> int:
        """Bytes of `device` granted to running jobs or kept by its workers."""
        return sum(w.kept + (w.job.grant if w.job else 0) for w in self._on(device))

    def busy(self, worker: int) -> bool:
        return self._workers[worker].job is not None

    def remaining(self, worker: int) -> list[int]:
        job = self._workers[worker].job
        return list(job.tests) if job else []

    @property
    def done(self) -> bool:
        return not (self.queue or self.later or self.deferred) and not any(
            w.job for w in self._workers
        )

    def assign(self, worker: int) -> Assignment | None:
        """The job `worker` (idle) runs next, or None: nothing queued fits beside what runs on
        its device now."""
        w = self._workers[worker]
        assert w.job is None, f"worker {worker} is busy"
        if not self.queue and self.deferred:
            self._regroup()
        if any(o.job is not None and o.job.alone for o in self._on(w.device)):
            return None  # a job that runs alone is running there
        room = self.budgets[w.device] - self.in_use(w.device)
        idle = not any(o.job for o in self._on(w.device))
        for k, job in enumerate(self.queue[: self.lookahead]):
            if job.grant <= room or idle:  # beside the running ones; alone, any job may
                return self._start(w, self.queue.pop(k))
        if not self.queue and self.later and idle:
            return self._start(w, self.later.pop(0))
        return None

    def finished(self, worker: int, test: int, peak: int | None = None, kept: int = 0) -> None:
        """`test` (the first of the worker's job) ended with a row; `peak`: the bytes it
        needed, as measured (None: not measured, off CUDA); `kept`: what the worker holds now."""
        w = self._pop(worker, test)
        if peak is not None:
            self.measured[test] = peak
        if w.job is None:  # between jobs: what it keeps counts against its device
            w.kept = kept

    def out_of_memory(self, worker: int, test: int, kept: int = 0) -> bool:
        """`test` ran out of memory under its grant: True when it is deferred with a larger
        grant (its row is not the last word), False when its grant was its device's whole
        budget (the error row stands)."""
        w = self._workers[worker]
        grant, budget = w.job.grant, self.budgets[w.device]
        self._pop(worker, test)
        if w.job is None:
            w.kept = kept
        if grant >= budget or test in self.finals:
            return False
        self.needs[test] = min(budget, max(2 * grant, 2 * self.needs[test]))
        if self.needs[test] >= budget:
            self.finals.add(test)
        self.deferred.setdefault(self.cases[test], []).append(test)
        return True

    def lost(self, worker: int) -> int | None:
        """The worker died or hung: the test it was running (for the engine's error row); the
        rest of its job goes back to the front of the queue. Its replacement keeps nothing."""
        w = self._workers[worker]
        tests = list(w.job.tests) if w.job else []
        self._requeue(w, tests[1:])
        return tests[0] if tests else None

    def retry(self, worker: int, test: int) -> bool:
        """`test` could not be built because its worker's CUDA context failed: True when it
        (with the rest of the job) goes back to the front of the queue for a fresh worker,
        False when it already had its second chance."""
        w = self._workers[worker]
        if test in self.retried:
            return False
        self.retried.add(test)
        self._requeue(w, list(w.job.tests))
        return True

    def replaced(self, worker: int) -> None:
        """The engine replaces the worker after a test (it kept memory, or its context failed):
        the rest of its job goes back to the front of the queue, and the fresh one keeps
        nothing."""
        w = self._workers[worker]
        self._requeue(w, list(w.job.tests) if w.job else [])

    def drop(self, tests: set[int]) -> set[int]:
        """Those of `tests` not started yet leave the run (queued or deferred); returns them."""
        gone = set()
        for jobs in (self.queue, self.later):
            for job in jobs:
                gone |= {t for t in job.tests if t in tests}
                job.tests = [t for t in job.tests if t not in tests]
            jobs[:] = [job for job in jobs if job.tests]
        for case in list(self.deferred):
            gone |= {t for t in self.deferred[case] if t in tests}
            self.deferred[case] = [t for t in self.deferred[case] if t not in tests]
            if not self.deferred[case]:
                del self.deferred[case]
        return gone

    # ---- inside -----------------------------------------------------------------------------
    def _on(self, device: int) -> list[_Worker]:
        return [w for w in self._workers if w.device == device]

    def _alone(self, grant: int) -> bool:
        return 2 * grant > min(self.budgets)

    def _enqueue(self, tests: list[int], front: bool = False) -> None:
        if not tests:
            return
        grant = max(self.needs[i] for i in tests)
        job = _Job(list(tests), grant, self._alone(grant))
        if job.alone:
            self.later.insert(0, job) if front else self.later.append(job)
        else:
            self.queue.insert(0, job) if front else self.queue.append(job)

    def _start(self, w: _Worker, job: _Job) -> Assignment:
        w.job = job
        return Assignment(tuple(job.tests), job.grant, job.alone)

    def _pop(self, worker: int, test: int) -> _Worker:
        w = self._workers[worker]
        assert w.job is not None and w.job.tests and w.job.tests[0] == test, (
            f"worker {worker} reported test {test}, expected {w.job and w.job.tests[:1]}"
        )
        w.job.tests.pop(0)
        if not w.job.tests:
            w.job = None
        return w

    def _requeue(self, w: _Worker, tests: list[int]) -> None:
        w.job, w.kept = None, 0
        self._enqueue(tests, front=True)

    def _regroup(self) -> None:
        """Deferred tests, one job per case (in case order), under their new needs."""
        for case in sorted(self.deferred, key=lambda c: min(self.deferred[c])):
            self._enqueue(sorted(self.deferred[case]))
        self.deferred.clear()


# ---- what earlier runs measured ------------------------------------------------------------
class MemoryRecord:
    """Each test's measured peak (bytes) on one kind of card, by (case id, backend, module),
    kept on disk beside Triton's compile cache (`where()`), so a warm run admits by
    measurement. A record that cannot be read or written is no record (the model steps in)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.peaks: dict[str, int] = {}
        if path is not None:
            try:
                self.peaks = {k: int(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                self.peaks = {}

    @staticmethod
    def key(case_id: str, backend: str, module: str = "") -> str:
        return f"{case_id}::{backend}::{module}"

    @staticmethod
    def where(device_kind: str) -> Path:
        """`<Triton's cache>/encdec-attn-memory/<card>.json` (TRITON_CACHE_DIR, else
        ~/.triton/cache)."""
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".triton", "cache"
        )
        return Path(base) / "encdec-attn-memory" / f"{device_kind}.json"

    def need(self, key: str) -> int | None:
        """The grant for a test measured before: its peak with a margin; None if unmeasured."""
        peak = self.peaks.get(key)
        return None if peak is None else int(MEASURED_MARGIN * peak) + MEASURED_SLACK

    def update(self, found: dict[str, int]) -> None:
        """Merge new measurements and write the record (atomically; errors ignored)."""
        if not found or self.path is None:
            return
        self.peaks.update(found)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.peaks, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass
