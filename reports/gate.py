"""The CI regression gate: compare a result set (and optionally benchmarks) with a baseline.

    python -m reports.gate --results reports/out/results.csv \\
        --baseline conformance/baselines/smoke-cpu.csv [--summary gate.md] \\
        [--bench reports/out/bench.csv --bench-baseline reports/results/h100/bench.csv]
    python -m reports.gate --results ... --baseline ... --write-baseline   (make baseline)

Exit 1 (printing a short table) when
- a row that passed in the baseline now fails or errors;
- a row of the baseline disappeared from the results;
- a row's worst error ÷ tolerance grew past RATIO_GROWTH times the baseline's (and above
  RATIO_FLOOR, so that noise on tiny errors does not trip it);
- with benchmark data, a throughput (GB/s or TFLOP/s) fell by more than THROUGHPUT_DROP.
New rows and fixed failures are reported, never failed. Exit 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from reports.schema import BENCH_KEY

KEY = ["case_id", "backend", "step"]
BASELINE_COLUMNS = [*KEY, "status", "reason", "err_ratio"]
RATIO_GROWTH = 2.0
RATIO_FLOOR = 0.25
THROUGHPUT_DROP = 0.20


def compare(results: pd.DataFrame, baseline: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Findings by kind: regressions, disappeared, ratio_growth (fail the gate); new, fixed."""
    m = baseline[BASELINE_COLUMNS].merge(
        results[[*KEY, "status", "reason", "err_ratio"]],
        on=KEY,
        how="outer",
        suffixes=("_base", "_now"),
        indicator=True,
    )
    both = m[m._merge == "both"]
    was_ok = both.status_base == "pass"
    now_bad = both.status_now.isin(["fail", "error"])
    grown = (
        (both.err_ratio_now > RATIO_GROWTH * both.err_ratio_base.fillna(0))
        & (both.err_ratio_now > RATIO_FLOOR)
        & both.err_ratio_base.notna()
    )
    cols = [*KEY, "status_base", "status_now", "err_ratio_base", "err_ratio_now", "reason_now"]
    return {
        "regressions": both[was_ok & now_bad][cols],
        "disappeared": m[m._merge == "left_only"][cols],
        "ratio_growth": both[grown & ~now_bad][cols],
        "new": m[m._merge == "right_only"][cols],
        "fixed": both[both.status_base.isin(["fail", "error"]) & (both.status_now == "pass")][cols],
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


FAILING = ("regressions", "disappeared", "ratio_growth")


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
    from reports.schema import read_csv

    try:
        results = read_csv(args.results)
        if args.write_baseline:
            Path(args.baseline).parent.mkdir(parents=True, exist_ok=True)
            results[BASELINE_COLUMNS].sort_values(KEY).to_csv(args.baseline, index=False)
            print(f"wrote baseline {args.baseline} ({len(results)} rows)")
            return 0
        baseline = pd.read_csv(args.baseline, keep_default_na=False, na_values=[""])
        missing = [c for c in BASELINE_COLUMNS if c not in baseline.columns]
        if missing:
            raise ValueError(f"--baseline: {args.baseline} lacks columns {missing}")
        bench_drops = None
        if args.bench and args.bench_baseline:
            bench_drops = compare_bench(pd.read_csv(args.bench), pd.read_csv(args.bench_baseline))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    findings = compare(results, baseline)
    md = markdown(findings, bench_drops)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(md)
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
