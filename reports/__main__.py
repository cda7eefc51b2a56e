"""Reports command line.

python -m reports render RESULTS.csv [...] [--bench BENCH.csv] [--out reports/out/index.html]
python -m reports merge A.csv|A.jsonl B.csv ... --out reports/out/results.csv
python -m reports.gate ...   (the regression gate; see reports/gate.py)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports (or encdec-attn render|merge)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write the self-contained HTML report")
    r.add_argument("results", nargs="+", help="results.csv files (one page for all of them)")
    r.add_argument(
        "--bench",
        nargs="?",
        default=None,
        const=None,
        help="a bench.csv (python -m bench) for the performance section; a limits.csv beside it "
        "adds what ncu measured",
    )
    r.add_argument("--out", default="reports/out/index.html", help="the page to write")
    r.add_argument("--title", default=None)
    m = sub.add_parser("merge", help="merge result files into one CSV")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="set a column in every row (device, torch, commit, ..., tier)",
    )
    args = p.parse_args(argv)
    try:
        if args.cmd == "render":
            from reports.html import write_report

            out = write_report(args.results, args.out, args.bench or None, args.title)
            print(f"wrote {out}")
        else:
            from reports.merge import merge

            bad = [kv for kv in args.set if "=" not in kv]
            if bad:
                raise ValueError(f"--set: expected COLUMN=VALUE, got {bad[0]!r}")
            overrides = dict(kv.split("=", 1) for kv in args.set)
            n = merge(args.inputs, args.out, overrides)
            print(f"wrote {args.out} ({n} rows)")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
