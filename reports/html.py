"""The self-contained HTML report: pandas Styler tables and matplotlib images inlined as PNG.

Sections: header (environment, tier, totals, pass rate, wall time), summary backend × kind ×
phase, heatmaps of worst error ÷ tolerance, failures and errors with their re-run command, skip
reasons grouped, and performance where benchmark results exist.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bench.analysis import family_tables, fp8_table
from conformance.schema import BENCH_SHAPE, Status, rerun_command

STATUS_COLOURS = {
    Status.PASS: "#c8e6c9",
    Status.FAIL: "#ffcdd2",
    Status.ERROR: "#ffab91",
    Status.SKIP: "#eeeeee",
}
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f5f5f5; } td.reason, td.cmd { text-align: left; font-family: monospace; }
.totals span { display: inline-block; margin-right: 1.5em; font-size: 18px; }
.heatmaps img, .perf img { max-width: 100%; margin: 0.5em 0.5em 0 0; }
.note { color: #666; font-size: 13px; }
.interrupted { background: #ffab91; padding: 0.6em 1em; font-weight: bold; }
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return (
        f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Counts of pass/fail/error/skip per backend × attention kind × phase."""
    counts = (
        df.groupby(["backend", "attn_kind", "phase", "status"])
        .size()
        .unstack("status", fill_value=0)
    )
    for s in STATUS_COLOURS:
        if s not in counts:
            counts[s] = 0
    counts = counts[list(STATUS_COLOURS)]
    counts["compared"] = counts["pass"] + counts["fail"]
    return counts


def model_table(df: pd.DataFrame, key: str = "model") -> pd.DataFrame | None:
    """Per model (or explicit shape: key="shape") × backend: rows, pass/fail/error/skip, worst
    error ÷ tolerance and precision ratio, and the attention kinds × phases that failed or
    errored (None: no such rows)."""
    m = df[df[key].astype(str) != ""]
    if m.empty:
        return None
    if key == "shape":  # say what each shape is: kind and phase, heads, head size, its file
        kind = m.groupby("shape").attn_kind.transform("first").where(m.phase != "episode", "")
        geometry = "h" + m.num_heads.astype(str) + "kv" + m.num_kv_heads.astype(str)
        geometry += " d" + m.head_size.astype(str) + " " + m["dtype"]
        what = (kind + " " + m.phase).str.strip() + ", " + geometry + ", " + m.cases_file
        m = m.assign(shape=m["shape"] + " (" + what + ")")
    counts = m.groupby([key, "backend", "status"]).size().unstack("status", fill_value=0)
    for st in STATUS_COLOURS:
        if st not in counts:
            counts[st] = 0
    t = counts[list(STATUS_COLOURS)]
    t.insert(0, "rows", t.sum(axis=1))
    g = m.groupby([key, "backend"])
    t["worst err ÷ tol"] = g.err_ratio.max()
    t["worst rms ratio"] = g.rms_ratio.max()
    bad = m[m.status.isin(["fail", "error"])]
    t["failing kind × phase"] = (
        bad.assign(kp=bad.attn_kind + " " + bad.phase)
        .groupby([key, "backend"])
        .kp.agg(lambda x: ", ".join(sorted(set(x))))
    )
    t["failing kind × phase"] = t["failing kind × phase"].fillna("")
    return t


def _colour_counts(col: pd.Series) -> list[str]:
    colour = STATUS_COLOURS.get(col.name)
    return [
        f"background-color: {colour}" if colour and v > 0 and col.name != "skip" else ""
        for v in col
    ]


def heatmap(df: pd.DataFrame, backend: str, rows: str, cols: str) -> str | None:
    """Worst error ÷ tolerance over two axes for one backend (compared rows only)."""
    sub = df[(df.backend == backend) & df.err_ratio.notna()]
    if sub.empty:
        return None
    grid = sub.pivot_table(index=rows, columns=cols, values="err_ratio", aggfunc="max")
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(grid.columns), 0.8 + 0.45 * len(grid)))
    data = grid.to_numpy(dtype=float)
    im = ax.imshow(
        np.log10(np.clip(data, 1e-3, 1e3)), cmap="RdYlGn_r", vmin=-3, vmax=1, aspect="auto"
    )
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=45, ha="right")
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"{backend}: worst error ÷ tolerance ({rows} × {cols})", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10(err ÷ tol); ≥ 0 fails")
    return _png(fig)


