"""The CI regression gate: compare a result set (and optionally benchmarks) with a baseline.

    python -m reports.gate --results reports/out/results.csv \\
        --baseline conformance/baselines/smoke-cpu.csv [--summary gate.md] \\
        [--bench reports/out/bench.csv --bench-baseline reports/results/h100/bench.csv.gz]
    python -m reports.gate --results ... --baseline ... --write-baseline   (make baseline)

Exit 1 (printing a short table with each reason) when
- a row that passed in the baseline is now `fail`, `error` or `skip` (a backend that silently
  stops running turns its passes into skips: that is a regression, not a neutral change);
- a row of the baseline disappeared from the results, or a whole backend did;
- a row's worst error ÷ tolerance grew past RATIO_GROWTH times the baseline's (and above
  RATIO_FLOOR, so that noise on tiny errors does not trip it);
- with benchmark data, a throughput (GB/s or TFLOP/s) fell by more than THROUGHPUT_DROP.
New rows and fixed failures are reported, never failed. Deliberate changes go through
`make baseline` (the diff of the baseline file is the review).

Exit 2, with one line, when the gate cannot judge: a file missing or not of its kind (columns
missing, a status outside the vocabulary, a non-numeric metric, duplicate rows, a row whose
status disagrees with its own numbers), a result set from an interrupted run or one whose state
is unknown (an older file, a merge without run.json), results of another tier or device than the
baseline (a baseline records both), `--bench` without `--bench-baseline` (or the reverse).
Exit 1 means "regression" and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from conformance.schema import BENCH_KEY, STATUSES, Status, check_numeric, device_kind

KEY = ["case_id", "backend", "step"]
BASELINE_COLUMNS = [*KEY, "status", "reason", "err_ratio", "tier", "device"]
JUDGED = [*KEY, "status", "reason", "err_ratio"]
RATIO_GROWTH = 2.0
RATIO_FLOOR = 0.25
THROUGHPUT_DROP = 0.20


def compare(results: pd.DataFrame, baseline: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Findings by kind: regressions, disappeared, backends_missing, ratio_growth (fail the
    gate); new, fixed (reported only)."""
    m = baseline[JUDGED].merge(
        results[[*KEY, "status", "reason", "err_ratio"]],
        on=KEY,
        how="outer",
        suffixes=("_base", "_now"),
        indicator=True,
    )
    both = m[m._merge == "both"]
    was_ok = both.status_base == Status.PASS
    now_bad = both.status_now.isin([Status.FAIL, Status.ERROR, Status.SKIP])
    grown = (
        (both.err_ratio_now > RATIO_GROWTH * both.err_ratio_base.fillna(0))
        & (both.err_ratio_now > RATIO_FLOOR)
        & both.err_ratio_base.notna()
    )
    cols = [*KEY, "status_base", "status_now", "err_ratio_base", "err_ratio_now", "reason_now"]
    gone = sorted(set(baseline.backend) - set(results.backend))
    missing = pd.DataFrame(
        {
            "backend": gone,
            "baseline_rows": [int((baseline.backend == b).sum()) for b in gone],
            "reason_now": "absent from the results: the backend did not run at all",
        }
    )
    disappeared = m[m._merge == "left_only"][cols].assign(reason_now="missing from the results")
    return {
        "regressions": both[was_ok & now_bad][cols],
        "disappeared": disappeared[~disappeared.backend.isin(gone)],
        "backends_missing": missing,
        "ratio_growth": both[grown & ~now_bad][cols],
        "new": m[m._merge == "right_only"][cols],
        "fixed": both[
            both.status_base.isin([Status.FAIL, Status.ERROR]) & (both.status_now == Status.PASS)
        ][cols],
    }


