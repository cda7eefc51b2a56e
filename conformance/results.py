"""A run's result set on disk, and how a run ends.

    DIR/results.jsonl   rows streamed as tests finish (an interrupted or crashed run keeps them)
    DIR/run.json        the run: id, tier, state (running / complete / interrupted), the number
                        of planned tests, and at the end wall time and counts
    DIR/results.csv     written at the end (`finalize_run`), also after an interruption

`start_run` is called once the selection is known and valid (a run that fails to start leaves
the last results alone). Rows arrive with every column but `run_state` (the runner builds them
once, `conformance.schema.result_row`, and the worker adds the run's environment);
`finalize_run` adds `run_state`, turns every planned test without a row into an `error` row
("not run" after an interruption, "missing" otherwise) and writes the CSV, so a result set
always says what did not happen. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conformance.schema import (
    STATUSES,
    Status,
    environment,
    read_jsonl,
    rerun_command,
    result_row,
    shrink_command,
    to_result_row,
    write_csv,
)

FAILURES_SHOWN = 10


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_run(out: Path) -> dict:
    try:
        return json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def start_run(out: Path, plan) -> None:
    """A new result set for `plan` (engine.Plan): an empty results.jsonl and run.json in state
    `running`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    (out / "results.csv").unlink(missing_ok=True)  # never a stale CSV beside a new run
    info = dict(
        run_id=plan.run_id,
        tier=plan.tier,
        state="running",
        start=time.time(),
        tests=len(plan.tests),
    )
    write_atomic(out / "run.json", json.dumps(info))


def finalize_run(
    out: Path, state: str, plan, extra: dict | None = None, dropped: set = frozenset()
) -> dict[str, int]:
    """results.csv and run.json from results.jsonl and the plan (`extra`: what the engine
    knows of the run: workers, seconds per phase, leaks, tests run again with more memory, run
    alone or rebuilt); returns the status counts."""
    out = Path(out)
    info = read_run(out)
    raw = read_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else []
    have = {(r.get("case_id"), r.get("backend")) for r in raw}
    env = None
    for test in plan.tests:
        if test.key in have or test.key in dropped:  # dropped: the plan's first catch
            continue
        reason = (
            "not run: the run was interrupted before this test finished"
            if state == "interrupted"
            else "missing: the test recorded no row (its process died?)"
        )
        env = env or dict(environment(), tier=plan.tier)
        row = result_row(test.shape, test.name, "missing", Status.ERROR, reason)
        raw.append({**row, **env, "backend_module": test.module})
    rows = [to_result_row(r, state) for r in raw]
    rows.sort(key=lambda r: (r["case_id"], r["backend"], r["step"]))
    tmp = out / ".results.csv.tmp"
    write_csv(rows, tmp)
    os.replace(tmp, out / "results.csv")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    info.update(
        state=state,
        wall_s=time.time() - info.get("start", time.time()),
        rows=len(rows),
        counts=counts,
        **(extra or {}),
    )
    write_atomic(out / "run.json", json.dumps(info))
    return counts


def time_split(info: dict) -> str:
    """Where a run's time went: its wall time, and the workers' time per phase (the compiles
    are part of the backends' calls)."""
    sec = info["seconds"]
    total = sum(v for k, v in sec.items() if k != "compile")
    other = max(0.0, info.get("workers", 1) * info.get("wall_s", 0.0) - total)
    return (
        f"[conformance] {info.get('wall_s', 0):.0f} s wall, {info.get('workers', 1)} worker(s); "
        f"their time: backend calls {sec.get('backend', 0):.0f} s (compiling "
        f"{sec.get('compile', 0):.0f} s), reference {sec.get('reference', 0):.0f} s, inputs "
        f"{sec.get('inputs', 0):.0f} s, comparison {sec.get('comparison', 0):.0f} s, "
        f"idle or other {other:.0f} s"
    )


def summary_lines(
    out: Path, counts: dict[str, int], state: str, failures: bool = True
) -> list[str]:
    """What a run prints at its end: its first failures and errors (unless not `failures`),
    each with the command that re-runs it alone, then one summary line."""
    out = Path(out)
    lines = []
    try:
        rows = read_jsonl(out / "results.jsonl") if failures else []
    except OSError:
        rows = []
    bad = [r for r in rows if r.get("status") in (Status.FAIL, Status.ERROR)]
    for r in bad[:FAILURES_SHOWN]:
        lines.append(
            f"{r['status'].upper()} {r['case_id']} {r['backend']} {r['step']}: {r['reason']}"
        )
        lines.append(f"  re-run alone: {rerun_command(r)}")
        lines.append(f"  its smallest failing case: {shrink_command(r)}")
    if len(bad) > FAILURES_SHOWN:
        lines.append(f"... and {len(bad) - FAILURES_SHOWN} more (results.csv, the HTML report)")
    info = read_run(out)
    for leak in info.get("leaks", []):
        lines.append(
            f"[conformance] a worker still held {leak['held_bytes'] / 2**30:.2f} GiB after "
            f"{leak['test']} (its backend keeps memory between calls?): replaced"
        )
    if info.get("replaced"):
        lines.append(
            f"[conformance] {info['replaced']} time(s) a worker kept over 1 GiB of device memory "
            "after a test: replaced by a fresh one"
        )
    if info.get("out_of_memory_reruns"):
        lines.append(
            f"[conformance] {len(info['out_of_memory_reruns'])} time(s) a test ran out of the "
            f"memory it was granted and ran again with more: "
            f"{', '.join(info['out_of_memory_reruns'][:5])}"
        )
    if info.get("run_alone"):
        lines.append(
            f"[conformance] {len(info['run_alone'])} test(s) needed more than half a device and "
            f"ran alone on it: {', '.join(info['run_alone'][:5])}"
        )
    if info.get("rebuilt"):
        lines.append(
            f"[conformance] {len(info['rebuilt'])} test(s) whose worker's CUDA context failed "
            f"while their case was built ran again in a fresh worker: "
            f"{', '.join(info['rebuilt'][:5])}"
        )
    if "seconds" in info:
        lines.append(time_split(info))
    total = sum(counts.values())
    parts = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    head = (
        "[conformance] INTERRUPTED: partial result set: "
        if state == "interrupted"
        else ("[conformance] ")
    )
    lines.append(f"{head}{total} rows ({parts}) -> {out / 'results.csv'}")
    return lines
