"""A run's result set on disk, and how a run ends.

    DIR/results.jsonl   rows streamed as tests finish (an interrupted or crashed run keeps them)
    DIR/run.json        the run: id, tier, state (running / complete / interrupted), the planned
                        tests (case × backend), and at the end wall time and counts
    DIR/results.csv     written at the end (`finalize_run`), also after an interruption

`start_run` is called once the selection is known (never before: a run that fails to start
leaves the last results alone). `finalize_run` turns every planned test without a row into an
`error` row ("not run" after an interruption, "missing" otherwise), so a result set always
says what did not happen; both files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conformance.cases import Case
from conformance.schema import (
    STATUSES,
    environment,
    read_jsonl,
    result_row,
    to_result_row,
    write_csv,
)
from conformance.shapes import Shape

RUN_ID_ENV = "CONFORMANCE_RUN_ID"  # set by `python -m conformance run` for its engine process


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_run(out: Path) -> dict:
    try:
        return json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def start_run(
    out: Path, tier: str, planned: list[tuple[str, str, str]], shapes: dict | None = None
) -> None:
    """A new result set: an empty results.jsonl and run.json in state `running`. `shapes`:
    the explicit shapes among the planned cases (id -> Shape.to_dict() plus `source`), which
    no id alone can rebuild, for the rows of tests that never report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    info = dict(
        run_id=os.environ.get(RUN_ID_ENV, ""),
        tier=tier,
        state="running",
        start=time.time(),
        planned=[list(p) for p in planned],
        shapes=shapes or {},
    )
    write_atomic(out / "run.json", json.dumps(info))


def _planned_case(info: dict, case_id: str) -> Case | Shape:
    shape = info.get("shapes", {}).get(case_id)
    if shape is not None:
        fields = dict(shape)
        return Shape.from_dict(fields, source=fields.pop("source", ""))
    return Case.from_id(case_id)


def finalize_run(out: Path, state: str) -> dict[str, int]:
    """results.csv and run.json from results.jsonl and the plan; returns the status counts."""
    out = Path(out)
    info = read_run(out)
    raw = read_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else []
    have = {(r.get("case_id"), r.get("backend")) for r in raw}
    for case_id, backend, module in info.get("planned", []):
        if (case_id, backend) in have:
            continue
        reason = (
            "not run: the run was interrupted before this test finished"
            if state == "interrupted"
            else "missing: the test recorded no row (its process died?)"
        )
        row = result_row(_planned_case(info, case_id), backend, "missing", "error", reason)
        raw.append({**row, "backend_module": module})
    env = environment()
    tier = info.get("tier", "")
    rows = [to_result_row(r, env, tier, state) for r in raw]
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
    )
    write_atomic(out / "run.json", json.dumps(info))
    return counts


def summary_line(out: Path, counts: dict[str, int], state: str) -> str:
    rows = sum(counts.values())
    head = "[conformance] INTERRUPTED: partial result set, " if state == "interrupted" else ""
    return f"{head or '[conformance] '}{rows} rows -> {Path(out) / 'results.csv'}: {counts}"