def compare_bench(bench: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Rows whose GB/s or TFLOP/s fell by more than THROUGHPUT_DROP. GB/s from CUDA-graph
    replays (`graph_gbps`, kernel time) where both sides have it: do_bench's GB/s of a step
    under ~150 µs includes host launch time and moved up to 2x between runs on the H100."""
    key = [k for k in BENCH_KEY if k in bench.columns and k in baseline.columns]
    m = baseline.merge(bench, on=key, suffixes=("_base", "_now"))
    drops = []
    for metric in ("graph_gbps", "gbps", "tflops"):
        if f"{metric}_base" not in m or f"{metric}_now" not in m:
            continue
        base, now = m[f"{metric}_base"], m[f"{metric}_now"]
        if metric == "gbps" and "graph_gbps_base" in m and "graph_gbps_now" in m:
            graphed = m["graph_gbps_base"].notna() & m["graph_gbps_now"].notna()
            base = base.where(~graphed)  # judged by graph_gbps above
        bad = base.notna() & (base > 0) & (now < (1 - THROUGHPUT_DROP) * base)
        drops.append(
            m[bad].assign(metric=metric, base=base[bad], now=now[bad])[
                [*key, "metric", "base", "now"]
            ]
        )
    return pd.concat(drops, ignore_index=True) if drops else pd.DataFrame()


FAILING = ("regressions", "disappeared", "backends_missing", "ratio_growth")


def _md_table(df: pd.DataFrame) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "/")
    rows = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


def markdown(findings: dict[str, pd.DataFrame], bench_drops: pd.DataFrame | None) -> str:
    lines = ["## Conformance gate", ""]
    failed = any(len(findings[k]) for k in FAILING) or (
        bench_drops is not None and len(bench_drops)
    )
    lines.append(
        f"**{'FAILED' if failed else 'passed'}** · "
        + " · ".join(f"{k.replace('_', ' ')}: {len(v)}" for k, v in findings.items())
    )
    for k, v in findings.items():
        if len(v) and (k in FAILING or len(v) <= 20):
            lines += ["", f"### {k.replace('_', ' ')}", "", _md_table(v.head(50))]
    if bench_drops is not None and len(bench_drops):
        lines += ["", "### throughput drops", "", _md_table(bench_drops)]
    return "\n".join(lines) + "\n"


def _read(path: str, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {path!r}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise ValueError(
            f"{what}: cannot read {path!r} ({str(e).strip().splitlines()[0]})"
        ) from None


def load_results(path: str) -> pd.DataFrame:
    """The result set to judge, refused (ValueError) unless it is complete and well formed."""
    from conformance.schema import read_csv

    try:
        results = read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"--results: no such file {path!r}") from None
    except ValueError as e:
        raise ValueError(f"--results: {e}") from None
    if "run_state" in results.attrs.get("older_columns", []):
        raise ValueError(
            f"--results: {path} has no run_state column (an older result set): re-run the matrix"
        )
    if (results.run_state == "interrupted").any():
        raise ValueError(
            f"--results: {path} is from an interrupted run (run_state=interrupted): re-run it "
            "to completion"
        )
    if (results.run_state != "complete").any():
        raise ValueError(
            f"--results: {path} holds rows whose run is not known to have finished "
            "(run_state=unknown: an older file, or a results.jsonl merged without its run.json)"
        )
    _no_duplicates(results, "--results", path)
    return results


def baseline_of(results: pd.DataFrame) -> pd.DataFrame:
    """The baseline rows of a result set: its verdicts, with the tier and device they hold."""
    b = results[JUDGED].copy()
    b["tier"] = results.tier.astype(str)
    b["device"] = results.device.astype(str).map(device_kind)
    return b.sort_values(KEY)


def check_same_run_kind(results: pd.DataFrame, baseline: pd.DataFrame, path: str) -> None:
    """Results of another tier or device than the baseline cannot be judged against it."""
    for col, now in (
        ("tier", set(results.tier.astype(str))),
        ("device", set(results.device.astype(str).map(device_kind))),
    ):
        base = set(baseline[col].astype(str))
        if now != base:
            raise ValueError(
                f"different {col}: the results are {col} {sorted(now)}, the baseline {path} "
                f"{sorted(base)} (compare like with like; `make baseline` writes one)"
            )


def load_baseline(path: str) -> pd.DataFrame:
    baseline = _read(path, "--baseline")
    missing = [c for c in BASELINE_COLUMNS if c not in baseline.columns]
    if missing:
        raise ValueError(f"--baseline: {path} lacks columns {missing}")
    unknown = sorted(set(baseline.status.astype(str)) - set(STATUSES))
    if unknown:
        raise ValueError(f"--baseline: {path}: status holds {unknown}; expected {STATUSES}")
    check_numeric(baseline, ["err_ratio"], f"--baseline: {path}")
    baseline["reason"] = baseline["reason"].fillna("").astype(str)
    _no_duplicates(baseline, "--baseline", path)
    return baseline


def load_bench(path: str, what: str) -> pd.DataFrame:
    from conformance.schema import BENCH_LATER

    bench = _read(path, what)
    for c, default in BENCH_LATER.items():  # an older bench file
        if c not in bench.columns:
            bench[c] = default
        bench[c] = bench[c].fillna(default)
    missing = [c for c in BENCH_KEY if c not in bench.columns]
    if missing:
        raise ValueError(f"{what}: {path} is not a bench CSV, missing key columns {missing}")
    check_numeric(
        bench, [c for c in ("graph_gbps", "gbps", "tflops") if c in bench], f"{what}: {path}"
    )
    return bench


def _no_duplicates(df: pd.DataFrame, what: str, path: str) -> None:
    dup = df.duplicated(KEY)
    if dup.any():
        row = df[dup].iloc[0]
        raise ValueError(f"{what}: {path} holds {tuple(row[KEY])} more than once")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m reports.gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--summary", default=None, help="write a markdown summary here")
    p.add_argument("--bench", default=None)
    p.add_argument("--bench-baseline", default=None)
    p.add_argument(
        "--write-baseline",
        action="store_true",
        help="rewrite the baseline from the results (deliberately)",
    )
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
        if args.write_baseline:
            Path(args.baseline).parent.mkdir(parents=True, exist_ok=True)
            baseline_of(results).to_csv(args.baseline, index=False)
            print(f"wrote baseline {args.baseline} ({len(results)} rows)")
            return 0
        baseline = load_baseline(args.baseline)
        check_same_run_kind(results, baseline, args.baseline)
        if bool(args.bench) != bool(args.bench_baseline):
            raise ValueError("--bench and --bench-baseline go together (one without the other)")
        bench_drops = None
        if args.bench:
            bench_drops = compare_bench(
                load_bench(args.bench, "--bench"),
                load_bench(args.bench_baseline, "--bench-baseline"),
            )
        findings = compare(results, baseline)
        md = markdown(findings, bench_drops)
        if args.summary:
            Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(args.summary).write_text(md)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "GITHUB_STEP_SUMMARY" in os.environ:  # a CI job summary, where the CI offers one
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
            f.write(md)
    print(md)
    failed = any(len(findings[k]) for k in FAILING) or (
        bench_drops is not None and len(bench_drops) > 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
