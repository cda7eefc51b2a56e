"""CPU cost of the reference and the torch backend on small cases (pytest-benchmark), so the
cost of the reference and of the matrix is tracked. Under xdist these run once, as tests."""

import pytest

from conformance.workloads import build_step
from optimized.torch_backend import TorchBackend
from reference.attention import attention

SHAPES = {
    "decode-self": dict(kind="decoder", q=(1,) * 8, c=(127,) * 8, e=None),
    "prefill-self": dict(kind="decoder", q=(64,) * 4, c=(0,) * 4, e=None),
    "decode-cross": dict(kind="encoder_decoder", q=(1,) * 8, c=(5,) * 8, e=(150,) * 8),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_cost(benchmark, backend, shape):
    s = SHAPES[shape]
    step = build_step(
        s["kind"],
        s["q"],
        s["c"],
        s["e"],
        block_size=16,
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        seed=0,
    )
    fn = attention if backend == "reference" else TorchBackend().forward
    kv_lens = step.metadata.kv_lens_for(step.attn_kind)
    flops = 4 * sum(q * k for q, k in zip(step.metadata.query_lens, kv_lens)) * 8 * 64
    benchmark.extra_info.update(
        workload=f"cpu:{shape}",
        backend=backend,
        batch=len(s["q"]),
        context_len=max(kv_lens),
        query_len=max(s["q"]),
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype="float32",
        flops=flops,
    )
    out = benchmark(lambda: fn(*step.with_fresh_cache().args()))
    assert out.shape == step.query.shape


def test_the_backend_path_times_only_what_passes_and_the_report_shows_it(tmp_path):
    """`python -m bench --backend-module ...` on the CPU: each backend is judged on the shape
    first; a wrong-but-fast one gets `fail` and no time, the others a labelled CPU time; the
    report's table marks the user's backend."""
    from bench import harness, workloads
    from conformance import selection
    from conformance.schema import BENCH_COLUMNS
    from reports.gate import load_bench
    from reports.html import render

    (tmp_path / "fast.py").write_text(
        "from examples.my_backend import MyBackend\n\n\n"
        "class Fast(MyBackend):\n"
        "    name = 'fast-but-wrong'\n\n"
        "    def attend(self, *args):\n"
        "        return super().attend(*args) * 0\n"
    )
    picked = selection.backends(["torch"], [f"{tmp_path}/fast.py:Fast"])
    work = [w for w in workloads.named(workloads.models("whisper-tiny", (2,), 16))
            if "decode" in w[0]]  # fmt: skip
    rows = harness.bench_rows(work, picked)
    by = {(r["workload"].split(":")[0], r["backend"]): r for r in rows}
    for fam in ("self-decode", "cross-decode"):
        wrong, torch_row = by[(fam, "fast-but-wrong")], by[(fam, "torch")]
        assert wrong["status"] == "fail" and wrong["median_ms"] != wrong["median_ms"]  # NaN
        assert wrong["timed"].startswith("not timed: numerical mismatch")
        assert torch_row["status"] == "pass" and torch_row["median_ms"] > 0
        assert torch_row["timed"].startswith("cpu wall")
    import pandas as pd

    path = tmp_path / "bench.csv"
    pd.DataFrame(rows, columns=BENCH_COLUMNS).to_csv(path, index=False)
    from conformance.schema import read_csv, write_csv
    from reports.tests.known import known_rows

    write_csv(known_rows(), tmp_path / "results.csv")
    page = render(read_csv(tmp_path / "results.csv"), bench=load_bench(str(path), "--bench"))
    assert "Backends on the matrix" in page and "◀ yours" in page


def test_batches_choose_the_model_workloads_and_bad_ones_are_a_usage_error(tmp_path, capsys):
    """`--batches` picks the model workloads' batch sizes (here through the CPU smoke); a value
    that is not a positive integer is exit 2 with one line naming the option."""
    import csv

    from bench.__main__ import main

    out = tmp_path / "b.csv"
    assert main(["--model", "whisper-tiny", "--batches", "3", "--backend", "torch",
                 "--only", "cross-decode", "--out", str(out)]) == 0  # fmt: skip
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["batch"] for r in rows} == {"3"}
    for bad in ("0", "a,2", ""):
        assert main(["--model", "whisper-tiny", "--batches", bad, "--out", str(out)]) == 2
        assert "--batches" in capsys.readouterr().err


