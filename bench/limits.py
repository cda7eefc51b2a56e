"""Why a benchmark row misses a target: our kernel on that row's own step under Nsight Compute.

    python -m bench limits [--bench reports/out/bench.csv] [--out reports/out/limits.csv]

Every row of ours that misses a target (`short_rows`; ratios in kernel time: decode ours ÷ SDPA
on contiguous K/V and ÷ the best paged peer >= 1; batch-16 GQA decode at 1k/4k >= 60% of copy;
cross prefill at batch 64 >= 90% of copy) is rebuilt from its columns (`BenchCase.from_row`,
fp8 included) and its prepared call profiled once under `ncu` after a warm-up: DRAM
throughput, occupancy, waves, registers, warp stalls, and a one-line reading. A row without its
counters exits 1 after writing what it has; no GPU or no `ncu` exits 2.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conformance.schema import BENCH_SHAPE as SHAPE

KERNEL = "_paged_attention_kernel"
DECODE_FAMILIES = ("cross-decode", "self-decode")
GQA_COPY_TARGET = 0.60
FEW_WAVES = 0.75  # ncu's waves: a grid of 0.97 fills the GPU, one of 0.48 leaves half idle
CROSS_PREFILL_COPY_TARGET = 0.90

# ncu metrics (raw page, one column each), by the names this CSV gives them.
METRICS = {
    "kernel_us": "gpu__time_duration.sum",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "theoretical_occupancy_pct": "sm__maximum_warps_per_active_cycle_pct",
    "waves": "launch__waves_per_multiprocessor",
    "registers": "launch__registers_per_thread",
    "grid": "launch__grid_size",
}
# Time metrics, and the factor from each unit ncu may print them in to microseconds.
TIMES = ("kernel_us",)
TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
         "s": 1e6, "second": 1e6}  # fmt: skip
NEEDED = ("dram_pct", "achieved_occupancy_pct", "theoretical_occupancy_pct", "waves")
# Warp stall reasons, by the first family of names present (ncu versions differ): warps stalled
# per issued instruction, else the same as a latency, else the PC-sampling counts.
STALL_FAMILIES = (
    re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$"),
    re.compile(r"^smsp__average_warp_latency_issue_stalled_(\w+?)\.ratio$"),
    re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$"),
)
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")


def short_rows(bench: pd.DataFrame) -> pd.DataFrame:
    """Ours on every shape that misses a target, with `missed` (the targets, '; '-joined) and the
    ratios: the shape columns, ours_gbps (kernel time), frac_of_copy, ours_vs_sdpa, best_peer,
    ours_vs_best_peer."""
    from bench.analysis import family_tables

    out = []
    for fam, t in family_tables(bench).items():
        if fam not in DECODE_FAMILIES and fam != "cross-prefill":
            continue
        for _, r in t.iterrows():
            missed = []
            if fam in DECODE_FAMILIES:
                if r["ours ÷ sdpa"] < 1:
                    missed.append(f"ours/sdpa {r['ours ÷ sdpa']:.3f} < 1")
                if r["ours ÷ peer"] < 1:
                    missed.append(f"ours/{r['best peer']} {r['ours ÷ peer']:.3f} < 1")
                small_gqa = (
                    fam == "self-decode"
                    and r.batch == 16
                    and r.context_len in (1024, 4096)
                    and r.num_heads // r.num_kv_heads in (4, 8)
                )
                if small_gqa and r["ours ÷ limit"] < GQA_COPY_TARGET:
                    missed.append(f"copy {r['ours ÷ limit']:.1%} < {GQA_COPY_TARGET:.0%}")
            elif r.batch == 64 and r["ours ÷ limit"] < CROSS_PREFILL_COPY_TARGET:
                missed.append(f"copy {r['ours ÷ limit']:.1%} < {CROSS_PREFILL_COPY_TARGET:.0%}")
            if missed:
                out.append(
                    {
                        **{k: r[k] for k in SHAPE},
                        "ours_gbps": r["ours"],
                        "frac_of_copy": r["ours ÷ limit"],
                        "ours_vs_sdpa": r["ours ÷ sdpa"],
                        "best_peer": r["best peer"],
                        "ours_vs_best_peer": r["ours ÷ peer"],
                        "missed": "; ".join(missed),
                    }
                )
    return pd.DataFrame(out, columns=[*SHAPE, *RATIOS])


RATIOS = ["ours_gbps", "frac_of_copy", "ours_vs_sdpa", "best_peer", "ours_vs_best_peer", "missed"]


def parse_ncu_raw(text: str, kernel: str = KERNEL) -> list[dict[str, float]]:
    """The kernels of `kernel` in launch order from `ncu --csv --page raw` output: per kernel
    the METRICS (by our names) and `stall_<reason>` for each warp-stall ratio. Lines that are not
    the CSV (ncu's ==PROF== lines, the program's own output) are skipped."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    table = list(csv.reader(io.StringIO("\n".join(lines))))
    header = table[0]
    col = {name: i for i, name in enumerate(header)}
    name_col = col.get("Kernel Name")
    # The row after the header gives each column's unit; ncu picks a time's unit (ns, us,
    # msecond...) itself, so times are scaled to microseconds by it (an unknown unit: nan).
    units = table[1] if len(table) > 1 and len(table[1]) == len(header) else [""] * len(header)
    kernels = []
    for cells in table[1:]:
        if len(cells) != len(header) or name_col is None or kernel not in cells[name_col]:
            continue  # the units row, other kernels
        row = {}
        for ours, metric in METRICS.items():
            row[ours] = _number(cells[col[metric]]) if metric in col else math.nan
            if ours in TIMES and metric in col:
                row[ours] *= TO_US.get(units[col[metric]].strip(), math.nan)
        for family in STALL_FAMILIES:
            stalls = {
                m.group(1): _number(cells[i])
                for name, i in col.items()
                if (m := family.match(name)) and not m.group(1).endswith("not_issued")
            }
            if stalls:
                row |= {f"stall_{k}": v for k, v in sorted(stalls.items())}
                break
        kernels.append(row)
    return kernels


