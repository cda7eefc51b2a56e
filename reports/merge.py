"""Merge results from several shards, workers or machines into one result set."""

from __future__ import annotations

from pathlib import Path

from conformance.schema import COLUMNS, read_csv, read_jsonl, to_result_row, write_csv

# What a results.jsonl row must hold to become a CSV row.
RUNNER_FIELDS = ("case_id", "backend", "step", "status", "attn_kind", "num_heads")


def load_rows(path: str | Path, overrides: dict | None = None) -> list[dict]:
    """Rows of a results.csv, or of a results.jsonl (runner rows, converted: the environment
    columns are this machine's unless `overrides` names them, e.g. the GPU a JSONL came from).
    `overrides` replaces those columns in CSV rows too (e.g. the commit, where the machine that
    ran the matrix had a stale git checkout)."""
    path = Path(path)
    overrides = overrides or {}
    unknown = set(overrides) - set(COLUMNS)
    if unknown:
        raise ValueError(f"--set: unknown column(s) {sorted(unknown)}; columns: {COLUMNS}")
    if path.suffix == ".jsonl":
        from conformance.schema import environment

        env = {**environment(), **overrides}
        rows = []
        for n, r in enumerate(read_jsonl(path), 1):
            lacking = [k for k in RUNNER_FIELDS if k not in r]
            if lacking:
                raise ValueError(f"{path}: row {n} is not a runner row (lacks {lacking})")
            rows.append(
                to_result_row({**env, **r, **overrides}, overrides.get("run_state", "complete"))
            )
        return rows
    return [{**r, **overrides} for r in read_csv(path).to_dict("records")]


def merge(paths: list[str | Path], out: str | Path, overrides: dict | None = None) -> int:
    """One CSV; a (case_id, backend, step) seen twice keeps the last file's row."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        for r in load_rows(p, overrides):
            merged[(r["case_id"], r["backend"], r["step"])] = {c: r.get(c, "") for c in COLUMNS}
    rows = [merged[k] for k in sorted(merged)]
    write_csv(rows, out)
    return len(rows)
