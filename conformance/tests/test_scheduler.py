"""The engine's policy on a fake device, without processes or a GPU: admit, finish, out of
memory, crash, hang, run alone, a second chance for a case whose build met a failed context,
and the measured peaks kept for the next run."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.scheduler import MemoryRecord, Scheduler

GB = 1 << 30


def sched(cases, needs, budgets=(10 * GB,), workers=2, **kw) -> Scheduler:
    return Scheduler(list(cases), list(needs), list(budgets), workers, **kw)


def test_a_case_and_its_backends_are_one_job_granted_its_largest_need():
    s = sched("aabbb", [1, 3, 2, 2, 1], workers=1)
    job = s.assign(0)
    assert job.tests == (0, 1) and job.grant == 3 and not job.alone


def test_a_job_waits_while_it_would_not_fit_beside_the_running_ones():
    s = sched("abcd", [4 * GB, 4 * GB, 4 * GB, 1 * GB], workers=4)
    assert s.assign(0).tests == (0,) and s.assign(1).tests == (1,)
    assert s.assign(2).tests == (3,)  # the third 4 GB job does not fit beside 8; the 1 GB one does
    assert s.assign(3) is None  # nothing left fits beside 9 GB
    s.finished(0, 0)
    assert s.assign(0).tests == (2,)  # released: now it fits
    assert s.in_use(0) == 9 * GB


def test_alone_on_its_device_any_job_may_start():
    s = sched("a", [10 * GB], budgets=(12 * GB,), workers=1)
    s.finished(0, s.assign(0).tests[0], kept=3 * GB)
    s2 = sched("ab", [5 * GB, 5 * GB], budgets=(12 * GB,), workers=2)
    s2.finished(0, s2.assign(0).tests[0], kept=9 * GB)  # an idle worker keeps 9 GB
    assert s2.in_use(0) == 9 * GB
    assert s2.assign(1).tests == (1,)  # nothing runs there: it may start all the same


def test_memory_a_worker_keeps_between_jobs_counts_against_its_device():
    s = sched("abc", [4 * GB, 4 * GB, 4 * GB], budgets=(10 * GB,), workers=2)
    s.assign(0)
    s.finished(0, 0, peak=3 * GB, kept=3 * GB)  # idle now, holding 3 GB
    assert s.in_use(0) == 3 * GB and s.measured == {0: 3 * GB}
    assert s.assign(1).tests == (1,)
    assert s.assign(0) is None  # 3 kept + 4 running + 4 > 10


def test_out_of_memory_defers_the_test_with_twice_its_grant_and_regroups_by_case():
    s = sched("aabc", [1 * GB, 1 * GB, 1 * GB, 1 * GB], workers=2)
    assert s.assign(0).tests == (0, 1)
    assert s.out_of_memory(0, 0)  # deferred: its row is not the last word
    assert s.needs[0] == 2 * GB
    s.finished(0, 1)  # the rest of the job goes on
    assert s.assign(0).tests == (2,) and s.assign(1).tests == (3,)
    s.finished(0, 2)
    assert s.assign(0).tests == (0,)  # the queue is empty: case a again, that test alone
    s.finished(1, 3)
    s.finished(0, 0)
    assert s.done


def test_deferred_tests_of_one_case_run_together_beside_other_cases():
    s = sched("aabb", [GB] * 4, budgets=(20 * GB,), workers=2)
    a, b = s.assign(0), s.assign(1)
    for w, job in ((0, a), (1, b)):
        for t in job.tests:
            assert s.out_of_memory(w, t)
    ja, jb = s.assign(0), s.assign(1)
    assert {ja.tests, jb.tests} == {(0, 1), (2, 3)}  # both cases at once, each one job
    assert ja.grant == jb.grant == 2 * GB


def test_out_of_memory_with_the_whole_budget_granted_is_the_last_word():
    s = sched("a", [6 * GB], budgets=(10 * GB,), workers=1)
    assert s.assign(0).grant == 6 * GB
    assert s.out_of_memory(0, 0)
    job = s.assign(0)
    assert job.grant == 10 * GB and job.alone  # twice 6, at most the budget: more than half
    assert not s.out_of_memory(0, 0)
    assert s.done


def test_a_job_that_needs_more_than_half_a_device_runs_alone_after_the_others():
    s = sched("abc", [6 * GB, 1 * GB, 1 * GB], budgets=(10 * GB,), workers=2)
    assert s.assign(0).tests == (1,)  # the big one waits for the end
    assert s.assign(1).tests == (2,)
    s.finished(0, 1)
    assert s.assign(0) is None  # not while another job runs on its device
    s.finished(1, 2)
    big = s.assign(0)
    assert big.tests == (0,) and big.alone
    assert s.assign(1) is None  # nothing starts beside it
    s.finished(0, 0)
    assert s.done


def test_a_crashed_or_hung_worker_loses_its_test_and_the_rest_of_its_job_goes_first():
    s = sched("aaab", [GB] * 4, workers=2)
    s.assign(0)
    s.finished(0, 0)
    assert s.lost(0) == 1  # the engine records test 1's error row
    assert not s.busy(0) and s.in_use(0) == 0
    assert s.assign(1).tests == (2,)  # the rest of case a, before case b
    assert s.assign(0).tests == (3,)


def test_a_case_whose_build_met_a_failed_context_runs_once_more():
    s = sched("aa", [GB, GB], workers=1)
    s.assign(0)
    assert s.retry(0, 0)
    assert s.assign(0).tests == (0, 1)
    assert not s.retry(0, 0)  # its second chance was this: the error stands


def test_a_replaced_worker_hands_the_rest_of_its_job_back():
    s = sched("aab", [GB] * 3, workers=1)
    s.assign(0)
    s.finished(0, 0, kept=2 * GB)
    s.replaced(0)
    assert s.in_use(0) == 0 and s.assign(0).tests == (1,)


def test_workers_alternate_devices_and_each_device_has_its_budget():
    s = sched("abcdef", [4 * GB] * 6, budgets=(10 * GB, 10 * GB), workers=6)
    assert [s.assign(w) is not None for w in range(6)] == [True] * 4 + [False] * 2
    assert s.in_use(0) == s.in_use(1) == 8 * GB


@settings(max_examples=150, deadline=None)
@given(
    peaks=st.lists(st.integers(1, 12), min_size=1, max_size=40),
    guess=st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=40, max_size=40),
    per_case=st.integers(1, 4),
    workers=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_a_whole_run_on_a_fake_device(peaks, guess, per_case, workers, seed):
    """Tests whose true peaks the needs guess wrong (a quarter to twice), finishing in a random
    order: every test ends exactly once, out of memory for good only if it needs more than the
    device; several jobs run on the device only while their grants fit it; a test out of memory
    ran with a grant below its peak (it never failed beside others)."""
    budget, rng = 10, random.Random(seed)
    cases = [f"c{i // per_case}" for i in range(len(peaks))]
    needs = [max(1, int(p * g)) for p, g in zip(peaks, guess)]
    s = sched(cases, needs, budgets=(budget,), workers=workers)
    ended, running = {}, {}
    for _ in range(10_000):
        for w in range(workers):
            if not s.busy(w):
                job = s.assign(w)
                if job is not None:
                    running[w] = job.grant
        jobs = [w for w in range(workers) if s.busy(w)]
        if len(jobs) > 1:
            assert sum(running[w] for w in jobs) <= budget
        if not jobs:
            break
        w = rng.choice(jobs)
        t = s.remaining(w)[0]
        if peaks[t] > running[w]:
            if not s.out_of_memory(w, t):
                assert peaks[t] > budget or running[w] >= budget
                ended[t] = "oom"
        else:
            s.finished(w, t, peak=peaks[t])
            assert t not in ended
            ended[t] = "pass"
    assert s.done and sorted(ended) == list(range(len(peaks)))
    assert all((v == "oom") == (peaks[t] > budget) for t, v in ended.items())


def test_measured_peaks_are_kept_for_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    path = MemoryRecord.where("h100")
    assert path == tmp_path / "encdec-attn-memory" / "h100.json"
    record = MemoryRecord(path)
    key = MemoryRecord.key("case-a", "triton")
    assert record.need(key) is None
    record.update({key: 100 << 20})
    again = MemoryRecord(path)
    assert again.need(key) >= 100 << 20  # with a margin
    path.write_text("not json")
    assert MemoryRecord(path).peaks == {}  # an unreadable record is no record