def _number(cell: str) -> float:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return math.nan


def limit_reading(m: dict[str, float]) -> str:
    """One line on what limits a kernel, from its counters: at >= 80% DRAM busy, near the memory
    roof; with the grid well under one wave (< FEW_WAVES), latency: too few programs in flight;
    at its occupancy cap, memory latency at that occupancy; otherwise occupancy and top stall."""
    stalls = {k.removeprefix("stall_"): v for k, v in m.items() if k.startswith("stall_")}
    total = sum(v for v in stalls.values() if v == v)
    top, share = "", math.nan
    if total > 0:
        top = max(stalls, key=lambda k: stalls[k] if stalls[k] == stalls[k] else -1)
        share = stalls[top] / total
    top_text = f"top stall {top} {share:.0%}" if top else "no stall counters"
    dram, waves = m.get("dram_pct", math.nan), m.get("waves", math.nan)
    ach, theo = (
        m.get("achieved_occupancy_pct", math.nan),
        m.get("theoretical_occupancy_pct", math.nan),
    )
    if dram >= 80:
        return f"near the memory roof: DRAM {dram:.0f}% busy ({waves:.2f} waves), {top_text}"
    if waves < FEW_WAVES:
        return (
            f"latency: {waves:.2f} waves, occupancy {ach:.0f}% of {theo:.0f}%, "
            f"DRAM {dram:.0f}% busy, {top_text}"
        )
    if ach >= 0.9 * theo:
        regs = m.get("registers", math.nan)
        return (
            f"memory latency at the occupancy cap: {ach:.0f}% of {theo:.0f}% "
            f"({regs:.0f} registers), DRAM {dram:.0f}% busy, {top_text}"
        )
    return f"occupancy {ach:.0f}% of {theo:.0f}%, DRAM {dram:.0f}% busy, {top_text}"


