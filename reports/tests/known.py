"""A small, known result set in the schema (no run needed)."""

from types import SimpleNamespace

from conformance.cases import Case
from conformance.schema import result_row, to_result_row

ENV = dict(
    device="cpu (test)",
    torch="2.13.0",
    triton="3.6.0",
    xformers="0.0.35",
    commit="abc1234",
    timestamp="2026-11-25T00:00:00+00:00",
)


def known_rows() -> list[dict]:
    cases = [
        Case("decoder", "decode", "ragged", 16, "h8kv2", 64, "float16", "shuffled"),
        Case("cross", "prefill", "single", 8, "h4kv4", 80, "bfloat16", "interleaved"),
        Case("encoder", "prefill", "uniform", 16, "h8kv1", 128, "float32", "contiguous"),
    ]
    rows = []
    for i, c in enumerate(cases):
        metrics = SimpleNamespace(
            max_abs_err=1e-3 * (i + 1),
            max_rel_err=1e-3,
            err_ratio=0.1 * (i + 1),
            mismatch_frac=0.0,
            nan_count=0,
            rms_ratio=1.1,
        )
        step = f"0:{c.attn_kind}"
        rows.append(result_row(c, "triton", step, "pass", "", metrics, 1.0, 0.5))
        rows.append(result_row(c, "xformers", step, "skip", "not supported: no CUDA device"))
    wrong = SimpleNamespace(**{**vars(metrics), "err_ratio": 3.5})
    reason = "numerical mismatch: max_abs_err 0.1 > tolerance 0.03"
    rows.append(result_row(cases[1], "torch", f"0:{cases[1].attn_kind}", "fail", reason, wrong))
    return [to_result_row({**r, **ENV, "tier": "smoke"}) for r in rows]


# One benchmark configuration (the bench.csv key columns).
BENCH_KEY_VALUES = dict(
    workload="decode-self",
    backend="triton",
    batch=64,
    context_len=4096,
    query_len=1,
    num_heads=32,
    num_kv_heads=8,
    head_size=128,
    block_size=16,
    dtype="bfloat16",
)
