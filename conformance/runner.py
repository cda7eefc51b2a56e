"""Running one case against one backend: every step compared with the reference, cache checks,
input checks, metamorphic checks, and one result row per step.

Fail closed. Every call into backend code (`unavailable_reason`, `device`,
`not_supported_reasons`, `forward`) runs isolated (`guarded`): whatever it raises, `SystemExit`
included, becomes an `error` row naming the exception's type; only KeyboardInterrupt (the
user's Ctrl-C, or SIGTERM turned into one by the command line) stops the run. The per-call
timeout is a BaseException, so a backend's `except Exception` cannot swallow it, and a call that
returns after its limit anyway is an error all the same. A case is built and its reference
computed once for all its backends (`case_run`, conformance/expected.py: on the device, kept
until the next case); each backend gets its own copy of the inputs, cloned there; after
`forward` they must be bit-for-bit unchanged. A reference that is not finite makes every row of
its step an error. Nothing here turns an unknown into a pass or a skip.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from conformance import memory
from conformance.cases import Case, lower
from conformance.compare import bitwise_equal, compare_caches, compare_output
from conformance.expected import (
    CaseRun,
    Expected,
    ExpectedCaches,
    expect_step,
    steps_of,
    synchronize,
)
from conformance.schema import Status, result_row
from conformance.workloads import Episode, Step, copy_caches
from reference.fp8 import FP8_MAX

__all__ = ["Expected", "ExpectedCaches", "expect_step", "run_case", "steps_of"]

DEFAULT_TIMEOUT_S = 300.0
# Where a worker's time goes (seconds this process spent in each, summed over its tests): the
# inputs built and moved, the reference, the backends' calls (their compiles included), the
# comparisons. `compile` is the part of `backend` Triton spent compiling (a cold cache).
PHASES = ("inputs", "reference", "backend", "compile", "comparison")


class Clock:
    """Seconds per phase in this process; the engine's workers send each test's share."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:  # Triton may compile on a thread pool
            self.seconds[name] += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


CLOCK = Clock()


def watch_compiles() -> None:
    """Count Triton's compiles (what its disk cache did not hold) into `CLOCK`, once per
    process. Compiles run in this process (our kernels, xFormers' Triton ones) are counted;
    inductor's, in its own compile workers, are not."""
    try:
        from triton import knobs
    except ImportError:
        return
    if getattr(watch_compiles, "done", False):
        return
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if not cache_hit:
            took = times.ir_initialization + sum(d for _, d in times.lowering_stages)
            CLOCK.add("compile", (took + times.store_results) / 1e6)
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times,
                     cache_hit=cache_hit)  # fmt: skip

    knobs.compilation.listener = listener
    watch_compiles.done = True


class CaseTimeout(BaseException):
    """A backend call ran past its limit. A BaseException: `except Exception` does not catch it."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM; no-op elsewhere)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"timeout: no result after {seconds:g} s")

    try:
        old = signal.signal(signal.SIGALRM, fire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def guarded(fn, timeout_s: float | None = None, what: str = ""):
    """(fn(), "") or (None, reason): everything fn raises is caught (SystemExit too), except
    KeyboardInterrupt. With `timeout_s`, a call that outlives it is an error even when the
    backend caught the alarm and returned."""
    t0 = time.perf_counter()
    try:
        with time_limit(timeout_s):
            value = fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        return None, (f"{what} raised: " if what else "") + error_reason(e)
    took = time.perf_counter() - t0
    if timeout_s and took > timeout_s:
        return None, (
            f"timeout: the call took {took:.1f} s (limit {timeout_s:g} s) and returned anyway: "
            "the backend swallowed the timeout"
        )
    return value, ""


def machine_memory() -> list[tuple[str, int]]:
    """(what, bytes) of every memory a case must fit: this host's RAM (cases are built there),
    and the GPU's where there is one (the reference and the backends run there)."""
    import os

    found = [("host RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]
    if torch.cuda.is_available():
        found.append(("GPU memory", torch.cuda.get_device_properties(0).total_memory))
    return found


def memory_problem(shape) -> str:
    """Why `shape` (a conformance Shape) cannot be held by this machine ('' when it can), from
    its fields alone (conformance/memory.py), before anything is allocated."""
    return memory.problem(shape, machine_memory())


def check_fits(shapes, where: str) -> None:
    """A user's shapes (`where`: the option that gave them) that this machine cannot hold are
    their mistake: a ValueError naming the first (exit 2), before anything is allocated."""
    for s in shapes:
        problem = memory_problem(s)
        if problem:
            raise ValueError(f"{where}: {problem}")


def reference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# One retry after freeing this process's cached blocks; a lasting one becomes an `error` row,
# which the engine runs again with a larger grant (conformance/scheduler.py).
OOM_RETRY_WAITS_S = (0.0,)


# A full device says so in these words too: a context or a cuBLAS handle it cannot create.
OOM_WORDS = ("out of memory", "cublas_status_alloc_failed", "busy or unavailable")


def is_oom_reason(reason: str) -> bool:
    """A row's reason says the device ran out of memory (`error_reason` of an OOM)."""
    return any(w in reason.lower() for w in OOM_WORDS)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e)
    )


