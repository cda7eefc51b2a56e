"""The result columns, defined once, in the order they appear in results.csv; the status
vocabulary; the command that re-runs one row."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path


class Status(StrEnum):
    """A row's verdict. Only `pass` means the numbers were compared and agreed."""

    PASS = "pass"  # compared with the reference: within tolerance, caches and inputs intact
    FAIL = "fail"  # compared: wrong output, cache, inputs, or a metamorphic check
    ERROR = "error"  # no verdict possible: the backend raised/hung/crashed, the reference
    #                  failed, a row is missing, the run was interrupted
    SKIP = "skip"  # the backend says, with a reason, that it does not support this step


STATUSES = tuple(s.value for s in Status)
# A result set's state: `complete`, `interrupted` (stopped by a signal), or `unknown` (rows
# whose run nobody recorded, e.g. an older CSV or a JSONL merged without its run.json). Only
# `complete` can be judged by the gate.
RUN_STATES = ("complete", "interrupted", "unknown")


@dataclass(frozen=True)
class ResultRow:
    """One row per case × backend × step."""

    case_id: str
    backend: str
    step: str
    attn_kind: str  # the step's AttnKind: encoder / decoder / encoder_decoder ('episode' only
    #                 on rows of a whole episode that belong to no one step: crash, missing)
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
    status: Status
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
    # Appended after the contract columns above (CI scripts read those by position too).
    rms_ratio: float  # precision class: RMS error ÷ RMS error of rounding the exact output
    backend_module: str  # module:Class of a --backend-module backend ('' for a registered one)
    run_state: str  # complete / interrupted (a result set from a run that did not finish)
    model: str  # the model preset a case was generated around ('' for the preset axes)
    shape: str  # an explicit shape's id (conformance/shapes.py; '' for generated cases)
    cases_file: str  # the --cases file an explicit shape came from (re-running needs it)
    kv_cache_dtype: str  # how the caches stored K/V: auto, fp8_e4m3, fp8_e5m2
    kv_scale: str  # fp8's scale scheme: tensor (one scale) or head (per kv head); '' for auto
    compile_ms: float  # of backend_ms, the time Triton spent compiling kernels (a cold cache)
    position_bias: str  # none, t5 (T5's 32 buckets up to 128) or t5-B-D: its config
    cache_strides: str  # contiguous, kv_interleaved or head_major: how the caches sat in memory


COLUMNS = [f.name for f in fields(ResultRow)]


@dataclass
class BenchRow:
    """One bench.csv row: the configuration (the first ten fields: what identifies a row across
    runs, BENCH_KEY), then the measurements. graph_ms / graph_gbps: the same call replayed from a
    CUDA graph (kernel time without the host's launch overhead)."""

    workload: str
    backend: str
    batch: int
    context_len: int
    query_len: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    median_ms: float
    gbps: float = math.nan
    tflops: float = math.nan
    frac_of_limit: float = math.nan
    limit: str = ""
    device: str = ""
    graph_ms: float = math.nan
    graph_gbps: float = math.nan
    # Appended later (an older bench.csv reads with the defaults, `BENCH_LATER`).
    kv_cache_dtype: str = "auto"  # fp8 rows count the fp8 bytes they read
    status: str = ""  # a backend's correctness on this shape, checked first: pass/fail/error
    timed: str = ""  # graph, do_bench, or why a call could not be captured
    backend_module: str = ""  # module:Class of a --backend-module backend


BENCH_COLUMNS = [f.name for f in fields(BenchRow)]
BENCH_KEY = [*BENCH_COLUMNS[:10], "kv_cache_dtype"]
BENCH_SHAPE = [k for k in BENCH_KEY if k != "backend"]  # a shape, whichever backend ran it
BENCH_LATER = {"kv_cache_dtype": "auto", "status": "", "timed": "", "backend_module": ""}


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
                # -dirty: the tree differs from its commit (a copied tree's HEAD may be older)
                ["git", "describe", "--always", "--dirty", "--abbrev=7"],
                capture_output=True,
                text=True,
                timeout=5,
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


def device_kind(device: str) -> str:
    """A short name for a device, for file names and baselines: `cpu`, else the GPU model
    (`NVIDIA H100 80GB HBM3` -> `h100`, `NVIDIA H200` -> `h200`)."""
    if not device or str(device).startswith("cpu"):
        return "cpu"
    tokens = re.findall(r"[A-Za-z]*\d+[A-Za-z]*", str(device))
    return (tokens[0] if tokens else re.sub(r"\W+", "-", str(device)).strip("-")).lower()


def rerun_command(row) -> str:
    """The one command that re-runs a row's case alone with its backend."""
    get = row.get if isinstance(row, dict) else lambda k, d="": getattr(row, k, d)
    module = get("backend_module", "") or ""
    if isinstance(module, float):  # an empty cell read by pandas
        module = ""
    which = f"--backend-module {module}" if module else f"--backend {get('backend')}"
    source = get("cases_file", "") or ""
    source = f"--cases {source} " if isinstance(source, str) and source else ""
    return f"python -m conformance run {source}--case {get('case_id')} {which}"


def dump_command(row) -> str:
    """The command that writes a row's inputs and the backend's output beside the reference's
    (`conformance dump --backend`), to look at in a notebook."""
    run = rerun_command(row)
    target = run.split(" --case ", 1)[1]  # "ID --backend NAME" or "ID --backend-module SPEC"
    source = run.split("run ", 1)[1].split("--case ")[0]
    case_id, which = target.split(" ", 1)
    return f"python -m conformance dump {case_id} {source}--out dump-{case_id[:40]} {which}"