def test_a_user_backends_bench_never_overwrites_the_projects_bench_csv(tmp_path, monkeypatch):
    """Without --out, `python -m bench --backend-module F:C` writes
    reports/out/backends/<its name>/bench.csv, as `run` does with its results."""
    from pathlib import Path

    from bench.__main__ import main

    example = Path(__file__).resolve().parent.parent / "examples" / "my_backend.py"
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "reports" / "out" / "bench.csv"
    project.parent.mkdir(parents=True)
    project.write_text("the project's bench\n")
    args = ["--model", "whisper-tiny", "--batches", "2", "--only", "self-decode",
            "--backend-module", f"{example}:MyBackend"]  # fmt: skip
    assert main(args) == 0
    assert project.read_text() == "the project's bench\n"
    mine = tmp_path / "reports" / "out" / "backends" / "my-backend" / "bench.csv"
    assert "my-backend" in mine.read_text()


def test_what_is_timed_is_what_was_judged(tmp_path):
    """The prepared call is judged like forward: a backend whose forward is right but whose
    `prepare()` returns a wrong call gets `fail` and no time. A subclass that brings its own
    `attend` never inherits a kernel's `prepare` (flex on triton's once timed triton)."""
    from bench import harness, workloads
    from conformance import selection
    from optimized.backend import BaseBackend
    from optimized.flex_backend import FlexBackend
    from optimized.triton_backend import TritonBackend

    (tmp_path / "liar.py").write_text(
        "from examples.my_backend import MyBackend\n\n\n"
        "class Liar(MyBackend):\n"
        "    name = 'right-but-times-another'\n\n"
        "    def prepare(self, *args):\n"
        "        return lambda: self.forward(*args) * 2\n"
    )
    picked = selection.backends([], [f"{tmp_path}/liar.py:Liar"])
    work = [w for w in workloads.named(workloads.models("whisper-tiny", (2,), 16))
            if "self-decode" in w[0]]  # fmt: skip
    (row,) = harness.bench_rows(work, picked)
    assert row["status"] == "fail" and row["median_ms"] != row["median_ms"]
    assert row["timed"].startswith("not timed: prepare()'s call is not what forward() does")

    class Mine(TritonBackend):
        def attend(self, *args):
            raise NotImplementedError

    assert Mine.prepare is BaseBackend.prepare  # its own attend, not triton's kernel
    assert FlexBackend.prepare is not TritonBackend.prepare  # flex brings its own prepare
    assert TritonBackend.prepare is not BaseBackend.prepare


def test_graph_timing_names_its_l2_flushes():
    """Kernel time is taken after do_bench's flush (L2 left dirty) or a read one (clean); any
    other flush is refused before anything touches a GPU."""
    from bench.harness import graph_ms

    with pytest.raises(ValueError, match="flush: expected 'zero' or 'read'"):
        graph_ms(lambda: None, flush="dirty")


def test_every_row_has_a_status_and_a_row_rebuilds_its_workload(tmp_path):
    """The CPU smoke through the one path: every row a verdict (pass, or why not); each row's
    key columns rebuild the very workload it timed (what `bench limits` profiles)."""
    import csv

    from bench.__main__ import main
    from bench.workloads import BenchCase, grid, models

    out = tmp_path / "b.csv"
    assert main(["--model", "whisper-tiny", "--only", "self-decode", "cross-prefill",
                 "--out", str(out)]) == 0  # fmt: skip
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] in ("pass", "skip") for r in rows), rows
    cases = {c.workload: c for c in models("whisper-tiny", (2,), 16)}
    for r in rows:
        assert BenchCase.from_row(r) == cases[r["workload"]], r["workload"]
    for c in grid(quick=True):  # every configuration of the grid survives its row
        from bench.workloads import as_row

        assert BenchCase.from_row(as_row(c)) == c


def test_t5_steps_carry_its_position_bias_and_the_nobias_twin_does_not():
    """A T5 model's self-decode and encoder steps are timed as T5 runs them (its bias); the
    grid's `+nobias` twin is the same shape without it, and cross steps never carry one."""
    from bench.workloads import NO_BIAS, grid

    t5 = [c for c in grid() if c.label.startswith("flan-t5-xl")]
    biased = {c.family for c in t5 if c.shape().position_bias == "t5"}
    assert biased == {"self-decode", "encoder"}, biased
    twins = [c for c in t5 if c.label.endswith(NO_BIAS)]
    assert {c.family for c in twins} == {"self-decode", "encoder"}
    for c in twins:
        assert c.shape().position_bias == "none"
        (twin,) = [t for t in t5 if t.label == "flan-t5-xl" and t.family == c.family
                   and t.batch == c.batch and t.block_size == c.block_size
                   and t.kv_cache_dtype == "auto"]  # fmt: skip
        assert twin.shape().content() | {"position_bias": "none"} == c.shape().content() | {
            "position_bias": "none"}, c  # fmt: skip
    assert all(c.shape().position_bias == "none" for c in grid() if "t5" not in c.label)
