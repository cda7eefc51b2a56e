"""The result columns, defined once, in the order they appear in results.csv."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ResultRow:
    """One row per case × backend × step."""

    case_id: str
    backend: str
    step: str
    attn_kind: str  # case axis `kind`: encoder / decoder / cross / episode
    phase: str
    batch_shape: str
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: str
    layout: str
    window: str
    scale: str
    size: str
    seed: int
    status: str  # pass / fail / error / skip
    reason: str
    max_abs_err: float
    max_rel_err: float
    err_ratio: float  # worst error ÷ tolerance
    mismatch_frac: float
    nan_count: float
    ref_ms: float
    backend_ms: float
    device: str
    torch: str
    triton: str
    xformers: str
    commit: str
    timestamp: str
    tier: str


COLUMNS = [f.name for f in fields(ResultRow)]

# bench.csv: the configuration (BENCH_KEY, what identifies a row across runs), then metrics.
BENCH_KEY = [
    "workload",
    "backend",
    "batch",
    "context_len",
    "query_len",
    "num_heads",
    "num_kv_heads",
    "head_size",
    "block_size",
    "dtype",
]
# graph_ms / graph_gbps: the same call replayed from a CUDA graph (no host launch overhead).
BENCH_COLUMNS = [
    *BENCH_KEY,
    "median_ms",
    "gbps",
    "tflops",
    "frac_of_limit",
    "limit",
    "device",
    "graph_ms",
    "graph_gbps",
]


def environment() -> dict[str, str]:
    """device, library versions, commit and time, for every row of a run."""
    import torch

    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return "absent"

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    )
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        commit = "unknown"
    return dict(
        device=device,
        torch=torch.__version__,
        triton=version("triton"),
        xformers=version("xformers"),
        commit=commit,
        timestamp=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def to_result_row(raw: dict, env: dict, tier: str) -> dict:
    """A runner row (case axes + metrics) in the CSV's columns and order."""
    heads = raw["heads"]
    row = dict(
        raw,
        attn_kind=raw["kind"],
        batch_shape=raw["batch"],
        num_heads=int(heads[1:].split("kv")[0]),
        num_kv_heads=int(heads.split("kv")[1]),
        tier=tier,
        **env,
    )
    return {c: row.get(c, "") for c in COLUMNS}


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by an interruption
                    rows.append(json.loads(line))
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            )


def read_csv(path: str | Path):
    """A results CSV as a pandas DataFrame with the schema's columns (checked)."""
    import pandas as pd

    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a results CSV, missing columns {missing}")
    df["reason"] = df["reason"].fillna("")
    return df[COLUMNS]
