"""The engine's processes: memory-aware worker counts, a test that ran out of memory run again
with more, a poisoned worker's job in a fresh one, a worker that keeps memory replaced, and
where the time went (run.json, the summary line, the compile_ms column). Its policy has its own
tests without processes (test_scheduler.py)."""

import json

import pytest
import torch

from conformance import engine
from conformance.cases import Case, lower
from conformance.engine import Test as Job
from conformance.engine import auto_workers, needs_of
from conformance.memory import device_bytes
from conformance.runner import PHASES
from conformance.tests.cli import CASE, FAULTY, cli, csv_rows

SMALL = lower(Case.from_id(CASE))
EPISODE = lower(Case.from_id("episode-episode-ragged-bs16-h8kv2-d64-fp16-interleaved-s0"))


def test_a_tests_need_is_its_measured_peak_else_the_memory_model(tmp_path):
    from conformance.scheduler import MemoryRecord

    tests = (Job(SMALL, "torch"), Job(EPISODE, "triton"))
    assert needs_of(tests) == [device_bytes(SMALL), device_bytes(EPISODE)]
    record = MemoryRecord(tmp_path / "h100.json")
    record.update({MemoryRecord.key(EPISODE.id, "triton"): 5 << 20})
    small, episode = needs_of(tests, MemoryRecord(tmp_path / "h100.json"))
    assert small == device_bytes(SMALL) and 5 << 20 < episode < device_bytes(EPISODE)


def _gpu(monkeypatch, total_gib: float, cores: int = 16, gpus: int = 1):
    class Props:
        total_memory = int(total_gib * 2**30)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(engine.os, "cpu_count", lambda: cores)


def test_auto_workers_fit_the_cards_memory_as_well_as_their_cores(monkeypatch):
    """80 GB and small cases: one per core. Cases needing ~30 GB each: as many as the card
    holds. Two GPUs: twice that. The CPU: one per core."""
    _gpu(monkeypatch, 80)
    small = tuple(Job(SMALL, "torch") for _ in range(9))
    assert auto_workers(small) == 16
    big = SizedShape(30 * 2**30)
    n = auto_workers(tuple(Job(big, "torch") for _ in range(9)))
    assert n == int(0.9 * 80 * 2**30) // (engine.WORKER_BASE_BYTES + device_bytes(big)) == 2
    _gpu(monkeypatch, 80, gpus=2)
    assert auto_workers(tuple(Job(big, "torch") for _ in range(9))) == 4
    monkeypatch.undo()
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 3)
    if not torch.cuda.is_available():
        assert auto_workers(small) == 3


def test_each_worker_base_comes_off_its_devices_memory_before_any_job(monkeypatch):
    """16 workers on one 80 GB card: their contexts are not the jobs' memory; on two cards
    the workers alternate (a worker's device is its index modulo the cards)."""
    _gpu(monkeypatch, 80)
    usable = int(0.9 * 80 * 2**30)
    assert engine.device_memory(16) == [usable - 16 * engine.WORKER_BASE_BYTES]
    _gpu(monkeypatch, 80, gpus=2)
    assert engine.device_memory(3) == [usable - 2 * engine.WORKER_BASE_BYTES,
                                       usable - engine.WORKER_BASE_BYTES]  # fmt: skip


def test_a_full_devices_words_count_as_out_of_memory():
    from conformance.runner import is_oom_reason

    for reason in (
        "out of memory: CUDA out of memory. Tried to allocate 92.00 MiB",
        "runtime error: RuntimeError: Triton Error [CUDA]: out of memory",
        "case could not be built: runtime error: RuntimeError: CUDA error: "
        "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "case could not be built: runtime error: AcceleratorError: CUDA error: "
        "CUDA-capable device(s) is/are busy or unavailable",
    ):
        assert is_oom_reason(reason), reason
    assert not is_oom_reason("runtime error: RuntimeError: CUDA error: an illegal memory access")


def test_the_rest_of_a_poisoned_workers_job_runs_in_a_fresh_one(tmp_path):
    """A CUDA error ends its worker after its row is sent; the case's next backend is run by
    a fresh worker and passes (it once got the dead worker's 'crash' row)."""
    out = tmp_path / "out"
    r = cli("run", "--case", CASE, "-n", "1", "--backend-module", f"{FAULTY}:PoisonsItsProcess",
            "--backend-module", "optimized.torch_backend:TorchBackend", "--out", out)  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:]
    rows = csv_rows(out)
    bad = {row["backend"] for row in rows if row["status"] not in ("pass", "skip")}
    assert bad == {"fault-poisons"}
    assert all("illegal memory access" in row["reason"] for row in rows
               if row["backend"] == "fault-poisons" and row["status"] == "error")  # fmt: skip
    assert any(row["backend"] == "torch" and row["status"] == "pass" for row in rows)


class SizedShape:
    """A stand-in shape the memory model sizes at about `nbytes`."""

    def __new__(cls, nbytes: int):
        from conformance.shapes import Shape

        tokens = int((nbytes / 4 / 4 / 1.25) ** 0.5)  # one head of dense float32 scores
        return Shape("encoder", num_heads=1, head_size=1, encoder_seq_lens=(tokens,),
                     name=f"big-{nbytes}")  # fmt: skip