def shrink_command(row) -> str:
    """The command that searches for the smallest case that still fails as this row does."""
    run = rerun_command(row)
    return "python -m conformance shrink " + run.split("run ", 1)[1].replace("--case ", "", 1)


METRICS = ("max_abs_err", "max_rel_err", "err_ratio", "mismatch_frac", "nan_count", "rms_ratio")


def result_row(
    case,
    backend: str,
    step: str,
    status: str,
    reason: str = "",
    metrics=None,
    ref_ms: float = math.nan,
    backend_ms: float = math.nan,
    backend_module: str = "",
    compile_ms: float = math.nan,
) -> dict:
    """The one builder of a result row (what the runner streams to results.jsonl): every column
    but the run's environment, tier and run_state. `case` is a conformance Case or Shape (its
    `columns()` describe it); `metrics` any object with the METRICS attributes (a Comparison) or
    None; `step` is `i:attn_kind` for a step's row, or what the row is about (`permuted`,
    `rerun`, `crash`, `missing`, ...)."""
    row = case.columns()
    row.update(
        backend=backend,
        step=step,
        attn_kind=step.split(":", 1)[1] if ":" in step else row["attn_kind"],
        status=str(Status(status)),
        reason=reason,
        ref_ms=ref_ms,
        backend_ms=backend_ms,
        backend_module=backend_module,
        compile_ms=compile_ms,
    )
    row.update({m: getattr(metrics, m) if metrics is not None else math.nan for m in METRICS})
    return row


def to_result_row(row: dict, run_state: str = "complete") -> dict:
    """A streamed row (with the run's environment and tier) with its `run_state`, in the CSV's
    columns and order."""
    full = dict(row, run_state=run_state)
    return {c: full.get(c, "") for c in COLUMNS}


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


# Columns added after the first result sets were committed: an older file reads with these
# defaults (and `df.attrs["older_columns"]` names them, for the gate to refuse such a file).
LATER_COLUMNS = {
    "rms_ratio": float("nan"),
    "backend_module": "",
    "run_state": "unknown",  # an older file: nobody recorded whether its run finished
    "model": "",
    "shape": "",
    "cases_file": "",
    "kv_cache_dtype": "auto",  # every row before fp8 caches existed
    "kv_scale": "",
    "compile_ms": float("nan"),
    "position_bias": "none",
    "cache_strides": "contiguous",
}


def check_numeric(df, columns, where: str) -> None:
    """Columns of `df` converted to numbers in place; ValueError naming the first cell that is
    not one (an empty cell is NaN, not an error)."""
    import pandas as pd

    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any():
            i = int(bad.idxmax())
            raise ValueError(f"{where}: column {c} row {i + 2}: {df[c][i]!r} is not a number")
        df[c] = values


def read_csv(path: str | Path):
    """A results CSV as a pandas DataFrame with the schema's columns (checked: columns present,
    statuses known, metrics numeric); ValueError naming the problem otherwise."""
    import pandas as pd

    try:
        # Text columns stay text: a commit such as 43e5009 is not the number 4.3e5009.
        text = {c: str for c in ("case_id", "commit", "torch", "triton", "xformers", "device")}
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False, dtype=text)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a results CSV ({str(e).strip().splitlines()[0]})") from None
    older = [c for c in LATER_COLUMNS if c not in df.columns]
    for c in older:
        df[c] = LATER_COLUMNS[c]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a results CSV, missing columns {missing}")
    unknown = sorted(set(df["status"].astype(str)) - set(STATUSES))
    if unknown:
        raise ValueError(f"{path}: column status holds {unknown}; expected one of {STATUSES}")
    check_numeric(df, METRICS, str(path))
    for c in ("reason", "backend_module", "model", "shape", "cases_file", "run_state", "kv_scale"):
        df[c] = df[c].fillna("").astype(str)
    states = sorted(set(df.run_state) - set(RUN_STATES))
    if states:
        raise ValueError(f"{path}: column run_state holds {states}; expected one of {RUN_STATES}")
    check_verdicts(df, str(path))
    df = df[COLUMNS]
    df.attrs["older_columns"] = older
    return df


def check_verdicts(df, where: str) -> None:
    """Every row's status must agree with its own numbers (ValueError naming the first that
    does not): a `pass` that was compared (a step row; a metamorphic row judged against the
    reference) has err_ratio <= 1, no non-finite outputs and, in fp16/bf16, rms_ratio within
    the precision limit; a step row's `pass` was compared at all (err_ratio present); `fail`,
    `error` and `skip` say why."""
    from conformance.tolerance import PRECISION_LIMIT_BY_NAME

    step_row = df.step.astype(str).str.match(r"^\d+:")
    passed = df.status == Status.PASS
    limit = df.dtype.astype(str).map(PRECISION_LIMIT_BY_NAME)
    checks = [
        (
            passed & step_row & df.err_ratio.isna(),
            "says pass but was never compared (no err_ratio)",
        ),
        (
            passed & ~(df.err_ratio.isna() | (df.err_ratio <= 1)),
            "says pass but its err_ratio is over 1",
        ),
        (passed & (df.nan_count.fillna(0) != 0), "says pass but has non-finite outputs"),
        (
            passed & limit.notna() & (df.rms_ratio > limit),
            "says pass but its rms_ratio is over the precision limit",
        ),
        (~passed & (df.reason.astype(str).str.strip() == ""), "is not a pass and gives no reason"),
    ]
    for bad, what in checks:
        if bad.any():
            i = bad.idxmax()
            r = df.loc[i]
            raise ValueError(
                f"{where}: row {int(i) + 2} ({r.case_id} {r.backend} {r.step}) {what} "
                f"(status {r.status}, err_ratio {r.err_ratio}, nan_count {r.nan_count}, "
                f"rms_ratio {r.rms_ratio})"
            )