def retry_on_oom(fn, device: torch.device):
    """fn(); on CUDA out-of-memory, free the cache, wait and retry (OOM_RETRY_WAITS_S)."""
    for wait in (*OOM_RETRY_WAITS_S, None):
        try:
            return fn()
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            if wait is None or device.type != "cuda" or not _is_oom(e):
                raise
            _recover(device)
            time.sleep(wait)
    raise AssertionError("unreachable")


_CASES: dict[tuple, CaseRun] = {}
_BUILD_PEAK = [0]  # the allocator's peak when the kept case was built (CUDA), for the engine


def case_run(shape, build_device: str = "cpu") -> CaseRun:
    """The case on the reference's device with every step's answer (conformance/expected.py),
    built once for all its backends: the last one is kept (a case's backends run one after
    another), `forget_cases` lets it go."""
    key = (shape.id, str(build_device), shape.content_hash)
    if key not in _CASES:
        forget_cases()
        dev = reference_device()
        _CASES[key] = retry_on_oom(lambda: CaseRun(shape, dev, build_device, CLOCK), dev)
        if dev.type == "cuda":
            _BUILD_PEAK[0] = torch.cuda.max_memory_reserved(dev)
    return _CASES[key]


def build_peak() -> int:
    """The CUDA allocator's peak (reserved bytes) while the kept case was built (0: none)."""
    return _BUILD_PEAK[0] if _CASES else 0


def forget_cases() -> None:
    """Free the kept case (its inputs and answers on the device)."""
    _CASES.clear()
    _recover(reference_device())


