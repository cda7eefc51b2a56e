"""Bench analysis shared by the HTML report and `bench limits`: per workload family, our kernel
beside the best peer, SDPA on contiguous K/V and the measured limit, in kernel time."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from conformance.schema import BENCH_COLUMNS, BENCH_LATER, BENCH_SHAPE, Status

OURS = "triton"
LIMITS = ("copy", "matmul")  # the measured limits' own rows
CONTIGUOUS = "sdpa-contiguous"  # SDPA on contiguous K/V: what a paged kernel can hope to match
# Rows with a time: a pass, a measured limit, '' (a file from before rows had a status)
TIMED = (Status.PASS, "measured", "")


def with_columns(bench: pd.DataFrame) -> pd.DataFrame:
    b = bench.copy()
    for c in BENCH_COLUMNS:  # an older or partial bench file: absent columns are empty
        if c not in b:
            b[c] = BENCH_LATER.get(c, "" if c in ("limit", "device") else np.nan)
    for c, default in BENCH_LATER.items():
        b[c] = b[c].fillna(default)
    return b


def _limit_value(text: str) -> float:
    """The number of a limit cell such as 'copy 2941 GB/s' or 'bf16 matmul 799 TFLOP/s'."""
    m = re.search(r"([0-9][0-9,.]*)\s*(GB/s|TFLOP/s)", str(text))
    return float(m.group(1).replace(",", "")) if m else float("nan")


def family_tables(bench: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per workload family (the workload before ':'), one row per configuration: our kernel, the
    best peer (named), SDPA on contiguous K/V and the measured limit, in kernel time (CUDA-graph
    replay; do_bench where a call could not be captured), with ratio columns. GB/s for
    memory-bound families, TFLOP/s for compute-bound ones, never mixed."""
    b = with_columns(bench)
    tflop = b["limit"].astype(str).str.contains("TFLOP") | (b.gbps.isna() & b.tflops.notna())
    b["unit"] = np.where(tflop, "TFLOP/s", "GB/s")
    b["do_bench"] = np.where(b.unit == "GB/s", b.gbps, b.tflops)
    graph = b.graph_ms
    b["kernel"] = (b.do_bench * b.median_ms / graph).where(graph.notna() & (graph > 0))
    b["best"] = b.kernel.fillna(b.do_bench)
    b["timed"] = np.where(b.kernel.notna(), "graph", "do_bench")
    b = b[b.status.astype(str).isin(TIMED)]
    out = {}
    for fam, g in b.groupby(b.workload.str.split(":").str[0], sort=False):
        rows = []
        for _, gg in g.groupby(BENCH_SHAPE, dropna=False, sort=False):
            o = gg[gg.backend == OURS]
            if o.empty:
                continue
            o = o.iloc[0]
            peers = gg[~gg.backend.isin([OURS, *LIMITS, CONTIGUOUS])]
            peer = peers.loc[peers.best.idxmax()] if len(peers) else None
            sdpa = gg[gg.backend == CONTIGUOUS]
            sdpa_v = sdpa.best.iloc[0] if len(sdpa) else np.nan
            limit = _limit_value(o["limit"])
            rows.append(
                {
                    **{k: o[k] for k in BENCH_SHAPE},
                    "unit": o.unit,
                    "ours": o.best,
                    "ours (do_bench)": o.do_bench,
                    "timed": o.timed,
                    "best peer": peer.backend if peer is not None else "",
                    "peer": peer.best if peer is not None else np.nan,
                    "sdpa contiguous": sdpa_v,
                    "limit": limit,
                    "ours ÷ peer": o.best / peer.best if peer is not None else np.nan,
                    "ours ÷ sdpa": o.best / sdpa_v,
                    "ours ÷ limit": o.best / limit,
                }
            )
        if rows:
            out[fam] = pd.DataFrame(rows)
    return out


def fp8_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Our kernel with an fp8 cache against our kernel with the model dtype's on the same shape
    (kernel time; the targets: <= 0.60x at batch >= 64 and context >= 4k, >= 85% of copy
    on the fp8 bytes read). One row per fp8 shape that has its bf16 twin."""
    out = []
    for t in family_tables(bench).values():
        fp8 = t[t.kv_cache_dtype != "auto"]
        base = t[t.kv_cache_dtype == "auto"]
        shape = [k for k in BENCH_SHAPE if k != "kv_cache_dtype"]  # workload first
        for _, r in fp8.iterrows():
            twin = base[(base[shape] == r[shape]).all(axis=1)]
            if twin.empty:
                continue
            b = twin.iloc[0]
            # kernel time = bytes / GB/s, and fp8 reads half the bytes of bf16
            ratio = (b.ours / r.ours) / 2 if b.unit == r.unit == "GB/s" else np.nan
            out.append(
                {
                    **{k: r[k] for k in shape},
                    "kv_cache_dtype": r.kv_cache_dtype,
                    "fp8 GB/s": r.ours,
                    "fp8 ÷ copy": r["ours ÷ limit"],
                    "bf16 GB/s": b.ours,
                    "fp8 time ÷ bf16 time": ratio,
                    "timed": r.timed,
                }
            )
    return pd.DataFrame(out)


def backend_tables(bench: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The backend path's rows (`python -m bench --backend/--backend-module`), per workload
    family: each backend's verdict on the shape, its time (CUDA-graph kernel time, else
    do_bench, else CPU wall), GB/s or TFLOP/s, ratio to the best other backend that passed and
    to the limit; `yours` marks a --backend-module backend."""
    b = with_columns(bench)
    rows = b[~b.backend.isin(LIMITS) & (b.status.astype(str) != "")]
    limits = b[b.backend.isin(LIMITS)]
    if rows.empty:
        return {}
    rows = rows.assign(ms=rows.graph_ms.where(rows.graph_ms > 0, rows.median_ms))
    shape = [k for k in BENCH_SHAPE if k != "kv_cache_dtype"]
    out = {}
    for fam, g in rows.groupby(rows.workload.str.split(":").str[0], sort=False):
        table = []
        for _, gg in g.groupby(shape, sort=False):
            ok = gg[gg.status == Status.PASS]
            memory = gg.query_len.iloc[0] <= 16
            lim = limits.merge(gg[shape].head(1), on=shape)
            limit = (lim.gbps if memory else lim.tflops).max() if len(lim) else np.nan
            for _, r in gg.iterrows():
                timed = r.status == Status.PASS
                speed = (
                    (r.gbps if memory else r.tflops) * r.median_ms / r.ms if r.ms > 0 else np.nan
                )
                others = ok[ok.backend != r.backend]
                best = others.loc[others.ms.idxmin()] if len(others) else None
                table.append(
                    {
                        "workload": r.workload,
                        "batch": r.batch,
                        "context_len": r.context_len,
                        "query_len": r.query_len,
                        "backend": r.backend,
                        "yours": "◀ yours" if str(r.backend_module) else "",
                        "status": r.status,
                        "ms": r.ms if timed else np.nan,
                        "GB/s" if memory else "TFLOP/s": speed if timed else np.nan,
                        "best other": best.backend if best is not None else "",
                        "÷ best other": best.ms / r.ms if best is not None and timed else np.nan,
                        "÷ limit": speed / limit if timed else np.nan,
                        "timed": r.timed,
                    }
                )
        out[fam] = pd.DataFrame(table)
    return out
