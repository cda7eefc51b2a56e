"""`make bench`: on a GPU, the benchmark grid to reports/out/bench.csv; any backend (yours, ours, a
peer) beside every peer on the matrix's workloads with `--backend`/`--backend-module`
(bench/backends.py); without a GPU, a tiny smoke of that path, labelled as CPU timings.

    python -m bench [--out reports/out/bench.csv] [--quick] [--only WORKLOAD ...]
    python -m bench --backend-module path/to/mine.py:Mine [--backend NAME] [--model NAME|all]
                    [--batches 1,16,64,256] [--cases FILE]
    python -m bench tune [--only SECTION ...]   (launch-parameter sweeps, see bench/tune.py)
    python -m bench profile   (the weak-spot kernels once each, to run under ncu)
    python -m bench limits [--bench reports/out/bench.csv] [--out reports/out/limits.csv]
                              (each row short of a target: our kernel under ncu, bench/limits.py)
    python -m bench registers [--arch 90] [--head-size 128] [--group 1] [--fp8] [--sass]
                              (offline: registers, shared memory, occupancy of each decode launch)
    python -m bench replay SWEEP.csv ... [--card h200]
                              (offline: the launch rule's choice on a card's sweep, bench/replay.py)
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


def gpu_grid(quick: bool, only: list[str] | None, out: str | None = None):
    """The grid; with `out`, the CSV is rewritten after every job (a run cut short keeps it)."""
    from bench import gpu

    limits = gpu.Limits()
    print(
        f"# {limits.device}: bf16 matmul {limits.matmul_tflops:.0f} TFLOP/s, "
        f"copy {limits.copy_gbps(1 << 30):.0f} GB/s",
        flush=True,
    )
    jobs = []
    # decode grid: batch × context × GQA × head size × block size, bf16 (fp16 on a subset)
    for batch, ctx in (
        [(16, 1024), (64, 4096), (4, 32768)]
        if quick
        else [(16, 1024), (64, 1024), (16, 4096), (64, 4096), (16, 16384), (4, 32768)]
    ):
        for heads, kv in ((32, 32), (32, 8), (32, 4)):
            for hs in (128, 64) if heads == kv else (128,):
                for bs in (16, 32, 256):
                    for dtype in ("bfloat16", "float16") if bs == 16 else ("bfloat16",):
                        jobs.append(
                            (
                                "decode-self",
                                lambda b=batch, c=ctx, h=heads, k=kv, d=hs, s=bs, t=dtype: (
                                    gpu.decode_rows(
                                        limits, "decode-self", b, c, h, k, d, s, t, True
                                    )
                                ),
                            )
                        )
    # fp8 KV caches: the same decode shapes with fp8_e4m3 pages (block sizes 16 and 256), and
    # fp8_e5m2 at page 16 on the batch-64 shapes (the format changes nothing the kernel reads).
    for batch, ctx in (
        [(16, 1024), (64, 4096)]
        if quick
        else [(16, 1024), (64, 1024), (16, 4096), (64, 4096), (16, 16384), (4, 32768)]
    ):
        for heads, kv in ((32, 32), (32, 8), (32, 4)):
            for hs in (128, 64) if heads == kv else (128,):
                formats = [("fp8_e4m3", 16), ("fp8_e4m3", 256)]
                formats += [("fp8_e5m2", 16)] if batch == 64 else []
                for fmt, bs in formats:
                    jobs.append(
                        (
                            "decode-self",
                            lambda b=batch, c=ctx, h=heads, k=kv, d=hs, s=bs, f=fmt: (
                                gpu.decode_rows(
                                    limits, "decode-self", b, c, h, k, d, s, "bfloat16", True, kv=f
                                )
                            ),
                        )
                    )
    from conformance.models import MODELS

    for model in gpu.BENCH_MODELS:
        m = MODELS[model]
        for batch in (64, 256):  # the model decode shapes with an fp8_e4m3 cache, page 16
            for fam, length, causal in (
                ("cross-decode", m.encoder_len, False),
                ("self-decode", m.decoder_max, True),
            ):
                jobs.append(
                    (
                        f"{fam}:{model}",
                        lambda b=batch, m=m, n=model, f=fam, n_=length, c=causal: gpu.decode_rows(
                            limits,
                            f"{f}:{n}",
                            b,
                            n_,
                            m.num_heads,
                            m.num_kv_heads,
                            m.head_size,
                            16,
                            "bfloat16",
                            c,
                            kv="fp8_e4m3",
                        ),
                    )
                )
        for batch in (64, 256):
            for bs in (16, 32, 64, 256):
                jobs.append(
                    (
                        f"cross-decode:{model}",
                        lambda b=batch, s=bs, m=m, n=model: gpu.decode_rows(
                            limits,
                            f"cross-decode:{n}",
                            b,
                            m.encoder_len,
                            m.num_heads,
                            m.num_heads,
                            m.head_size,
                            s,
                            "bfloat16",
                            False,
                        ),
                    )
                )
                jobs.append(
                    (
                        f"self-decode:{model}",
                        lambda b=batch, s=bs, m=m, n=model: gpu.decode_rows(
                            limits,
                            f"self-decode:{n}",
                            b,
                            m.decoder_max,
                            m.num_heads,
                            m.num_heads,
                            m.head_size,
                            s,
                            "bfloat16",
                            True,
                        ),
                    )
                )
            jobs.append(
                (
                    f"cross-prefill:{model}",
                    lambda b=batch, m=m, n=model: gpu.prefill_rows(
                        limits,
                        f"cross-prefill:{n}",
                        [4] * b,
                        [m.encoder_len] * b,
                        [0] * b,
                        m.num_heads,
                        m.num_heads,
                        m.head_size,
                        16,
                        "bfloat16",
                        False,
                    ),
                )
            )
        lens = [m.encoder_len - (37 * i) % 200 for i in range(16)]  # ragged encoder batch
        jobs.append(
            (
                f"encoder-prefill:{model}",
                lambda lens=lens, m=m, n=model: gpu.encoder_rows(
                    limits, f"encoder-prefill:{n}", lens, m.num_heads, m.head_size, "bfloat16"
                ),
            )
        )
    jobs.append(
        (
            "encoder-prefill:whisper-16x1500",
            lambda: gpu.encoder_rows(
                limits, "encoder-prefill:whisper-16x1500", [1500] * 16, 20, 64, "bfloat16"
            ),
        )
    )
    for ctx, chunk, heads, kv in ((4096, 512, 32, 8), (8192, 1024, 32, 8), (2048, 2048, 32, 32)):
        jobs.append(
            (
                "chunked-prefill",
                lambda c=ctx, q=chunk, h=heads, k=kv: gpu.prefill_rows(
                    limits,
                    "chunked-prefill",
                    [q] * 8,
                    [c + q] * 8,
                    [c] * 8,
                    h,
                    k,
                    128,
                    16,
                    "bfloat16",
                    True,
                ),
            )
        )
    for tokens in (1024, 8192, 32768):
        for bs in (16, 256):
            jobs.append(
                (
                    "cache-write",
                    lambda n=tokens, s=bs: gpu.cache_write_rows(limits, n, 8, 128, s, "bfloat16"),
                )
            )
    rows = []
    for name, job in jobs:
        if only and not any(name.startswith(o) for o in only):
            continue
        try:
            got = job()
        except Exception as e:  # one bad configuration never stops the grid
            print(f"! {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        for r in got:
            print(
                f"{r.workload:36s} {r.backend:17s} b{r.batch:<4d} c{r.context_len:<6d} "
                f"h{r.num_heads}/{r.num_kv_heads} d{r.head_size} bs{r.block_size:<4d} "
                f"{r.dtype:9s} {r.median_ms:8.3f} ms {r.gbps:8.0f} GB/s {r.tflops:7.1f} TF/s "
                f"{r.frac_of_limit:6.1%}",
                flush=True,
            )
        rows += [asdict(r) for r in got]
        torch.cuda.empty_cache()
        if out:
            write_rows(out, rows)
    return rows


DEFAULT_BENCH = "reports/out/bench.csv"


def write_rows(path: str, rows: list[dict]) -> None:
    from conformance.schema import BENCH_COLUMNS

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BENCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:  # NaN as an empty cell, as results.csv writes it
            w.writerow(
                {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            )


def parse_batches(text: str | None) -> tuple[int, ...]:
    """`--batches 1,64` -> (1, 64); None -> the default batches."""
    from bench.backends import BATCHES

    if text is None:
        return BATCHES
    try:
        out = tuple(int(b) for b in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise ValueError(f"--batches: expected positive integers separated by commas, got {text!r}")
    return out


def backend_path(args) -> list[dict]:
    """`--backend/--backend-module/--model/--cases`, or any run without CUDA: the named
    backends beside every registered peer on the matrix's workloads (bench/backends.py)."""
    from bench import backends
    from conformance import selection

    selection.check_model(args.model, None, args.cases)
    cuda = torch.cuda.is_available()
    batches = parse_batches(args.batches)
    if args.cases:
        workloads = backends.cases_workloads(args.cases)
    elif cuda:
        workloads = backends.model_workloads(args.model or "whisper-large-v3", batches)
    else:  # a tiny smoke of the same path: the model's lengths ÷ 16, batch 2
        small = batches if args.batches else (2,)
        workloads = backends.model_workloads(args.model or "whisper-large-v3", small, divide=16)
    peers = [b.name for b, _ in backends.peers()] if cuda else ["torch", "triton"]
    names = list(dict.fromkeys([*(args.backend or []), *peers]))
    picked = selection.backends(names, args.backend_module)
    if args.out is None:  # as `run`: a user's backend never overwrites the project's bench.csv
        mine = [b.name for b, spec in picked if spec]
        args.out = f"{selection.USER_OUT}/{mine[0]}/bench.csv" if mine else DEFAULT_BENCH
    limits = None
    if cuda:
        from bench import gpu

        limits = gpu.Limits()
    return backends.backend_rows(workloads, picked, limits, lambda r: write_rows(args.out, r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["replay"]:  # offline: the launch rule against a card's sweep
        from bench.replay import main as replay

        return replay(argv[1:])
    if argv[:1] == ["registers"]:  # offline: compiled for the card, no card needed
        from bench.registers import main as registers

        return registers(argv[1:])
    from optimized.kernels import interpret_without_cuda

    interpret_without_cuda()  # before Triton is imported: the CPU smoke runs our kernels too
    modes = ["grid", "tune", "profile", "limits", "limits-child", "registers", "replay"]
    p.add_argument("mode", nargs="?", default="grid", choices=modes)
    p.add_argument("rows", nargs="?", help=argparse.SUPPRESS)  # limits-child: its rows file
    p.add_argument(
        "--out",
        default=None,
        help="default: reports/out/<mode's file>.csv; a --backend-module run: "
        "reports/out/backends/<its name>/bench.csv",
    )
    p.add_argument("--bench", default="reports/out/bench.csv", help="limits: the bench CSV")
    p.add_argument("--quick", action="store_true", help="grid: fewer batch × context pairs")
    p.add_argument(
        "--only", nargs="*", default=None, help="grid: workloads by name prefix; tune: sections"
    )
    p.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="time a registered backend on the matrix's workloads beside every peer",
    )
    p.add_argument(
        "--backend-module",
        action="append",
        metavar="SPEC",
        help="your backend (package.module:Class or path/to/file.py:Class), timed the same way",
    )
    p.add_argument("--model", default=None, help="backend path: a model preset's shapes (or all)")
    p.add_argument(
        "--batches",
        default=None,
        metavar="B,B,...",
        help="backend path, --model: batch sizes (default 1,16,64,256; fewer fit --model all)",
    )
    p.add_argument("--cases", default=None, help="backend path: a cases file's explicit shapes")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.mode == "limits":
        from bench.limits import run

        return run(args.bench, args.out or "reports/out/limits.csv")
    if args.mode == "limits-child":
        from bench.limits import profile_rows

        return profile_rows(args.rows)
    if args.mode in ("tune", "profile") and not torch.cuda.is_available():
        print(f"python -m bench {args.mode}: needs a CUDA device (none here)", file=sys.stderr)
        return 2
    if args.mode == "tune":
        from bench.tune import main as tune

        return tune(args.only)
    if args.mode == "profile":
        from bench.tune import profile

        return profile()
    by_backend = args.backend or args.backend_module or args.model or args.cases or args.batches
    try:
        if by_backend or not torch.cuda.is_available():
            rows = backend_path(args)
        else:
            args.out = args.out or DEFAULT_BENCH
            rows = gpu_grid(args.quick, args.only, args.out)
    except ValueError as e:  # a usage mistake: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_rows(args.out, rows)
    for r in rows:
        if r.get("status") is not None and r["backend"] not in ("copy", "matmul"):
            speed = f"{r['gbps']:8.0f} GB/s" if r.get("gbps") == r.get("gbps") else "       -"
            print(f"{r['workload']:30s} {r['backend']:16s} b{r['batch']:<4d} {r['status']:5s} "
                  f"{r['median_ms']:9.3f} ms {speed} {r.get('timed', '')}"[:160])  # fmt: skip
    print(f"wrote {args.out} ({len(rows)} rows) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
