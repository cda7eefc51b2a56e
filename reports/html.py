"""The self-contained HTML report: tables (pandas Styler) and matplotlib images inlined as PNG,
laid out to read at 1280-1440 px without a horizontal scroll bar.

Sections: a verdict banner; environment and totals; summary (per backend, and backend × kind ·
phase); worst error ÷ tolerance heatmaps; models and explicit shapes; failures and errors, each
with the command that re-runs it; skip reasons; performance where benchmark results exist (fp8
against bf16, then per workload family a chart and a table).
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
from matplotlib.colors import LinearSegmentedColormap

from bench.analysis import backend_tables, family_tables, fp8_table, with_columns
from conformance.schema import BENCH_SHAPE, Status, dump_command, rerun_command, shrink_command

STATUS_COLOURS = {
    Status.PASS: "#c8e6c9",
    Status.FAIL: "#ffcdd2",
    Status.ERROR: "#ffab91",
    Status.SKIP: "#eeeeee",
}
CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; font-size: 14px; }
h1 { margin: 0 0 0.2em; font-size: 26px; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; font-size: 20px; }
h3 { margin: 1.2em 0 0.3em; font-size: 16px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 0.4em 0; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; text-align: center; }
td.text, th.text { text-align: left; }
.wrap { text-align: left; overflow-wrap: anywhere; max-width: 560px; }
.id { text-align: left; font-family: monospace; font-size: 12px; overflow-wrap: anywhere;
      max-width: 330px; }
code { font-size: 12px; overflow-wrap: anywhere; }
.cmd { display: block; margin-top: 3px; color: #444; }
.totals span { display: inline-block; margin-right: 1.5em; font-size: 17px; }
.heatmaps img, .perf img { max-width: 100%; margin: 0.4em 0.4em 0 0; vertical-align: top; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
.banner { padding: 0.6em 1em; font-weight: 600; font-size: 16px; margin: 0.6em 0; }
.ok { background: #c8e6c9; } .bad { background: #ffcdd2; } .warn { background: #ffab91; }
"""
# Worst error ÷ tolerance: green well inside, yellow near, red at or past the tolerance (1.0).
RATIO_MAP = LinearSegmentedColormap.from_list(
    "ratio", [(0, "#1a9850"), (0.4, "#a6d96a"), (0.6, "#fee08b"), (0.67, "#f46d43"), (1, "#a50026")]
)
RATIO_MAX = 1.5
# Workload families as the bench names them, as the report titles them.
FAMILY_TITLES = {
    "decode-self": "Decode, self-attention: the grid (batch × context × heads × page)",
    "self-decode": "Decode, self-attention (the grid: batch × context × heads × page; models)",
    "cross-decode": "Decode, cross-attention: model shapes",
    "cross-prefill": "Cross-attention prefill (a few decoder tokens over the encoder)",
    "encoder-prefill": "Encoder prefill",
    "chunked-prefill": "Chunked prefill",
    "cache-write": "Cache write",
    "encoder": "Encoder (model shapes)",
    "shape": "Explicit shapes",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return (
        f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def _styled(df: pd.DataFrame, classes: dict[str, str] | None = None, precision: int = 3):
    """A Styler without the index, numbers at `precision`, and CSS classes per column
    (`text`, `wrap`, `id`)."""
    styler = df.style.format(precision=precision, na_rep="").hide(axis="index")
    for col, cls in (classes or {}).items():
        if col in df.columns:
            styler = styler.set_td_classes(
                pd.DataFrame(cls, index=df.index, columns=[col]).reindex(
                    columns=df.columns, fill_value=""
                )
            )
    return styler


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
    counts["compared"] = counts[Status.PASS] + counts[Status.FAIL]
    return counts


def backend_totals(df: pd.DataFrame) -> pd.DataFrame:
    """One row per backend: rows, pass, fail, error, skip, compared, pass rate."""
    t = summary_table(df).groupby("backend").sum()
    t.insert(0, "rows", t[list(STATUS_COLOURS)].sum(axis=1))
    t["pass rate"] = (t[Status.PASS] / t["compared"]).where(t["compared"] > 0)
    return t.reset_index()


def status_grid(df: pd.DataFrame, column: pd.Series) -> pd.DataFrame:
    """backend × the values of `column`: each cell 'pass/run' (rows not skipped; '—' where
    every row skipped)."""
    s = df.assign(col=column).groupby(["backend", "col", "status"]).size().unstack(fill_value=0)
    for st in STATUS_COLOURS:
        if st not in s:
            s[st] = 0
    run = s[Status.PASS] + s[Status.FAIL] + s[Status.ERROR]
    cell = pd.Series(np.where(run > 0, s[Status.PASS].astype(str) + "/" + run.astype(str), "—"),
                     index=s.index)  # fmt: skip
    return cell.unstack("col").fillna("").reset_index()


def kind_phase_grid(df: pd.DataFrame) -> pd.DataFrame:
    """backend × (kind · phase): each cell 'pass/run'."""
    short = {"encoder": "enc", "decoder": "dec", "encoder_decoder": "cross", "episode": "episode"}
    return status_grid(df, df.attn_kind.map(lambda k: short.get(k, k)) + " · " + df.phase)


def _grid_colour(v) -> str:
    if not isinstance(v, str) or "/" not in v:
        return "color: #999"
    ok, n = v.split("/")
    return f"background-color: {STATUS_COLOURS[Status.PASS if ok == n else Status.FAIL]}"


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
    bad = m[m.status.isin([Status.FAIL, Status.ERROR])]
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
        f"background-color: {colour}" if colour and v > 0 and col.name != Status.SKIP else ""
        for v in col
    ]


def heatmap(df: pd.DataFrame, backend: str, rows: str, cols: str) -> str | None:
    """Worst error ÷ tolerance over two axes for one backend (compared rows only): the colour
    and the number are the same linear ratio (1.0 is the tolerance)."""
    sub = df[(df.backend == backend) & df.err_ratio.notna()]
    if sub.empty:
        return None
    grid = sub.pivot_table(index=rows, columns=cols, values="err_ratio", aggfunc="max")
    data = grid.to_numpy(dtype=float)
    width = max(3.6, 0.62 * len(grid.columns) + 1.6)
    fig, ax = plt.subplots(figsize=(width, 0.75 + 0.34 * len(grid)))
    im = ax.imshow(np.clip(data, 0, RATIO_MAX), cmap=RATIO_MAP, vmin=0, vmax=RATIO_MAX,
                   aspect="auto")  # fmt: skip
    ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], rotation=40, ha="right")
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    ax.tick_params(labelsize=7)
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            dark = v < 0.25 or v > 0.9  # white on the dark ends of the map
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if dark else "black")  # fmt: skip
    ax.set_title(f"{backend}: {rows} × {cols}", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    bar.set_label("error ÷ tolerance (≥ 1 fails)", fontsize=6)
    return _png(fig)


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


def _shape_label(r) -> str:
    kv = f" {r['kv_cache_dtype']}" if r.get("kv_cache_dtype", "auto") != "auto" else ""
    dtype = str(r["dtype"]).replace("bfloat16", "bf16").replace("float16", "fp16")
    return (
        f"b{r['batch']} c{r['context_len']} q{r['query_len']} h{r['num_heads']}:"
        f"{r['num_kv_heads']} d{r['head_size']} bs{r['block_size']} {dtype}{kv}"
    )


def _family_chart(fam: str, t: pd.DataFrame) -> str:
    """Achieved throughput of ours, the best peer, SDPA contiguous and the limit per shape
    (median over dtypes and block sizes), one unit per chart, the legend beside the bars."""
    shape = t.apply(
        lambda r: (
            f"b{r.batch} c{r.context_len} q{r.query_len} h{r.num_heads}:{r.num_kv_heads} "
            f"d{r.head_size}" + (" fp8" if r.kv_cache_dtype != "auto" else "")
        ),
        axis=1,
    )
    cols = ["ours", "peer", "sdpa contiguous", "limit"]
    agg = t.assign(shape=shape).groupby("shape", sort=False)[cols].median().iloc[:30]
    agg = agg.dropna(axis=1, how="all")
    fig, ax = plt.subplots(figsize=(9, 0.7 + 0.3 * len(agg) * max(1, len(agg.columns) / 2.5)))
    agg.plot.barh(ax=ax, width=0.8)
    ax.set_xlabel(f"{t.unit.iloc[0]} (kernel time)")
    ax.set_title(f"{fam}: achieved {t.unit.iloc[0]}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    """Our fp8 kernel against itself in bf16, then per workload family a chart and a table of
    ours vs the best peer, SDPA on contiguous K/V and the limit (kernel time; do_bench, which
    includes the host's launch time, beside it), and, with `limits` (`python -m bench
    limits`), what Nsight Compute measured on each row that misses a target."""
    parts = [
        "<p class='note'>Kernel time from CUDA-graph replay (do_bench in its own column). "
        "Ratios: ≥ 1 green, ≥ 0.95 yellow, below red."
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
            "same kernel; GB/s on the bytes each reads (fp8: one a value). Targets at batch "
            "≥ 64 and context ≥ 4k: fp8 time ≤ 0.60× bf16's, ≥ 85% of copy.</p>"
        )
        fp8 = fp8.assign(shape=fp8.apply(_shape_label, axis=1))
        shown = fp8[["workload", "shape", "fp8 GB/s", "fp8 ÷ copy", "bf16 GB/s",
                     "fp8 time ÷ bf16 time", "timed"]]  # fmt: skip
        parts.append(
            _styled(shown, {"workload": "text", "shape": "text", "timed": "text"})
            .format(precision=0, subset=["fp8 GB/s", "bf16 GB/s"])
            .to_html()
        )
    bench = with_columns(bench)
    wrong = bench[bench.status.astype(str).isin([Status.FAIL, Status.ERROR])]
    if len(wrong):
        parts.append(
            f"<h3>Not timed: {len(wrong)} row(s) that did not pass the matrix's check</h3>"
            + _styled(wrong[["workload", "backend", "batch", "context_len", "status", "timed"]],
                      {"workload": "text", "backend": "text", "status": "text", "timed": "wrap"})
            .to_html()
        )  # fmt: skip
    by_backend = backend_tables(bench[bench.backend_module.astype(str) != ""])
    if by_backend:
        parts.append(
            "<h3>Backends on the matrix's workloads</h3><p class='note'>Each backend judged on "
            "the shape first (a row that is not <b>pass</b> has no time); then the call its "
            "<code>prepare()</code> returns, timed (its <code>timed</code> column says how: "
            "CUDA-graph kernel time, do_bench, or CPU wall time). ÷ best other: the fastest "
            "other backend's time ÷ this one's (≥ 1: this one is the fastest).</p>"
        )
    for fam, t in by_backend.items():
        parts.append(f"<h3>{html.escape(FAMILY_TITLES.get(fam, fam))} <small>[{fam}]</small></h3>")
        mark = lambda r: ["background-color: #e3f2fd; font-weight: 600" if r.yours else ""] * len(r)
        parts.append(
            _styled(
                t,
                {
                    "workload": "text",
                    "backend": "text",
                    "yours": "text",
                    "status": "text",
                    "best other": "text",
                    "timed": "wrap",
                },
            )
            .apply(mark, axis=1)
            .map(_ratio_colour, subset=["÷ best other"])
            .to_html()
        )
    for fam, t in family_tables(bench).items():
        unit = t.unit.iloc[0]
        title = FAMILY_TITLES.get(fam, fam)
        parts.append(f"<h3>{html.escape(title)} ({unit}) <small>[{html.escape(fam)}]</small>")
        parts.append(f"</h3><div class='perf'>{_family_chart(fam, t)}</div>")
        t = with_limits(t, limits)
        t = t.assign(shape=t.apply(_shape_label, axis=1))
        first = ["workload", "shape"] if t.workload.nunique() > 1 else ["shape"]
        rest = [c for c in t.columns if c not in (*BENCH_SHAPE, "unit", "shape", "workload")]
        shown = t[first + rest]
        styler = (
            _styled(
                shown,
                {
                    "workload": "text",
                    "shape": "text",
                    "timed": "text",
                    "best peer": "text",
                    LIMIT_COLUMN: "wrap",
                },
            )
            .format(
                precision=0,
                subset=["ours", "ours (do_bench)", "peer", "sdpa contiguous", "limit"],
                na_rep="",
            )
            .map(_ratio_colour, subset=["ours ÷ peer", "ours ÷ sdpa", "ours ÷ limit"])
        )
        parts.append(styler.to_html())
    return "".join(parts)


def _banner(df: pd.DataFrame, run_info: dict) -> str:
    """The verdict first: pass, fail (with counts), or why the set cannot be judged."""
    n = len(df)
    counts = df.status.value_counts().to_dict() if n else {}
    if (n and (df.run_state == "interrupted").any()) or run_info.get("state") == "interrupted":
        return (
            '<p class="banner warn">INTERRUPTED: this run did not finish. Tests that did not '
            "run are error rows; the gate refuses this result set.</p>"
        )
    if n and (df.run_state != "complete").any():
        return (
            '<p class="banner warn">UNKNOWN STATE: some rows come from a run nobody recorded as '
            "finished (an older file, or a merge without run.json); the gate refuses them.</p>"
        )
    bad = counts.get(Status.FAIL, 0) + counts.get(Status.ERROR, 0)
    if bad:
        return (
            f'<p class="banner bad">FAIL: {counts.get(Status.FAIL, 0)} failed and '
            f'{counts.get(Status.ERROR, 0)} errored rows (<a href="#failures">below</a>), '
            f"{counts.get(Status.PASS, 0)} passed, {counts.get(Status.SKIP, 0)} skipped.</p>"
        )
    return (
        f'<p class="banner ok">PASS: all {counts.get(Status.PASS, 0)} compared rows agree with '
        f'the spec; {counts.get(Status.SKIP, 0)} skipped with a reason (<a href="#skips">below'
        f"</a>).</p>"
    )


def render(
    df: pd.DataFrame,
    bench: pd.DataFrame | None = None,
    run_info: dict | None = None,
    title: str = "encdec-attn conformance report",
    limits: pd.DataFrame | None = None,
    mutations: pd.DataFrame | None = None,
) -> str:
    """The whole page as one string."""
    run_info = run_info or {}
    env = df.iloc[0] if len(df) else None
    n = len(df)
    counts = df.status.value_counts().to_dict()
    compared = counts.get(Status.PASS, 0) + counts.get(Status.FAIL, 0)
    pass_rate = counts.get(Status.PASS, 0) / compared if compared else float("nan")
    tiers = ", ".join(sorted(df.tier.fillna("?").astype(str).unique())) if n else "-"
    head = [f"<h1>{html.escape(title)}</h1>", _banner(df, run_info)]
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
    body = ["<h2 id='summary'>Summary</h2>"]
    totals = backend_totals(df)
    body.append(
        _styled(totals, {"backend": "text"})
        .apply(_colour_counts, subset=list(STATUS_COLOURS))
        .format("{:.1%}", subset=["pass rate"], na_rep="")
        .set_caption("rows per backend")
        .to_html()
    )
    grid = kind_phase_grid(df)
    body.append(
        _styled(grid, {"backend": "text"})
        .map(_grid_colour, subset=[c for c in grid.columns if c != "backend"])
        .set_caption("passed / run per backend × attention kind · phase (— every row skipped)")
        .to_html()
    )
    fp8 = df[df.kv_cache_dtype != "auto"]
    if len(fp8):
        grid = status_grid(fp8, fp8.kv_cache_dtype + " · " + fp8.kv_scale)
        body.append(
            _styled(grid, {"backend": "text"})
            .map(_grid_colour, subset=[c for c in grid.columns if c != "backend"])
            .set_caption("fp8 KV cache rows: passed / run per backend × format · scale scheme")
            .to_html()
        )

    body.append(
        "<h2 id='heatmaps'>Worst error ÷ tolerance</h2><p class='note'>Per backend; the number "
        "and the colour are the same ratio, 1.0 is the tolerance. Blank cells: nothing compared "
        "there.</p><div class='heatmaps'>"
    )
    d = df.assign(heads=df.num_heads.astype(str) + ":" + df.num_kv_heads.astype(str))
    for backend in sorted(df.backend.unique()):
        for rows, cols in (("block_size", "batch_shape"), ("dtype", "heads")):
            img = heatmap(d, backend, rows, cols)
            if img:
                body.append(img)
    body.append("</div>")

    for key, name, note in (
        ("model", "Models", "Rows of cases generated around a model preset (<code>--model</code>)"
         ", per model × backend."),
        ("shape", "Explicit shapes", "Rows of explicit shapes (<code>--cases FILE</code>), per "
         "shape × backend; a shape is re-run with <code>python -m conformance run --cases FILE "
         "--case ID</code>."),
    ):  # fmt: skip
        t = model_table(df, key)
        if t is not None:
            anchor = "models" if key == "model" else "shapes"
            body.append(f"<h2 id='{anchor}'>{name}</h2><p class='note'>{note}</p>")
            t = t.reset_index()
            body.append(
                _styled(t, {key: "id", "backend": "text", "failing kind × phase": "wrap"})
                .apply(_colour_counts, subset=list(STATUS_COLOURS))
                .to_html()
            )

    bad = df[df.status.isin([Status.FAIL, Status.ERROR])]
    body.append(f"<h2 id='failures'>Failures and errors ({len(bad)})</h2>")
    if len(bad):
        shown = bad.head(300)
        what = shown.apply(
            lambda r: (
                f"{html.escape(r.reason)}<code class='cmd'>re-run: "
                f"{html.escape(rerun_command(r))}</code><code class='cmd'>dump: "
                f"{html.escape(dump_command(r))}</code><code class='cmd'>shrink: "
                f"{html.escape(shrink_command(r))}</code>"
            ),
            axis=1,
        )
        t = pd.DataFrame(
            {
                "case": shown.case_id,
                "backend": shown.backend,
                "step": shown.step,
                "status": shown.status,
                "reason and the command that re-runs it alone": what,
                "err ÷ tol": shown.err_ratio,
                "rms ratio": shown.rms_ratio,
            }
        )
        body.append(
            _styled(
                t,
                {
                    "case": "id",
                    "backend": "text",
                    "step": "text",
                    "status": "text",
                    "reason and the command that re-runs it alone": "wrap",
                },
            ).to_html(escape=False)
        )
        if len(bad) > len(shown):
            body.append(f"<p class='note'>… and {len(bad) - len(shown)} more in results.csv.</p>")
    else:
        body.append("<p>None: every compared step is within tolerance.</p>")

    skips = df[df.status == Status.SKIP]
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
        body.append(_styled(grouped, {"backend": "text", "reason": "wrap"}).to_html())
    else:
        body.append("<p>No skips.</p>")

    if mutations is not None:
        body.append(mutation_section(mutations))
    body.append("<h2 id='performance'>Performance</h2>")
    if bench is not None and len(bench):
        body.append(performance_section(bench, run_info.get("bench_csv"), limits))
    else:
        body.append(
            "<p class='note'>No benchmark results (run <code>make bench</code> on a GPU,"
            " or render with <code>--bench reports/results/h200/bench.csv.gz</code>).</p>"
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
    # `python -m bench limits` writes limits.csv beside the bench file it read (committed ones
    # are compressed).
    limits_path = None
    if bench_df is not None:
        found = [Path(bench).parent / n for n in ("limits.csv", "limits.csv.gz")]
        limits_path = next((p for p in found if p.exists()), None)
    limits_df = pd.read_csv(limits_path) if limits_path else None
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
    mutate_path = Path(results[0]).parent / "mutate.csv"  # `mutate` with the same --out
    mutations = pd.read_csv(mutate_path, keep_default_na=False) if mutate_path.exists() else None
    out.write_text(render(df, bench_df, run_info, title, limits_df, mutations))
    return out


def mutation_section(m: pd.DataFrame) -> str:
    """`python -m conformance mutate`: how many of the planted faults the selection catches."""
    caught = m.caught.astype(str).str.lower() == "true"
    verdict = "good" if caught.all() else "bad"
    return (
        f"<h2 id='mutations'>Planted faults</h2><p class='banner {verdict}'>This selection "
        f"catches {int(caught.sum())} of {len(m)} planted faults (fault × backend; "
        "conformance/mutants.py)</p>" + _styled(m, {c: "text" for c in m.columns}).to_html()
    )


def write_mutation_report(mutations: pd.DataFrame, out: str | Path) -> Path:
    """A page of its own for a `mutate` run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>encdec-attn planted faults"
        f"</title><style>{CSS}</style></head><body>{mutation_section(mutations)}</body></html>"
    )
    return out