def test_a_test_that_ran_out_of_memory_runs_again_with_more_and_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    out = tmp_path / "out"
    r = cli("run", "--tier", "smoke", "--shard", "1/24", "-n", "2", "--backend", "torch",
            "--backend-module", f"{FAULTY}:OutOfMemoryBesideOthers", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    rows = csv_rows(out)
    assert {row["status"] for row in rows} <= {"pass", "skip"}
    info = json.loads((out / "run.json").read_text())
    (again,) = info["out_of_memory_reruns"]
    assert "fault-oom-beside-others" in again and not info["run_alone"]
    assert "ran out of the memory it was granted and ran again with more" in r.stdout


def test_a_test_out_of_memory_with_the_whole_device_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    out = tmp_path / "out"
    r = cli("run", "--case", CASE, "--backend-module", f"{FAULTY}:OutOfMemoryAlways",
            "--out", out)  # fmt: skip
    assert r.returncode == 1
    (row,) = [row for row in csv_rows(out) if row["step"].startswith("0:")]
    assert row["status"] == "error" and row["reason"].startswith("out of memory")
    assert row["reason"].endswith("(also with its device's whole budget granted)")
    info = json.loads((out / "run.json").read_text())
    assert len(info["out_of_memory_reruns"]) >= 1 and info["run_alone"]


def test_a_worker_that_keeps_memory_is_named_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAK_MB", "96")
    monkeypatch.setenv("CONFORMANCE_LEAK_LIMIT_MB", "150")
    out = tmp_path / "out"
    r = cli("run", "--tier", "smoke", "--shard", "2/24", "-n", "1", "--backend-module",
            f"{FAULTY}:Leaks", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["leaks"] and all("fault-leaks" in leak["test"] for leak in info["leaks"])
    assert all(leak["held_bytes"] > 150 << 20 for leak in info["leaks"])
    assert "(its backend keeps memory between calls?): replaced" in r.stdout
    assert {row["status"] for row in csv_rows(out)} <= {"pass", "skip"}  # every test still ran


def test_where_the_time_went(tmp_path):
    """run.json splits the workers' time by phase; the summary says it; every step row has a
    compile_ms (0 where nothing was compiled: the interpreter compiles nothing)."""
    out = tmp_path / "out"
    r = cli("run", "--case", CASE, "--backend", "triton", "--backend", "torch", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert set(info["seconds"]) == set(PHASES) and info["workers"] == 1
    # (the reference may be 0: a forked worker inherits a reference its parent computed)
    assert info["seconds"]["backend"] > 0 and min(info["seconds"].values()) >= 0
    assert "their time: backend calls" in r.stdout
    steps = [row for row in csv_rows(out) if row["step"].startswith("0:")]
    assert steps and all(float(row["compile_ms"]) >= 0 for row in steps)


@pytest.mark.parametrize("kind", ["decoder", "encoder", "episode"])
def test_the_memory_model_counts_the_dense_scores_of_a_long_prefill(kind):
    """An episode's encoder step included (its queries are the encoder's, not the decoder's)."""
    from conformance.shapes import Shape

    lens = {
        "encoder": dict(encoder_seq_lens=(3000, 3000)),
        "decoder": dict(query_lens=(3000,) * 2),
        "episode": dict(encoder_seq_lens=(3000, 3000), query_lens=(2, 2), decode_steps=1),
    }[kind]
    s = Shape(kind, num_heads=32, head_size=128, **lens)
    assert device_bytes(s) >= 4 * 2 * 32 * 3000 * 3000 * 4


def test_a_case_whose_build_met_a_failed_cuda_context_runs_again_in_a_fresh_worker(
    tmp_path, monkeypatch
):
    """The first build of the case raises a CUDA error (a context that failed, seen once on
    the H100): its worker ends, and the test runs again in a fresh one before its error could
    stand; a second failure is the error row."""
    from conformance import expected

    counter = tmp_path / "builds"
    build = expected.CaseRun.__init__

    def flaky(self, *args, **kwargs):
        with open(counter, "a") as f:  # counted across the forked workers
            f.write("x")
        if counter.stat().st_size <= FAILURES[0]:
            raise RuntimeError("CUDA error: unknown error")
        return build(self, *args, **kwargs)

    FAILURES = [1]
    monkeypatch.setattr(expected.CaseRun, "__init__", flaky)
    from conformance import runner

    runner.forget_cases()  # forked workers would inherit a case this process keeps
    out = tmp_path / "out"
    r = cli("run", "--case", CASE, "--backend", "torch", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["rebuilt"] == [f"{CASE}::torch"] and "ran again in a fresh worker" in r.stdout
    assert {row["status"] for row in csv_rows(out)} == {"pass"}
    counter.unlink()
    FAILURES[0] = 2
    runner.forget_cases()
    r = cli("run", "--case", CASE, "--backend", "torch", "--out", out)
    assert r.returncode == 1
    (row,) = csv_rows(out)
    assert row["step"] == "build" and "CUDA error: unknown error" in row["reason"]
