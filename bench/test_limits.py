"""`python -m bench limits` without a GPU: which rows miss a target, how ncu's raw CSV is read,
what the one-line reading says, and that the command refuses to run where it cannot."""

import math

import pandas as pd
import pytest
import torch

from bench.__main__ import main
from bench.limits import limit_reading, parse_ncu_raw, short_rows


def _rows(workload, batch, ctx, kv_heads, ours_ms, others, q_len=1, limit_gbps=3000.0):
    """Bench rows of one shape: ours, its peers ({backend: graph_ms}) and the copy limit. Every
    row moves 3 GB, so GB/s = 3000 / ms. All passed (the limit: measured)."""
    return [dict(r, status="measured" if r["backend"] == "copy" else "pass")
            for r in _plain(workload, batch, ctx, kv_heads, ours_ms, others, q_len,
                            limit_gbps)]  # fmt: skip


def _plain(workload, batch, ctx, kv_heads, ours_ms, others, q_len=1, limit_gbps=3000.0):
    """Bench rows of one shape: ours, its peers ({backend: graph_ms}) and the copy limit. Every
    row moves 3 GB, so GB/s = 3000 / ms."""
    base = dict(
        workload=workload,
        batch=batch,
        context_len=ctx,
        query_len=q_len,
        num_heads=32,
        num_kv_heads=kv_heads,
        head_size=128,
        block_size=16,
        dtype="bfloat16",
        limit=f"copy {limit_gbps:.0f} GB/s",
    )
    out = []
    for backend, ms in {"triton": ours_ms, **others}.items():
        out.append(dict(base, backend=backend, median_ms=ms, gbps=3000 / ms, graph_ms=ms))
    out.append(dict(base, backend="copy", median_ms=1.0, gbps=limit_gbps))
    return out


def test_short_rows_are_the_rows_that_miss_a_target():
    bench = pd.DataFrame(
        # behind SDPA, ahead of flex: short on one target
        _rows("self-decode:grid", 64, 4096, 32, 1.10, {"sdpa-contiguous": 1.0, "flex": 1.5})
        # ahead of every peer and not a small-batch GQA shape: not short
        + _rows("self-decode:grid", 64, 1024, 32, 1.05, {"sdpa-contiguous": 1.1, "flex": 1.2})
        # small-batch GQA 8:1 ahead of all peers but at 50% of copy: short on the copy target
        + _rows("self-decode:grid", 16, 1024, 4, 2.0, {"sdpa-contiguous": 2.2})
        # behind xFormers split-K on a model row
        + _rows("cross-decode:whisper", 256, 1500, 32, 1.0, {"xformers-paged": 0.99})
        # cross prefill at batch 64 below 90% of copy; at batch 256 the target does not apply
        + _rows("cross-prefill:bart", 64, 1024, 32, 1.2, {}, q_len=4)
        + _rows("cross-prefill:bart", 256, 1024, 32, 1.2, {}, q_len=4)
        # chunked prefill is not a family with a target here
        + _rows("chunked-prefill", 8, 4096, 8, 9.0, {"sdpa-contiguous": 1.0}, q_len=512)
    )
    s = short_rows(bench)
    got = {(r.workload, r.batch, r.context_len): r.missed for r in s.itertuples()}
    assert set(got) == {
        ("self-decode:grid", 64, 4096),
        ("self-decode:grid", 16, 1024),
        ("cross-decode:whisper", 256, 1500),
        ("cross-prefill:bart", 64, 1024),
    }
    assert got[("self-decode:grid", 64, 4096)] == "ours/sdpa 0.909 < 1"
    assert got[("self-decode:grid", 16, 1024)] == "copy 50.0% < 60%"
    assert got[("cross-decode:whisper", 256, 1500)] == "ours/xformers-paged 0.990 < 1"
    assert got[("cross-prefill:bart", 64, 1024)].startswith("copy 83.3% < 90%")
    row = s[s.workload == "self-decode:grid"].iloc[0]
    assert row.best_peer == "flex" and row.ours_vs_best_peer == pytest.approx(1.5 / 1.1)


NCU = """==PROF== Connected to process 7 (/usr/bin/python3)
# limits: profiled 0 decode-self b16
"ID","Kernel Name","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed",\
"sm__warps_active.avg.pct_of_peak_sustained_active","sm__maximum_warps_per_active_cycle_pct",\
"launch__waves_per_multiprocessor","launch__registers_per_thread","launch__grid_size",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_not_selected_not_issued_per_issue_active.ratio"
"","","usecond","%","%","%","","register/thread","",""," ",""
"0","_paged_attention_kernel","27.5","47.0","11.7","25","0.48","109","256","5.0","1.0","9"
"1","_split_k_reduce_kernel","3.1","11.0","6.2","31.25","0.19","94","128","3.7","0.1","9"
"2","_paged_attention_kernel","700.1","90.2","24.0","25","0.97","123","512","11.5","0.5","9"
==PROF== Disconnected from process 7
"""


def test_parse_ncu_raw_keeps_our_kernel_in_launch_order():
    k = parse_ncu_raw(NCU)
    assert len(k) == 2  # the reduce kernel is not ours to read
    assert k[0]["kernel_us"] == 27.5 and k[0]["waves"] == 0.48 and k[0]["registers"] == 109
    assert k[1]["dram_pct"] == 90.2
    assert set(s for s in k[0] if s.startswith("stall_")) == {
        "stall_long_scoreboard",
        "stall_barrier",
    }
    assert parse_ncu_raw("==PROF== nothing profiled\n") == []
    # ncu chooses the time unit: the same kernel in nanoseconds is still 27.5 us.
    in_ns = NCU.replace('"","","usecond"', '"","","ns"').replace('"27.5"', '"27,500"')
    assert parse_ncu_raw(in_ns)[0]["kernel_us"] == 27.5
    assert math.isnan(parse_ncu_raw(NCU.replace('"usecond"', '"cycle"'))[0]["kernel_us"])


def test_limit_reading_names_the_limit():
    k = parse_ncu_raw(NCU)
    assert limit_reading(k[0]).startswith("latency: 0.48 waves, occupancy 12% of 25%")
    assert "top stall long_scoreboard 83%" in limit_reading(k[0])
    assert limit_reading(k[1]).startswith("near the memory roof: DRAM 90% busy")
    capped = dict(k[1], dram_pct=70.0)
    assert limit_reading(capped).startswith("memory latency at the occupancy cap: 24% of 25%")
    assert "no stall counters" in limit_reading({"waves": 2.0, "dram_pct": 85.0})
    assert math.isnan(parse_ncu_raw(NCU.replace('"0.48"', '"n/a"'))[0]["waves"])


def test_limits_without_a_gpu_is_the_users_setup(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the command would run")
    assert main(["limits", "--bench", "any.csv"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_short_rows_call_is_its_own_workload_fp8_included():
    """`bench limits` profiles the row's own step: an fp8 row's call reads an fp8 cache (the
    limits tool once profiled the bf16 launch for every fp8 row)."""
    from bench.limits import call_for
    from bench.workloads import BenchCase, as_row

    case = BenchCase("self-decode", "grid", 2, 70, 1, 8, 2, 64, 16, "bfloat16", "fp8_e4m3")
    step, call = call_for(as_row(case))
    assert step.kv_cache[0].dtype == torch.float8_e4m3fn and step.metadata.fp8
    assert step.metadata.seq_lens == (70, 70) and step.query.shape == (2, 8, 64)
    assert call().shape == step.query.shape
