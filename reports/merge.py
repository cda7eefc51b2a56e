"""Merge results from several shards, workers or machines into one result set.

What a merge cannot know stays unknown: a CSV without `run_state` (an older file) keeps
`unknown`, and the rows of a results.jsonl get the state its run.json recorded (`complete` or
`interrupted`), else `unknown`. The gate judges only `complete` rows, so a merge can never turn
an unfinished run into a judged one; `--set run_state=complete` is the user's explicit word.
"""

from __future__ import annotations

import json
from pathlib import Path

from conformance.schema import COLUMNS, environment, read_csv, read_jsonl, to_result_row, write_csv

# What a results.jsonl row must hold to become a CSV row.
RUNNER_FIELDS = ("case_id", "backend", "step", "status", "attn_kind", "num_heads")


def _jsonl_state(path: Path) -> str:
    """The state run.json beside a results.jsonl recorded for its run, else `unknown`."""
    try:
        state = json.loads((path.parent / "run.json").read_text()).get("state")
    except (OSError, ValueError):
        return "unknown"
    return state if state in ("complete", "interrupted") else "unknown"


def load_rows(path: str | Path, overrides: dict | None = None) -> list[dict]:
    """Rows of a results.csv, or of a results.jsonl (runner rows, converted: rows that lack the
    environment columns get this machine's unless `overrides` names them, e.g. the GPU a JSONL
    came from). `overrides` replaces those columns in every row (e.g. the commit, where the
    machine that ran the matrix had a stale git checkout)."""
    path = Path(path)
    overrides = overrides or {}
    unknown = set(overrides) - set(COLUMNS)
    if unknown:
        raise ValueError(f"--set: unknown column(s) {sorted(unknown)}; columns: {COLUMNS}")
    if path.suffix == ".jsonl":
        env = environment()
        state = overrides.get("run_state", _jsonl_state(path))
        rows = []
        for n, r in enumerate(read_jsonl(path), 1):
            lacking = [k for k in RUNNER_FIELDS if k not in r]
            if lacking:
                raise ValueError(f"{path}: row {n} is not a runner row (lacks {lacking})")
            rows.append(to_result_row({**env, **r, **overrides}, state))
        return rows
    return [{**r, **overrides} for r in read_csv(path).to_dict("records")]


def merge(paths: list[str | Path], out: str | Path, overrides: dict | None = None) -> int:
    """One CSV. A test (case_id, backend) in several files keeps the last file's rows, all of
    them: re-running the tests a cut-off run never finished replaces their `not run` rows."""
    tests: dict[tuple, list[dict]] = {}
    for p in paths:
        mine: dict[tuple, list[dict]] = {}
        for r in load_rows(p, overrides):
            mine.setdefault((r["case_id"], r["backend"]), []).append(
                {c: r.get(c, "") for c in COLUMNS}
            )
        tests.update(mine)
    rows = sorted(
        (r for rs in tests.values() for r in rs),
        key=lambda r: (r["case_id"], r["backend"], r["step"]),
    )
    write_csv(rows, out)
    return len(rows)
