"""fp8 decode against 16-bit decode, shape for shape, in one run of our backend:

    python -m tuning.fp8_decode [--out DIR] [--ncu]

For the grid's decode geometries (MHA d128/d64, GQA 4:1 and 8:1, batch 64 at 4k and batch 16 at
1k, page 16) and the models' self-decode steps, each cache dtype (the model's, fp8 e4m3, e5m2)
is judged as the matrix judges it, then timed: CUDA-graph kernel time beside do_bench, GB/s of
the step's own K/V bytes (fp8: one a value), the fraction of the card's copy bandwidth, and
fp8 ÷ 16-bit (`DIR/fp8.csv`). With `--ncu`, the batch-64 rows' prepared calls are profiled
once each under Nsight Compute with its whole sections (raw page: every counter, whatever its
name on this ncu): `DIR/fp8-ncu.csv`, read with `readings()` (instructions, shared-memory
loads, registers, occupancy, DRAM busy). Lab apparatus for the fp8 decode kernel, not a user's
bench (that is `python -m bench`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

GEOS = [(32, 32, 128), (32, 32, 64), (32, 8, 128), (32, 4, 128)]
PAIRS = [(64, 4096), (16, 1024)]
KV = ("auto", "fp8_e4m3", "fp8_e5m2")
MODELS = ("whisper-large-v3", "bart-large", "flan-t5-xl")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "InstructionStats",
            "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis")  # fmt: skip


def cases():
    from bench.workloads import BenchCase
    from conformance.models import MODELS as PRESETS

    out = []
    for b, ctx in PAIRS:
        for h, kv, d in GEOS:
            out += [BenchCase("self-decode", "grid", b, ctx, 1, h, kv, d, 16, "bfloat16", f)
                    for f in KV]  # fmt: skip
    for name in MODELS:
        m = PRESETS[name]
        geo = (m.num_heads, m.num_kv_heads, m.head_size)
        out += [BenchCase("self-decode", name, 64, m.decoder_max, 1, *geo, 16, m.dtype, f)
                for f in KV[:2]]  # fmt: skip
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each row with `vs_16bit`: its kernel time ÷ its 16-bit twin's (same shape)."""
    key = lambda r: (r["workload"], r["batch"], r["context_len"], r["num_heads"],
                     r["num_kv_heads"], r["head_size"])  # fmt: skip
    base = {key(r): r["graph_ms"] for r in rows if r["kv_cache_dtype"] == "auto"}
    return [dict(r, vs_16bit=r["graph_ms"] / base.get(key(r), float("nan"))) for r in rows]


def measure(out: Path) -> list[dict]:
    import torch

    from bench import harness
    from conformance.schema import BENCH_COLUMNS
    from optimized.backend import get_backend

    card = harness.measured_card(torch.device("cuda"))
    print(f"# {card.name}: copy {card.copy_gbps:.0f} GB/s", flush=True)
    chosen = [(c.workload, c.shape()) for c in cases()]
    rows = [r for r in harness.bench_rows(chosen, [(get_backend("triton"), "")], card)
            if r["backend"] == "triton"]  # fmt: skip
    rows = ratios(rows)
    with open(out / "fp8.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*BENCH_COLUMNS, "vs_16bit"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"{r['workload']:28s} b{r['batch']:<3d} ctx{r['context_len']:<6d} "
              f"h{r['num_heads']}kv{r['num_kv_heads']} d{r['head_size']} {r['kv_cache_dtype']:9s}"
              f" {r['status']:5s} {1e3 * r['graph_ms']:8.1f} us {r['graph_gbps']:6.0f} GB/s "
              f"{r['frac_of_limit']:5.2f} of copy  x{r['vs_16bit']:.2f}", flush=True)  # fmt: skip
    return rows


def profile(out: Path, rows: list[dict]) -> int:
    """Nsight Compute over the batch-64 rows (one kernel each), raw counters to fp8-ncu.csv."""
    ncu = shutil.which("ncu")
    if ncu is None:
        print("# no ncu on PATH: no counters", flush=True)
        return 2
    from conformance.schema import BENCH_SHAPE

    chosen = [{k: r[k] for k in BENCH_SHAPE} for r in rows if r["batch"] == 64]
    spec = out / "fp8-ncu-rows.json"
    spec.write_text(json.dumps(chosen))
    cmd = [ncu, "--csv", "--page", "raw", "--profile-from-start", "off", "--clock-control",
           "none", "-k", "regex:_paged_attention_kernel"]  # fmt: skip
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += [sys.executable, "-m", "bench", "limits-child", str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / "fp8-ncu.log").write_text(proc.stderr[-20000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('"')]
    (out / "fp8-ncu.csv").write_text("\n".join(lines) + "\n")
    print(f"# ncu exited {proc.returncode}: {max(0, len(lines) - 2)} kernels", flush=True)
    return proc.returncode


def readings(ncu_csv: str, rows_json: str) -> list[dict]:
    """The counters that say where an fp8 decode's time goes, per profiled row."""
    table = list(csv.reader(io.StringIO(Path(ncu_csv).read_text())))
    header, units, body = table[0], table[1], table[2:]
    rows = json.loads(Path(rows_json).read_text())
    want = {
        "us": "gpu__time_duration.sum",
        "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "registers": "launch__registers_per_thread",
        "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
        "instructions": "smsp__inst_executed.sum",
        "shared_ld_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
        "shared_st_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
        "shared_bytes": "launch__shared_mem_per_block",
    }
    col = {n: i for i, n in enumerate(header)}
    out = []
    for row, cells in zip(rows, body):
        r = {k: row[k] for k in ("workload", "batch", "context_len", "num_heads",
                                 "num_kv_heads", "head_size", "kv_cache_dtype")}  # fmt: skip
        for name, metric in want.items():
            r[name] = cells[col[metric]] if metric in col else ""
        r["time_unit"] = units[col["gpu__time_duration.sum"]] if "gpu__time_duration.sum" in col \
            else ""  # fmt: skip
        out.append(r)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.fp8_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="reports/out/fp8")
    p.add_argument("--ncu", action="store_true", help="profile the batch-64 rows under ncu")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(out)
    return profile(out, rows) if args.ncu else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
