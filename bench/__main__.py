"""`make bench`: every workload judged as the matrix judges it, then timed, beside every peer.

    python -m bench [--quick] [--only FAMILY ...] [--out reports/out/bench.csv]
    python -m bench --backend-module path/to/mine.py:Mine [--backend NAME ...]
                    [--model NAME|all] [--batches 1,16,64,256] [--cases FILE]
    python -m bench limits [--bench reports/out/bench.csv] [--out reports/out/limits.csv]

On a GPU the workloads are the grid (bench/workloads.py), a model's steps (`--model`) or a
cases file's shapes (`--cases`); every registered backend that runs here is timed beside the
ones named, and each workload gets its measured limit's row. Without a GPU: a tiny smoke of
the same path (Whisper large-v3's lengths ÷ 16, batch 2; torch and triton), CPU times.
`limits`: each row of ours that misses a target, profiled under Nsight Compute (limits.py).
Launch sweeps and their replay are tuning apparatus: tuning/README.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

DEFAULT_BENCH = "reports/out/bench.csv"


def write_rows(path: str, rows: list[dict]) -> None:
    from conformance.schema import BENCH_COLUMNS

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BENCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:  # NaN as an empty cell, as results.csv writes it
            w.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v
                        for k, v in r.items()})  # fmt: skip


def parse_batches(text: str | None) -> tuple[int, ...]:
    from bench.workloads import MODEL_BATCHES

    if text is None:
        return MODEL_BATCHES
    if not all(b.isdigit() and int(b) > 0 for b in text.split(",")):
        raise ValueError(f"--batches: expected positive integers separated by commas, got {text!r}")
    return tuple(int(b) for b in text.split(","))


def run(args) -> list[dict]:
    """The workloads and backends the options choose, through the one harness."""
    import torch

    from bench import harness, workloads
    from conformance import selection

    selection.check_model(args.model, None, args.cases)
    cuda = torch.cuda.is_available()
    batches = parse_batches(args.batches)
    if args.cases:
        chosen = workloads.from_cases_file(args.cases)
    elif cuda and args.model:
        chosen = workloads.named(workloads.models(args.model, batches))
    elif cuda:
        chosen = workloads.named(workloads.grid(args.quick))
    else:  # a tiny smoke of the same path: the model's lengths ÷ 16, batch 2
        small = batches if args.batches else (2,)
        spec = args.model or "whisper-large-v3"
        chosen = workloads.named(workloads.models(spec, small, divide=16))
    if args.only:
        chosen = [w for w in chosen if any(w[0].startswith(o) for o in args.only)]
        if not chosen:
            raise ValueError(f"--only: no workload of families {args.only}")
    picked = selection.backends(args.backend or [], args.backend_module)
    names = {b.name for b, _ in picked}
    others = harness.peers() if cuda else selection.backends(["torch", "triton"], None)
    picked += [(b, s) for b, s in others if b.name not in names]
    if args.out is None:  # as `run`: a user's backend never overwrites the project's bench.csv
        mine = [b.name for b, spec in picked if spec]
        args.out = f"{selection.USER_OUT}/{mine[0]}/bench.csv" if mine else DEFAULT_BENCH
    card = harness.measured_card(torch.device("cuda")) if cuda else None
    if card is not None:
        print(f"# {card.name}: copy {card.copy_gbps:.0f} GB/s, bf16 matmul "
              f"{card.matmul_tflops:.0f} TFLOP/s", flush=True)  # fmt: skip
    return harness.bench_rows(chosen, picked, card, lambda r: write_rows(args.out, r))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from optimized.kernels import interpret_without_cuda

    interpret_without_cuda()  # before Triton is imported: the CPU smoke runs our kernels too
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("mode", nargs="?", default="run", choices=["run", "limits", "limits-child"])
    p.add_argument("rows", nargs="?", help=argparse.SUPPRESS)  # limits-child: its rows file
    p.add_argument("--out", default=None, help="the CSV (default: reports/out/bench.csv; a "
                   "--backend-module run: reports/out/backends/<its name>/bench.csv)")  # fmt: skip
    p.add_argument("--bench", default=DEFAULT_BENCH, help="limits: the bench CSV to read")
    p.add_argument("--quick", action="store_true", help="the grid: fewer batch × context pairs")
    p.add_argument("--only", nargs="*", default=None, help="workloads by name prefix (family)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="a registered backend, timed beside every peer")  # fmt: skip
    p.add_argument("--backend-module", action="append", metavar="SPEC",
                   help="your backend (package.module:Class or path/to/file.py:Class)")  # fmt: skip
    p.add_argument("--model", default=None, help="a model preset's steps (or all)")
    p.add_argument("--batches", default=None, metavar="B,B,...",
                   help="--model: batch sizes (default 1,16,64,256)")  # fmt: skip
    p.add_argument("--cases", default=None, help="a cases file's explicit shapes")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.mode == "limits":
        from bench.limits import run as limits

        return limits(args.bench, args.out or "reports/out/limits.csv")
    if args.mode == "limits-child":
        from bench.limits import profile_rows

        return profile_rows(args.rows)
    try:
        rows = run(args)
    except ValueError as e:  # a usage mistake: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_rows(args.out, rows)
    for r in rows:
        if r["backend"] not in ("copy", "matmul"):
            speed = f"{r['gbps']:8.0f} GB/s" if r.get("gbps") == r.get("gbps") else "       -"
            print(f"{r['workload']:30s} {r['backend']:16s} b{r['batch']:<4d} {r['status']:5s} "
                  f"{r['median_ms']:9.3f} ms {speed} {r.get('timed', '')}"[:160])  # fmt: skip
    print(f"wrote {args.out} ({len(rows)} rows) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