def permute_blocks(step: Step, seed: int) -> Step:
    """The same step with its physical blocks shuffled (tables and slots moved with them)."""
    key_cache, value_cache = step.kv_cache
    num_blocks, bs = key_cache.shape[:2]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + 1))
    new_k, new_v = copy_caches(step.kv_cache)  # the same layout (every block rewritten below)
    new_k[perm.to(key_cache.device)] = key_cache
    new_v[perm.to(value_cache.device)] = value_cache
    md = step.metadata
    tables, slots = md.tables_for(step.attn_kind)
    p = perm.to(tables.device)
    new_tables = p[tables.long()].to(tables.dtype)
    new_slots = torch.where(
        slots >= 0, p[(slots // bs).clamp(min=0).long()] * bs + slots % bs, slots
    ).to(slots.dtype)
    names = (
        ("block_tables", "slot_mapping")
        if step.attn_kind.value == "decoder"
        else ("cross_block_tables", "cross_slot_mapping")
    )
    md = replace(md, **dict(zip(names, (new_tables, new_slots))))
    return replace(step, metadata=md, kv_cache=(new_k, new_v))


def error_reason(e: BaseException) -> str:
    """One line naming what went wrong: the exception's type and the first line of its text."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    if isinstance(e, CaseTimeout):
        return msg
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"out of memory: {msg}"
    if isinstance(e, ValueError):
        return f"input rejected: {msg}"
    return f"runtime error: {type(e).__name__}: {msg}"


def changed_inputs(step: Step, pristine: Step) -> list[str]:
    """Names of the inputs (not the caches, which a step writes) whose bits differ from the
    pristine copy: a backend must not modify its inputs. Compared where `pristine` lives,
    read once."""
    names, same = [], []
    for name in ("query", "key", "value"):
        a, b = getattr(step, name), getattr(pristine, name)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            names.append(name)
        elif a is not None:
            same.append((name, bitwise_equal(a, b).all()))
    for name in ("block_tables", "slot_mapping", "cross_block_tables", "cross_slot_mapping"):
        a, b = getattr(step.metadata, name), getattr(pristine.metadata, name)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            names.append(name)
        elif a is not None:
            same.append((name, (a.to(b.device) == b).all()))
    if same:
        ok = torch.stack([x for _, x in same]).tolist()
        names += [name for (name, _), good in zip(same, ok) if not good]
    return names


def run_case(
    case: Case,
    backend,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    metamorphic: bool = True,
    rerun: bool | None = None,
    module: str = "",
    build_device: str = "cpu",
) -> list[dict]:
    """All rows of `case` × `backend`: one per step, plus `permuted` (block permutation must not
    change the output) and `rerun` (a second run must be bitwise identical; folded into
    `permuted` where that one compares bits). The case is built and its reference computed
    once for all its backends (`case_run`), and only for a backend that can run here.
    `module`: the backend's --backend-module spec ('' for a registered one), for its rows."""
    name = str(backend.name)
    case = lower(case) if isinstance(case, Case) else case  # the rows see shapes only

    def row(sname, status, reason="", *a, **kw):
        return result_row(case, name, sname, status, reason, *a, backend_module=module, **kw)

    snames = [_step_name(i, k) for i, k in enumerate(case.step_kinds())]
    too_big = memory_problem(case)
    if too_big:  # never allocated: a skip that says why (a cases file is refused up front)
        return [row(s, Status.SKIP, too_big) for s in snames]
    why, problem = guarded(backend.unavailable_reason, what="unavailable_reason()")
    if not problem and why is not None and not isinstance(why, str):
        problem = f"unavailable_reason() returned {type(why).__name__}, expected str or None"
    if problem:
        return [row(s, Status.ERROR, problem) for s in snames]
    if why:
        return [row(s, Status.SKIP, f"not supported: {why}") for s in snames]
    device, problem = guarded(lambda: torch.device(backend.device()), what="device()")
    if problem:
        return [row(s, Status.ERROR, problem) for s in snames]
    try:
        run = case_run(case, build_device)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        return [row("build", Status.ERROR, f"case could not be built: {error_reason(e)}")]
    expected = run.expected_for(backend.capabilities.fp8_prefill_reads_inputs)
    # A backend that reads whole tiles of the pool (weighting other slots by zero) declares
    # `finite_unowned_slots`: its copy holds POISON instead of NaN where nothing was written.
    finite = backend.capabilities.finite_unowned_slots
    exact = backend.capabilities.bitwise_under_permutation

    def fresh():
        with CLOCK.phase("inputs"):
            copy = run.fresh(device)
            return poison_finite(copy) if finite else copy

    mine, problem = guarded(lambda: retry_on_oom(fresh, device))
    if problem:
        return [
            row(s, Status.ERROR, f"inputs could not be moved to {device}: {problem}")
            for s in snames
        ]

    rows, last = [], None
    with CLOCK.phase("comparison"):
        pool = ExpectedCaches(mine if finite else run.pristine)
    for sname, step, pristine, exp in zip(snames, steps_of(mine), run.steps, expected):
        after = pool.advance(exp)
        v = judge_step(backend, step, pristine, exp, after, device, timeout_s)
        rows.append(row(sname, v.status, v.reason, v.comparison, exp.ref_ms, v.backend_ms,
                        compile_ms=v.compile_ms))  # fmt: skip
        if v.status != Status.PASS and step.kv_cache is not None:
            _take_expected_cache(step, after)  # later steps read what this one should have written
        last = (step, v.output) if v.status == Status.PASS else None
    del pool, mine
    if isinstance(run.pristine, Step) and last is not None:
        # A second call must give the first call's bits (determinism: a kernel wrong from its
        # second call on, or racy), and the same step with its blocks shuffled must too. For a
        # backend bit-for-bit under permutation, the permuted call checks both at once; `rerun`
        # (the same inputs again) runs where it cannot (no cache; a backend judged under
        # permutation by the tolerance) and after a permuted failure, to name the cause.
        permuted = metamorphic and run.pristine.kv_cache is not None
        again = None

        def rerun_row():
            return _check_same(
                row,
                "rerun",
                backend,
                fresh,
                last[1],
                timeout_s,
                "nondeterministic: a second run of the same step differs",
            )

        if rerun is not False and not (permuted and exact):
            again = rerun_row()
            rows.append(again)
        if permuted:
            what = "block permutation changed the output"
            got = _check_same(
                row,
                "permuted",
                backend,
                lambda: permute_blocks(fresh(), case.seed),
                last[1],
                timeout_s,
                what,
                None if exact else expected[0],
            )
            if got["status"] != Status.PASS and exact and rerun is not False:
                again = rerun_row()  # is the cause the permutation, or any second call?
                rows.append(again)
                if again["status"] != Status.PASS:
                    got["reason"] += " (the backend is not deterministic either: see its rerun row)"
            rows.append(got)
    return rows


@dataclass(frozen=True)
class StepVerdict:
    status: Status
    reason: str
    comparison: object = None  # a compare.Comparison where the output was compared
    backend_ms: float = math.nan
    output: torch.Tensor | None = None
    compile_ms: float = math.nan  # of backend_ms, the time Triton spent compiling


def judge_step(
    backend,
    step: Step,
    pristine: Step,
    exp: Expected,
    expected_caches: tuple[torch.Tensor, torch.Tensor] | None,
    device,
    timeout_s: float | None,
) -> StepVerdict:
    """One step of one backend, judged: its reasons (a skip), its forward (isolated, timed),
    the output against the reference, its inputs against `pristine`, its caches against
    `expected_caches` (the reference's after this step, `ExpectedCaches.advance`). `step` is
    the backend's own copy on `device`; the caches are written."""
    reasons, problem = guarded(
        lambda: backend.not_supported_reasons(*step.args()), what="not_supported_reasons()"
    )
    if not problem and not (
        isinstance(reasons, list | tuple) and all(isinstance(r, str) for r in reasons)
    ):
        problem = f"not_supported_reasons() returned {reasons!r}, expected a list of str"
    if exp.nonfinite:
        problem = f"reference produced {exp.nonfinite} non-finite values"
    if problem:
        return StepVerdict(Status.ERROR, problem)
    if reasons:
        return StepVerdict(Status.SKIP, "not supported: " + "; ".join(reasons))
    (out, backend_ms, compile_ms), problem = _forward(backend, step, device, timeout_s)
    if problem:
        _recover(device)
        return StepVerdict(Status.ERROR, problem, compile_ms=compile_ms)
    with CLOCK.phase("comparison"):
        comp, problem = guarded(
            lambda: compare_output(step, out, exp.output, exp.baseline_err, backend, exp.ref_scale)
        )
        if problem:
            return StepVerdict(Status.ERROR, f"comparison failed: {problem}", None, backend_ms,
                               out, compile_ms)  # fmt: skip
        status, reason = comp.status, comp.reason
        if status == Status.PASS:
            touched = changed_inputs(step, pristine)
            if touched:
                status, reason = Status.FAIL, f"backend modified its inputs: {', '.join(touched)}"
        if status != Status.ERROR and step.kv_cache is not None:
            written = exp.writes[0] if exp.writes is not None else None
            ulps = backend.capabilities.fp8_write_ulps
            cache_problem, problem = guarded(
                lambda: compare_caches(step.kv_cache, expected_caches, written, ulps)
            )
            cache_problem = cache_problem or problem
            if cache_problem and status == Status.PASS:
                status, reason = Status.FAIL, cache_problem
            elif cache_problem:  # the output was wrong too: say where the cache went wrong
                reason = f"{reason}; {cache_problem}"
    return StepVerdict(status, reason, comp, backend_ms, out, compile_ms)


def _take_expected_cache(step: Step, expected_caches) -> None:
    """After a step the backend did not (or could not) run, give its cache the reference's
    contents: the episode's later steps read what this one should have written."""
    if step.kv_cache is not None and expected_caches is not None:
        for c, ref_c in zip(step.kv_cache, expected_caches):
            c.copy_(ref_c.to(c.device))


def _forward(backend, step: Step, device: torch.device, timeout_s: float | None):
    """((output, wall ms, of which compiling ms), "") or ((None, nan, compiling ms), reason):
    forward() isolated and timed, retried once on CUDA out-of-memory (`retry_on_oom`)."""
    watch_compiles()

    def once():
        synchronize(device)
        t0 = time.perf_counter()
        out = backend.forward(*step.args())
        synchronize(device)
        return out, (time.perf_counter() - t0) * 1e3

    compiled = CLOCK.snapshot()["compile"]
    with CLOCK.phase("backend"):
        result, problem = guarded(lambda: retry_on_oom(once, device), timeout_s)
    compile_ms = (CLOCK.snapshot()["compile"] - compiled) * 1e3
    out, ms = result if result is not None else (None, math.nan)
    return (out, ms, compile_ms), problem


def _check_same(row, sname, backend, make_step, first_out, timeout_s, what, exp=None) -> dict:
    """Run the step `make_step()` builds; its output must equal `first_out` bit for bit (with
    `exp`, for a backend whose summation order follows the physical blocks: it must agree with
    the reference within the tolerance instead). `row` builds the result row."""
    device = first_out.device
    step, problem = guarded(lambda: retry_on_oom(make_step, device))
    if not problem:
        (out, _, _), problem = _forward(backend, step, device, timeout_s)
    if not problem and not isinstance(out, torch.Tensor):
        problem = f"forward returned {type(out).__name__}, expected a tensor"
    if problem:
        _recover(device)
        return row(sname, Status.ERROR, problem)
    if out.shape != first_out.shape or out.dtype != first_out.dtype:
        why = (
            f"output {out.dtype} {list(out.shape)}, first {first_out.dtype} {list(first_out.shape)}"
        )
        return row(sname, Status.FAIL, f"metamorphic: {what} ({why})")
    with CLOCK.phase("comparison"):
        if exp is not None:
            comp = compare_output(step, out, exp.output, exp.baseline_err, backend, exp.ref_scale)
            reason = "" if comp.status == Status.PASS else f"metamorphic: {what} ({comp.reason})"
            return row(sname, comp.status, reason, comp)
        if bool(bitwise_equal(out, first_out).all()):
            return row(sname, Status.PASS)
        diff = (out.double() - first_out.double().to(out.device)).abs().max().item()
    return row(sname, Status.FAIL, f"metamorphic: {what} (max diff {diff:.3g})")


POISON = 1000.0  # what unwritten slots hold for a backend with `finite_unowned_slots`


def poison_finite(inputs: Step | Episode) -> Step | Episode:
    """`inputs` (a backend's own copy) with every non-finite cache value set to POISON (an fp8
    cache: the format's largest value), in place: large enough that any read with a nonzero
    weight still fails the comparison."""
    if inputs.kv_cache is not None:
        for c in inputs.kv_cache:
            if c.dtype in FP8_MAX:
                codes = c.view(torch.uint8)
                big = torch.tensor(FP8_MAX[c.dtype]).to(c.dtype).view(torch.uint8)
                bad = ~torch.isfinite(c.float())
                codes[bad] = (codes[bad] & 0x80) | big
            else:
                c.nan_to_num_(nan=POISON, posinf=POISON, neginf=-POISON)
    return inputs


def _step_name(i: int, step: Step | str) -> str:
    kind = step if isinstance(step, str) else step.attn_kind.value
    return f"{i}:{kind}"


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass
