"""CSV schema, HTML content, merge, and the gate on a planted regression."""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from conformance.schema import BENCH_SHAPE, read_csv, write_csv
from reports import gate
from reports.html import render
from reports.merge import merge
from reports.tests.known import BENCH_KEY_VALUES, known_rows

REQUIRED = [
    "case_id",
    "backend",
    "step",
    "attn_kind",
    "phase",
    "batch_shape",
    "block_size",
    "num_heads",
    "num_kv_heads",
    "head_size",
    "dtype",
    "status",
    "reason",
    "max_abs_err",
    "max_rel_err",
    "err_ratio",
    "mismatch_frac",
    "nan_count",
    "ref_ms",
    "backend_ms",
    "device",
    "torch",
    "triton",
    "xformers",
    "commit",
    "timestamp",
]


# Every column of results.csv as first published, in order (CI scripts read them by position).
CONTRACT = [
    *REQUIRED[:11],
    "layout",
    "window",
    "scale",
    "size",
    "seed",
    *REQUIRED[11:],
    "tier",
]


@pytest.fixture
def results_csv(tmp_path):
    path = tmp_path / "results.csv"
    write_csv(known_rows(), path)
    return path


def test_csv_has_the_contract_columns_in_order(results_csv):
    header = results_csv.read_text().splitlines()[0].split(",")
    assert [c for c in header if c in REQUIRED] == REQUIRED
    # The contract columns keep their positions; later ones are appended after them.
    assert header[: len(CONTRACT)] == CONTRACT
    assert header[len(CONTRACT) :] == [
        "rms_ratio",
        "backend_module",
        "run_state",
        "model",
        "shape",
        "cases_file",
        "kv_cache_dtype",
        "kv_scale",
        "compile_ms",
        "position_bias",
        "cache_strides",
    ]
    df = read_csv(results_csv)
    assert set(df.status) == {"pass", "skip", "fail"}


def test_read_csv_rejects_other_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(tmp_path / "x.csv")


def test_html_holds_the_tables_and_images(results_csv):
    page = render(
        read_csv(results_csv),
        bench=pd.DataFrame(
            [
                dict(
                    **BENCH_KEY_VALUES,
                    median_ms=0.5,
                    gbps=2500.0,
                    tflops=float("nan"),
                    frac_of_limit=0.83,
                    device="H100",
                )
            ]
        ),
    )
    for section in (
        "id='summary'",
        "id='heatmaps'",
        "id='failures'",
        "id='skips'",
        "id='performance'",
    ):
        assert section in page
    assert "Failures and errors (1)" in page
    assert "python -m conformance run --case cross-prefill-single-bs8" in page
    assert "no CUDA device" in page  # the skip reason, counted per single reason
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 3  # heatmaps + perf chart
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "cpu (test)" in page and "pass rate" in page


def test_html_renders_rows_without_a_tier(results_csv):
    """A set merged from JSONL without `--set tier=` has no tier: the page still renders."""
    df = read_csv(results_csv).assign(tier=float("nan"))
    assert "id='summary'" in render(df)


def test_merge_joins_shards(tmp_path):
    rows = known_rows()
    write_csv(rows[:3], tmp_path / "a.csv")
    write_csv(rows[3:], tmp_path / "b.csv")
    n = merge([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "m.csv")
    assert n == len(rows)
    assert len(read_csv(tmp_path / "m.csv")) == len(rows)


def test_merge_set_overrides_csv_rows_and_rejects_unknown_columns(tmp_path):
    write_csv(known_rows(), tmp_path / "a.csv")
    merge([tmp_path / "a.csv"], tmp_path / "m.csv", {"commit": "abc1234"})
    assert set(read_csv(tmp_path / "m.csv")["commit"].astype(str)) == {"abc1234"}
    with pytest.raises(ValueError, match="unknown column"):
        merge([tmp_path / "a.csv"], tmp_path / "m.csv", {"comit": "x"})


def test_gate_passes_on_its_baseline_and_fails_on_a_planted_regression(results_csv, tmp_path):
    base = tmp_path / "baseline.csv"
    assert (
        gate.main(["--results", str(results_csv), "--baseline", str(base), "--write-baseline"]) == 0
    )
    assert gate.main(["--results", str(results_csv), "--baseline", str(base)]) == 0

    df = read_csv(results_csv)
    df.loc[0, "status"], df.loc[0, "reason"] = "fail", "numerical mismatch: planted"
    df.to_csv(tmp_path / "regressed.csv", index=False)
    summary = tmp_path / "gate.md"
    assert (
        gate.main(
            [
                "--results",
                str(tmp_path / "regressed.csv"),
                "--baseline",
                str(base),
                "--summary",
                str(summary),
            ]
        )
        == 1
    )
    assert "regressions: 1" in summary.read_text() and "FAILED" in summary.read_text()


def test_gate_flags_a_disappeared_case_and_error_growth_but_not_new_or_fixed(results_csv, tmp_path):
    base = tmp_path / "baseline.csv"
    gate.main(["--results", str(results_csv), "--baseline", str(base), "--write-baseline"])
    df = read_csv(results_csv)
    found = gate.compare(df.iloc[1:], pd.read_csv(base))
    assert len(found["disappeared"]) == 1
    grown = df.copy()
    grown.loc[0, "err_ratio"] = 0.9  # 0.1 -> 0.9: more than RATIO_GROWTH times, above floor
    assert len(gate.compare(grown, pd.read_csv(base))["ratio_growth"]) == 1
    fixed = df.copy()
    fixed.loc[fixed.status == "fail", "status"] = "pass"
    extra = fixed.iloc[[0]].assign(case_id="decoder-new-case")
    found = gate.compare(pd.concat([fixed, extra]), pd.read_csv(base))
    assert len(found["fixed"]) == 1 and len(found["new"]) == 1
    assert not any(len(found[k]) for k in gate.FAILING)


def test_gate_flags_a_throughput_drop():
    key = BENCH_KEY_VALUES
    base = pd.DataFrame([{**key, "gbps": 2500.0, "tflops": float("nan")}])
    assert gate.compare_bench(base.assign(gbps=2400.0), base).empty
    assert len(gate.compare_bench(base.assign(gbps=1500.0), base)) == 1
    # with CUDA-graph times on both sides the kernel time decides, not do_bench's host-bound one
    graphed = base.assign(graph_gbps=2500.0)
    assert gate.compare_bench(graphed.assign(gbps=900.0), graphed).empty
    drop = gate.compare_bench(graphed.assign(graph_gbps=1500.0), graphed)
    assert list(drop.metric) == ["graph_gbps"]
    # an old baseline without graph times still gates on do_bench's GB/s
    assert len(gate.compare_bench(graphed.assign(gbps=1500.0), base)) == 1


def test_gate_bad_usage_exits_2(tmp_path):
    assert gate.main(["--results", str(tmp_path / "none.csv"), "--baseline", "x"]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="THE HTML REPORT WAS NOT CHECKED IN A BROWSER: no headless Chromium here "
    "(apt-get install chromium; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium(results_csv, tmp_path):
    """Laid out by a browser at 1280 and 1440 px, with long failure reasons, a model section and
    performance tables with ncu readings: nothing runs past the window, the reason and re-run
    command are readable in place, and every inlined image decoded."""
    df = read_csv(results_csv)
    long = "numerical mismatch: max_abs_err 0.0312 > tolerance 0.0161 (12.5% of elements); "
    df.loc[df.status == "fail", "reason"] = long * 3
    df.loc[df.index[:3], "model"] = "whisper-large-v3"
    bench = _bench_rows()
    shape = bench[bench.workload == "decode-self"].iloc[0]
    reading = {"missed": "ours/sdpa 0.97 < 1", "limit": "memory roof " * 20}
    limits = pd.DataFrame([{**{k: shape.get(k, "auto") for k in BENCH_SHAPE}, **reading}])
    measure = """<script>window.addEventListener('load', () => {
      const right = [...document.querySelectorAll('table,img,code')]
        .map(e => e.getBoundingClientRect().right);
      const reason = [...document.querySelectorAll('#failures ~ table td.wrap')][0];
      document.body.setAttribute('data-layout', JSON.stringify({
        width: window.innerWidth, scroll: document.documentElement.scrollWidth,
        right: Math.max(...right), images: [...document.images].every(i => i.naturalWidth > 0),
        reason: reason ? reason.getBoundingClientRect().width : 0}));
    });</script>"""
    page = tmp_path / "index.html"
    page.write_text(render(df, bench=bench, limits=limits).replace("</body>", measure + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    for width in (1280, 1440):
        dom = subprocess.run(
            [*flags, "--virtual-time-budget=5000", f"--window-size={width},900", "--dump-dom",
             page.as_uri()], capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert "Summary" in dom and "rows per backend" in dom
        got = re.search(r'data-layout="([^"]*)"', dom)
        assert got, "the page's measuring script did not run"
        layout = __import__("json").loads(got.group(1).replace("&quot;", '"'))
        assert layout["width"] == width and layout["scroll"] <= width, layout
        assert layout["right"] <= width and layout["images"], layout
        assert layout["reason"] >= 300, layout  # the reason reads as prose, not a column of words
        shot = tmp_path / f"shot-{width}.png"
        subprocess.run([*flags, f"--screenshot={shot}", f"--window-size={width},1400",
                        page.as_uri()], capture_output=True, timeout=120)  # fmt: skip
        assert shot.exists() and shot.stat().st_size > 10_000


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks the CI machine (CI=true) only")
def test_chromium_is_present_in_ci():
    assert CHROMIUM, ".ci/run must install chromium so the browser test runs in CI"


def _bench_rows():
    key = dict(BENCH_KEY_VALUES)
    decode = [
        dict(
            key, backend="triton", median_ms=0.2, gbps=2000.0, graph_ms=0.1, limit="copy 3000 GB/s"
        ),
        dict(
            key,
            backend="xformers-splitk",
            median_ms=0.5,
            gbps=800.0,
            graph_ms=0.125,
            limit="copy 3000 GB/s",
        ),
        dict(
            key,
            backend="sdpa-contiguous",
            median_ms=0.1,
            gbps=4000.0,
            graph_ms=0.1,
            limit="copy 3000 GB/s",
        ),
        dict(key, backend="copy", median_ms=0.1, gbps=3000.0, limit="measured"),
    ]
    prefill = dict(key, workload="encoder-prefill:x", query_len=1500)
    prefill = [
        dict(
            prefill,
            backend="triton",
            median_ms=1.0,
            tflops=300.0,
            graph_ms=1.0,
            limit="bf16 matmul 800 TFLOP/s",
        ),
        dict(
            prefill,
            backend="xformers-fa2",
            median_ms=1.0,
            tflops=250.0,
            graph_ms=1.0,
            limit="bf16 matmul 800 TFLOP/s",
        ),
    ]
    return pd.DataFrame(decode + prefill)


def test_performance_section_compares_kernel_times_per_family():
    from bench.analysis import family_tables

    tables = family_tables(_bench_rows())
    assert set(tables) == {"decode-self", "encoder-prefill"}
    d = tables["decode-self"].iloc[0]
    # kernel time: 2000 GB/s at 0.2 ms by do_bench is 4000 GB/s at 0.1 ms from the graph
    assert d.ours == pytest.approx(4000) and d["ours (do_bench)"] == pytest.approx(2000)
    assert d["best peer"] == "xformers-splitk" and d.peer == pytest.approx(3200)
    assert d["ours ÷ peer"] == pytest.approx(1.25) and d["ours ÷ sdpa"] == pytest.approx(1.0)
    assert d["ours ÷ limit"] == pytest.approx(4000 / 3000)
    p = tables["encoder-prefill"].iloc[0]
    assert p.unit == "TFLOP/s" and p["ours ÷ peer"] == pytest.approx(1.2)


def test_report_has_one_table_and_chart_per_family_and_no_raw_table(results_csv):
    page = render(read_csv(results_csv), bench=_bench_rows())
    perf = page[page.index("id='performance'") :]
    assert "the grid (batch × context × heads × page) (GB/s)" in perf and "[decode-self]" in perf
    assert "Encoder prefill (TFLOP/s)" in perf
    assert perf.count("<img") == 2 and "median_ms" not in perf


def test_skip_reasons_are_counted_per_single_reason():
    from reports.html import single_reasons

    skips = pd.DataFrame(
        {
            "backend": ["x", "x", "y"],
            "reason": ["not supported: a; b", "not supported: a", "not supported: b"],
        }
    )
    counts = single_reasons(skips).value_counts().to_dict()
    assert counts == {("x", "a"): 2, ("x", "b"): 1, ("y", "b"): 1}


def test_performance_tables_show_why_a_short_row_is_short(results_csv):
    """`bench limits` readings join their rows by shape; rows that miss nothing stay empty."""
    from bench.analysis import family_tables
    from reports.html import LIMIT_COLUMN, with_limits

    bench = _bench_rows()
    shape = bench[bench.workload == "decode-self"].iloc[0]
    limits = pd.DataFrame(
        [
            {
                **{k: shape.get(k, "auto") for k in BENCH_SHAPE},
                "missed": "ours/sdpa 0.97 < 1",
                "limit": "memory roof: DRAM 85% busy",
            }
        ]
    )
    tables = {f: with_limits(t, limits) for f, t in family_tables(bench).items()}
    assert tables["decode-self"][LIMIT_COLUMN].tolist() == [
        "ours/sdpa 0.97 < 1 — memory roof: DRAM 85% busy"
    ]
    assert tables["encoder-prefill"][LIMIT_COLUMN].tolist() == [""]
    page = render(read_csv(results_csv), bench=bench, limits=limits)
    assert "memory roof: DRAM 85% busy" in page and "1 rows miss a target" in page


def test_a_limits_file_that_is_not_one_is_the_users_mistake(results_csv, tmp_path, capsys):
    from reports.__main__ import main

    _bench_rows().to_csv(tmp_path / "bench.csv", index=False)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "limits.csv", index=False)
    out = tmp_path / "r.html"
    args = ["render", str(results_csv), "--bench", str(tmp_path / "bench.csv"), "--out", str(out)]
    assert main(args) == 2
    assert "not a `bench limits` file" in capsys.readouterr().err and not out.exists()


def test_a_committed_benchs_compressed_limits_are_shown_with_it(results_csv, tmp_path):
    """reports/results/<card>/ keeps bench.csv.gz and limits.csv.gz: the page shows both."""
    from reports.__main__ import main

    _bench_rows().to_csv(tmp_path / "bench.csv.gz", index=False)
    limits = _bench_rows().assign(missed="ours/sdpa 0.9 < 1", limit="near the memory roof")
    limits.to_csv(tmp_path / "limits.csv.gz", index=False)
    out = tmp_path / "r.html"
    args = [
        "render",
        str(results_csv),
        "--bench",
        str(tmp_path / "bench.csv.gz"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "rows miss a target" in out.read_text()
