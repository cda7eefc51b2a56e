"""Running one case against one backend: every step compared with the reference, cache checks,
metamorphic checks, and one result row per step. Nothing a backend does can stop the run: an
exception, CUDA error, out-of-memory or timeout becomes an `error` row."""

from __future__ import annotations

import math
import signal
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from conformance.cases import Case, build_inputs
from conformance.compare import compare_caches, compare_output
from conformance.tolerance import baseline_attention
from reference.attention import attention
from reference.episode import Episode
from reference.workload import Step

STATUSES = ("pass", "fail", "error", "skip")
DEFAULT_TIMEOUT_S = 300


class CaseTimeout(Exception):
    pass


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


@dataclass(frozen=True)
class Expected:
    """The reference's view of one step: output, caches after the step, baseline error, time."""

    output: torch.Tensor
    caches: tuple[torch.Tensor, torch.Tensor] | None
    baseline_err: float
    ref_ms: float


def reference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _steps(inputs: Step | Episode) -> tuple[Step, ...]:
    return inputs.steps if isinstance(inputs, Episode) else (inputs,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_EXPECTED: OrderedDict[str, tuple[Step | Episode, list[Expected]]] = OrderedDict()


# Several matrix workers share one GPU: an out-of-memory error is often another worker's peak,
# not this case's. Wait and try again (freeing this process's cached blocks) before giving up.
OOM_RETRY_WAITS_S = (0.5, 2.0, 5.0, 10.0)


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


def expected_for(case: Case) -> tuple[Step | Episode, list[Expected]]:
    """Inputs (on the CPU, caches untouched) and the reference's results per step; the last few
    cases are kept, since a case's backends usually run one after another."""
    if case.id in _EXPECTED:
        _EXPECTED.move_to_end(case.id)
        return _EXPECTED[case.id]
    result = retry_on_oom(lambda: _compute_expected(case), reference_device())
    _EXPECTED[case.id] = result
    while len(_EXPECTED) > 4:
        _EXPECTED.popitem(last=False)
    return result


def _compute_expected(case: Case) -> tuple[Step | Episode, list[Expected]]:
    inputs = build_inputs(case, "cpu")
    dev = reference_device()
    ref_inputs = inputs.with_fresh_cache().to(dev)
    results = []
    for step in _steps(ref_inputs):
        _sync(dev)
        t0 = time.perf_counter()
        out = attention(*step.args())
        _sync(dev)
        ref_ms = (time.perf_counter() - t0) * 1e3
        base = (baseline_attention(step) - out).abs().max().item() if out.numel() else 0.0
        caches = None if step.kv_cache is None else tuple(c.cpu().clone() for c in step.kv_cache)
        results.append(Expected(out.cpu(), caches, base, ref_ms))
    del ref_inputs
    _recover(dev)
    return inputs, results


def permute_blocks(step: Step, seed: int) -> Step:
    """The same step with its physical blocks shuffled (tables and slots moved with them)."""
    key_cache, value_cache = step.kv_cache
    num_blocks, bs = key_cache.shape[:2]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + 1))
    new_k, new_v = torch.empty_like(key_cache), torch.empty_like(value_cache)
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


def _error_reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    if isinstance(e, CaseTimeout):
        return msg
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"out of memory: {msg}"
    if isinstance(e, ValueError):
        return f"input rejected: {msg}"
    return f"runtime error: {type(e).__name__}: {msg}"


def result_row(
    case: Case,
    backend_name: str,
    step_name: str,
    status: str,
    reason: str = "",
    comp=None,
    ref_ms=math.nan,
    backend_ms=math.nan,
) -> dict:
    row = {
        "case_id": case.id,
        **asdict(case),
        "backend": backend_name,
        "step": step_name,
        "status": status,
        "reason": reason,
    }
    metrics = ("max_abs_err", "max_rel_err", "err_ratio", "mismatch_frac", "nan_count")
    for m in metrics:
        row[m] = getattr(comp, m) if comp is not None else math.nan
    row["ref_ms"], row["backend_ms"] = ref_ms, backend_ms
    return row