def call_for(row: dict):
    """(step, our backend's prepared call on it) for a bench row's own workload (built on the
    GPU, as the bench builds it): the kernel and launch the row timed, fp8 caches included."""
    import torch

    from bench.workloads import BenchCase
    from optimized.triton_backend import TritonBackend

    step = BenchCase.from_row(row).shape().build("cuda" if torch.cuda.is_available() else "cpu")
    return step, TritonBackend().prepare(*step.args())


def profile_rows(rows_json: str) -> int:
    """The child under ncu: each row's call warmed up, then profiled once."""
    import torch

    rows = json.loads(Path(rows_json).read_text())
    for i, row in enumerate(rows):
        _, call = call_for(row)
        call()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"# limits: profiled {i} {row['workload']} b{row['batch']}", flush=True)
        del call
        torch.cuda.empty_cache()
    return 0


def run(bench_csv: str, out: str) -> int:
    import torch

    if not torch.cuda.is_available():
        print("python -m bench limits: needs a CUDA device (none here)", file=sys.stderr)
        return 2
    ncu = shutil.which("ncu")
    if ncu is None:
        print("python -m bench limits: needs Nsight Compute's `ncu` on PATH", file=sys.stderr)
        return 2
    if not Path(bench_csv).is_file():
        print(f"python -m bench limits: --bench {bench_csv}: no such file", file=sys.stderr)
        return 2
    short = short_rows(pd.read_csv(bench_csv))
    print(f"# {len(short)} rows of {bench_csv} miss a target", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    log = Path(out).with_suffix(".ncu.txt")
    log.write_text("")
    merged, all_ok = [], True
    # ncu runs per chunk of rows: one that fails or is cut short costs only its own rows, and the
    # CSV is rewritten after each chunk.
    for start in range(0, len(short), CHUNK):
        chunk = short.iloc[start : start + CHUNK]
        kernels, problem = _profile_chunk(ncu, chunk, Path(out).with_suffix(".rows.json"), log)
        for i, r in enumerate(chunk.to_dict("records")):
            m = kernels[i] if not problem else {}
            measured = not problem and not any(math.isnan(m.get(k, math.nan)) for k in NEEDED)
            all_ok = all_ok and measured
            reading = limit_reading(m) if measured else f"error: {problem or 'a counter missing'}"
            stalls = {k: v for k, v in m.items() if k.startswith("stall_")}
            merged.append({**r, **{k: m.get(k, math.nan) for k in METRICS}, "limit": reading})
            merged[-1].update(stalls)
        pd.DataFrame(merged).to_csv(out, index=False)
        print(f"# limits: {len(merged)} of {len(short)} rows profiled", flush=True)
    print(f"wrote {out} ({len(merged)} rows)")
    return 0 if all_ok else 1


CHUNK = 25


def _profile_chunk(ncu: str, chunk: pd.DataFrame, rows_json: Path, log: Path):
    """(kernels of the chunk's rows in order, "") or ([], what went wrong)."""
    rows_json.write_text(json.dumps(chunk[SHAPE].to_dict("records")))
    cmd = [ncu, "--csv", "--page", "raw", "--profile-from-start", "off", "--clock-control", "none"]
    cmd += ["-k", f"regex:{KERNEL}"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += ["--metrics", ",".join(METRICS.values())]
    cmd += [sys.executable, "-m", "bench", "limits-child", str(rows_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    with log.open("a") as f:
        f.write(proc.stdout + proc.stderr)
    kernels = parse_ncu_raw(proc.stdout)
    if proc.returncode != 0 or len(kernels) != len(chunk):
        problem = f"ncu exited {proc.returncode} with {len(kernels)} kernels for {len(chunk)} rows"
        print(f"python -m bench limits: {problem} (its output: {log})", file=sys.stderr)
        return [], problem
    return kernels, ""