def _table(df: pd.DataFrame, caption: str = "", left: tuple[str, ...] = ()) -> str:
    styler = df.style.set_caption(caption).format(precision=3, na_rep="")
    for col in left:
        if col in df.columns:
            nowrap = {} if col == "reason" else {"white-space": "nowrap"}  # ids stay one line
            styler = styler.set_properties(
                subset=[col], **{"text-align": "left", "font-family": "monospace"}, **nowrap
            )
    return styler.to_html()


def single_reasons(skips: pd.DataFrame) -> pd.DataFrame:
    """One (backend, reason) row per single reason of each skip ('not supported: a; b' counts
    once under a and once under b, not under the combination)."""
    reasons = skips.reason.str.removeprefix("not supported: ").str.split("; ")
    return skips.assign(reason=reasons).explode("reason")[["backend", "reason"]]


def _ratio_colour(v) -> str:
    if not isinstance(v, float) or np.isnan(v):
        return ""
    colour = "#c8e6c9" if v >= 1.0 else ("#fff9c4" if v >= 0.95 else "#ffcdd2")
    return f"background-color: {colour}"


def _family_chart(fam: str, t: pd.DataFrame) -> str:
    """Achieved throughput of ours, the best peer, SDPA contiguous and the limit per shape
    (median over dtypes and block sizes), one unit per chart."""
    shape = t.apply(
        lambda r: (
            f"b{r.batch} c{r.context_len} q{r.query_len} h{r.num_heads}:{r.num_kv_heads} "
            f"d{r.head_size}"
        ),
        axis=1,
    )
    cols = ["ours", "peer", "sdpa contiguous", "limit"]
    agg = t.assign(shape=shape).groupby("shape", sort=False)[cols].median().iloc[:30]
    agg = agg.dropna(axis=1, how="all")
    fig, ax = plt.subplots(figsize=(9, 0.7 + 0.32 * len(agg) * max(1, len(agg.columns) / 2.5)))
    agg.plot.barh(ax=ax, width=0.8)
    ax.set_xlabel(f"{t.unit.iloc[0]} (kernel time)")
    ax.set_title(f"{fam}: achieved {t.unit.iloc[0]}", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    return _png(fig)


LIMIT_COLUMN = "why short (ncu)"


def with_limits(t: pd.DataFrame, limits: pd.DataFrame | None) -> pd.DataFrame:
    """A family table with the `bench limits` reading of each row that misses a target (the
    targets missed, then what ncu measured), empty for rows that miss none."""
    if limits is None or not len(limits):
        return t
    shape = [k for k in BENCH_SHAPE if k in limits.columns]  # older limits: no kv_cache_dtype
    lim = limits[[*shape, "missed", "limit"]].drop_duplicates(shape)
    lim = lim.assign(**{LIMIT_COLUMN: lim.missed.astype(str) + " — " + lim.limit.astype(str)})
    merged = t.merge(lim[[*shape, LIMIT_COLUMN]], on=shape, how="left")
    return merged.assign(**{LIMIT_COLUMN: merged[LIMIT_COLUMN].fillna("")})


def performance_section(
    bench: pd.DataFrame, csv_link: str | None = None, limits: pd.DataFrame | None = None
) -> str:
    """Per workload family: a chart and a table of ours vs the best peer, SDPA on contiguous
    K/V and the limit (kernel time, do_bench beside it as host-inclusive), and, with `limits`
    (`python -m bench limits`), what Nsight Compute measured on each row that misses a target.
    The full row list stays in the CSV."""
    parts = [
        "<p class='note'>Kernel time from CUDA-graph replay (do_bench, which includes the host's "
        "launch time, in its own column). Ratios: ≥ 1 green, ≥ 0.95 yellow, below red."
        + (f" Every row: <a href='{html.escape(csv_link)}'>bench.csv</a>." if csv_link else "")
        + (
            f" {len(limits)} rows miss a target (bench/limits.py); their last column says what "
            "ncu measured on our kernel there."
            if limits is not None and len(limits)
            else ""
        )
        + "</p>"
    ]
    fp8 = fp8_table(bench)
    if len(fp8):
        parts.append(
            "<h3>fp8 KV cache: our kernel against itself in bf16</h3><p class='note'>Same shape, "
            "same kernel; GB/s on the bytes each reads (fp8: one per element). Targets at batch "
            "≥ 64 and context ≥ 4k: fp8 time ≤ 0.60× bf16's, ≥ 85% of copy.</p>"
        )
        parts.append(
            fp8.style.format(precision=3, na_rep="")
            .format(precision=0, subset=["fp8 GB/s", "bf16 GB/s"])
            .hide(axis="index")
            .to_html()
        )
    for fam, t in family_tables(bench).items():
        unit = t.unit.iloc[0]
        parts.append(f"<h3>{html.escape(fam)} ({unit})</h3><div class='perf'>")
        parts.append(_family_chart(fam, t) + "</div>")
        t = with_limits(t, limits)
        shown = t.drop(columns=["workload", "unit"]).reset_index(drop=True)
        styler = (
            shown.style.format(precision=3, na_rep="")
            .format(
                precision=0,
                subset=["ours", "ours (do_bench)", "peer", "sdpa contiguous", "limit"],
                na_rep="",
            )
            .map(_ratio_colour, subset=["ours ÷ peer", "ours ÷ sdpa", "ours ÷ limit"])
        )
        parts.append(styler.to_html())
    return "".join(parts)


def render(
    df: pd.DataFrame,
    bench: pd.DataFrame | None = None,
    run_info: dict | None = None,
    title: str = "encdec-attn conformance report",
    limits: pd.DataFrame | None = None,
) -> str:
    """The whole page as one string."""
    run_info = run_info or {}
    env = df.iloc[0] if len(df) else None
    n = len(df)
    counts = df.status.value_counts().to_dict()
    compared = counts.get("pass", 0) + counts.get("fail", 0)
    pass_rate = counts.get("pass", 0) / compared if compared else float("nan")
    tiers = ", ".join(sorted(df.tier.fillna("?").astype(str).unique())) if n else "-"
    head = [f"<h1>{html.escape(title)}</h1>"]
    if (n and (df.run_state == "interrupted").any()) or run_info.get("state") == "interrupted":
        head.append(
            '<p class="interrupted">INTERRUPTED: this run did not finish. Tests that did not '
            "run are error rows; the gate refuses this result set.</p>"
        )
    elif n and (df.run_state != "complete").any():
        head.append(
            '<p class="interrupted">UNKNOWN STATE: some rows come from a run nobody recorded as '
            "finished (an older file, or a merge without run.json); the gate refuses them.</p>"
        )
    if env is not None:
        head.append(
            f'<p class="note">device {html.escape(str(env.device))} · torch {env.torch}'
            f" · triton {env.triton} · xformers {env.xformers} · commit {env.commit}"
            f" · {env.timestamp} · tier {html.escape(tiers)}"
            + (f" · wall time {run_info['wall_s']:.0f} s" if "wall_s" in run_info else "")
            + "</p>"
        )
    head.append(
        '<div class="totals">'
        + "".join(f"<span>{s}: <b>{counts.get(s, 0)}</b></span>" for s in STATUS_COLOURS)
        + f"<span>rows: <b>{n}</b></span><span>pass rate (of compared): <b>{pass_rate:.1%}</b>"
        "</span></div>"
    )
    body = []
    body.append("<h2 id='summary'>Summary</h2>")
    body.append(
        summary_table(df)
        .style.apply(_colour_counts)
        .set_caption("rows per backend × attention kind × phase")
        .to_html()
    )

    body.append(
        "<h2 id='heatmaps'>Worst error ÷ tolerance</h2><p class='note'>Per backend; "
        "1.0 is the tolerance. Blank cells: nothing compared there.</p>"
        "<div class='heatmaps'>"
    )
    for backend in sorted(df.backend.unique()):
        for rows, cols in (("block_size", "batch_shape"), ("dtype", "heads")):
            d = df.assign(heads=df.num_heads.astype(str) + ":" + df.num_kv_heads.astype(str))
            img = heatmap(d, backend, rows, cols)
            if img:
                body.append(img)
    body.append("</div>")

    models = model_table(df)
    if models is not None:
        body.append(
            "<h2 id='models'>Models</h2><p class='note'>Rows of cases generated around a "
            "model preset (<code>--model</code>), per model × backend.</p>"
        )
        body.append(models.style.apply(_colour_counts).format(precision=3, na_rep="").to_html())
    shapes = model_table(df, "shape")
    if shapes is not None:
        body.append(
            "<h2 id='shapes'>Explicit shapes</h2><p class='note'>Rows of explicit shapes "
            "(<code>--cases FILE</code>), per shape × backend; a shape is re-run with "
            "<code>python -m conformance run --cases FILE --case ID</code>.</p>"
        )
        body.append(shapes.style.apply(_colour_counts).format(precision=3, na_rep="").to_html())

    bad = df[df.status.isin(["fail", "error"])]
    body.append(f"<h2 id='failures'>Failures and errors ({len(bad)})</h2>")
    if len(bad):
        shown = bad.assign(rerun=bad.apply(rerun_command, axis=1))[
            [
                "case_id",
                "backend",
                "step",
                "status",
                "reason",
                "attn_kind",
                "phase",
                "batch_shape",
                "block_size",
                "num_heads",
                "num_kv_heads",
                "head_size",
                "dtype",
                "layout",
                "max_abs_err",
                "err_ratio",
                "mismatch_frac",
                "nan_count",
                "rms_ratio",
                "rerun",
            ]
        ]
        body.append(_table(shown.reset_index(drop=True), left=("case_id", "reason", "rerun")))
    else:
        body.append("<p>None: every compared step is within tolerance.</p>")

    skips = df[df.status == "skip"]
    body.append(f"<h2 id='skips'>Skip reasons ({len(skips)})</h2>")
    if len(skips):
        grouped = (
            single_reasons(skips)
            .groupby(["backend", "reason"])
            .size()
            .rename("rows")
            .reset_index()
            .sort_values(["backend", "rows"], ascending=[True, False])
        )
        body.append(_table(grouped.reset_index(drop=True), left=("backend", "reason")))
    else:
        body.append("<p>No skips.</p>")

    body.append("<h2 id='performance'>Performance</h2>")
    if bench is not None and len(bench):
        body.append(performance_section(bench, run_info.get("bench_csv"), limits))
    else:
        body.append(
            "<p class='note'>No benchmark results (run <code>make bench</code> on a GPU,"
            " or render with <code>--bench reports/results/h100/bench.csv</code>).</p>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{CSS}</style></head><body>{''.join(head)}{''.join(body)}"
        "</body></html>"
    )


def write_report(
    results: list[str | Path],
    out: str | Path,
    bench: str | Path | None = None,
    title: str | None = None,
) -> Path:
    from conformance.schema import read_csv
    from reports.gate import load_bench

    df = pd.concat([read_csv(p) for p in results], ignore_index=True)
    bench_df = load_bench(str(bench), "--bench") if bench else None
    # `python -m bench limits` writes limits.csv beside the bench file it read.
    limits_path = Path(bench).parent / "limits.csv" if bench_df is not None else None
    limits_df = pd.read_csv(limits_path) if limits_path and limits_path.exists() else None
    if limits_df is not None:
        need = [c for c in BENCH_SHAPE if c != "kv_cache_dtype"]
        lacking = [c for c in [*need, "missed", "limit"] if c not in limits_df]
        if lacking:
            raise ValueError(f"{limits_path}: not a `bench limits` file (lacks {lacking})")
    info_path = Path(results[0]).parent / "run.json"
    run_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    out = Path(out)
    if bench_df is not None:
        run_info["bench_csv"] = os.path.relpath(Path(bench).resolve(), out.resolve().parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = title or "encdec-attn conformance report"
    out.write_text(render(df, bench_df, run_info, title, limits_df))
    return out