def run_case(
    case: Case,
    backend,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    metamorphic: bool = True,
    rerun: bool | None = None,
) -> list[dict]:
    """All rows of `case` × `backend`: one per step, plus `permuted` (block permutation must not
    change the output) and, on CUDA, `rerun` (a second run must be bitwise identical)."""
    name = getattr(backend, "name", type(backend).__name__)
    try:
        inputs, expected = expected_for(case)
    except Exception as e:  # the case itself cannot be built: a bug in the testbed, say so
        return [
            result_row(case, name, "build", "error", f"case could not be built: {_error_reason(e)}")
        ]
    why = backend.unavailable_reason()
    steps = _steps(inputs)
    if why:
        return [
            result_row(case, name, _step_name(i, s), "skip", f"not supported: {why}")
            for i, s in enumerate(steps)
        ]
    device = backend.device()
    rerun = device.type == "cuda" if rerun is None else rerun
    try:
        mine = retry_on_oom(lambda: inputs.with_fresh_cache().to(device), device)
    except Exception as e:
        why = f"inputs could not be moved to {device}: {_error_reason(e)}"
        return [result_row(case, name, _step_name(i, s), "error", why) for i, s in enumerate(steps)]
    rows, last = [], None
    for i, (step, exp) in enumerate(zip(_steps(mine), expected)):
        sname = _step_name(i, step)
        try:
            reasons = backend.not_supported_reasons(step)
        except Exception as e:
            reasons = [f"not_supported_reasons failed: {_error_reason(e)}"]
        if reasons:
            rows.append(
                result_row(case, name, sname, "skip", "not supported: " + "; ".join(reasons))
            )
            _take_expected_cache(step, exp)
            continue
        try:
            with time_limit(timeout_s):
                out, backend_ms = _timed_forward(backend, step, device)
        except Exception as e:
            rows.append(result_row(case, name, sname, "error", _error_reason(e), ref_ms=exp.ref_ms))
            _recover(device)
            _take_expected_cache(step, exp)
            continue
        comp = compare_output(step, out, exp.output, exp.baseline_err)
        status, reason = ("pass", "") if comp.ok else ("fail", comp.reason)
        if comp.ok:
            cache_problem = compare_caches(step.kv_cache, exp.caches)
            if cache_problem:
                status, reason = "fail", cache_problem
        rows.append(result_row(case, name, sname, status, reason, comp, exp.ref_ms, backend_ms))
        last = (step, out) if status == "pass" else None
    if isinstance(inputs, Step) and last is not None:
        fresh = lambda: inputs.with_fresh_cache().to(device)
        if metamorphic and inputs.kv_cache is not None:
            rows.append(
                _check_same(
                    case,
                    name,
                    "permuted",
                    backend,
                    lambda: permute_blocks(fresh(), case.seed),
                    last[1],
                    timeout_s,
                    "block permutation changed the output",
                )
            )
        if rerun:
            rows.append(
                _check_same(
                    case,
                    name,
                    "rerun",
                    backend,
                    fresh,
                    last[1],
                    timeout_s,
                    "nondeterministic: a second run differs",
                )
            )
    _recover(device)  # free this case's memory before the next one (workers share the GPU)
    return rows


def _take_expected_cache(step: Step, exp: Expected) -> None:
    """After a step the backend did not (or could not) run, give its cache the reference's
    contents: the episode's later steps read what this one should have written."""
    if step.kv_cache is not None:
        for c, ref_c in zip(step.kv_cache, exp.caches):
            c.copy_(ref_c.to(c.device))


def _timed_forward(backend, step: Step, device: torch.device):
    """forward() with its wall time, retried on CUDA out-of-memory (`retry_on_oom`)."""

    def once():
        _sync(device)
        t0 = time.perf_counter()
        out = backend.forward(*step.args())
        _sync(device)
        return out, (time.perf_counter() - t0) * 1e3

    return retry_on_oom(once, device)


def _check_same(case, name, sname, backend, make_step, first_out, timeout_s, what) -> dict:
    """Run the step `make_step()` builds; its output must equal `first_out` bit for bit."""
    device = first_out.device
    try:
        with time_limit(timeout_s):
            step = retry_on_oom(make_step, device)
            out = retry_on_oom(lambda: backend.forward(*step.args()), device)
    except Exception as e:
        _recover(device)
        return result_row(case, name, sname, "error", _error_reason(e))
    if torch.equal(out, first_out) or (
        (torch.isnan(out) == torch.isnan(first_out)).all()
        and torch.equal(out.nan_to_num(), first_out.nan_to_num())
    ):
        return result_row(case, name, sname, "pass")
    diff = (out.double() - first_out.double()).abs().max().item()
    return result_row(case, name, sname, "fail", f"metamorphic: {what} (max diff {diff:.3g})")


def _step_name(i: int, step: Step) -> str:
    return f"{i}:{step.attn_kind.value}"


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:
            pass
