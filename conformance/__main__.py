"""The conformance command line (stable: people and CI scripts rely on it).

    python -m conformance list --tier T [--format csv] [--model NAME|all] [--cases FILE]
    python -m conformance run --tier T [--backend NAME ...] [-k EXPR] [--shard i/n] [--out DIR]
                              [--cases FILE] [--case ID] [--backend-module mod:Class] [-n N]
                              [--gpus 0,1] [--model NAME|all]
    python -m conformance dump CASE_ID --out DIR [--cases FILE]

Installed (`make setup`, or `pip install -e .`), the same is `encdec-attn run|list|dump ...`, and
`encdec-attn render|merge|gate|bench ...` reaches the reports and the bench.

`run` exits 0 when nothing failed or errored, 1 otherwise, 2 for bad usage (one line, nothing
in --out touched), 130 after Ctrl-C and 143 after SIGTERM (results kept, marked interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from optimized.kernels import interpret_without_cuda

interpret_without_cuda()  # before Triton is imported

from conformance.runner import DEFAULT_TIMEOUT_S
from conformance.schema import Status
from conformance.selection import USER_OUT
from optimized.backend import Capabilities, backend_names

DEFAULT_OUT = "reports/out"


def cmd_list(args) -> int:
    from conformance.cases import read_cases_file
    from conformance.generate import coverage, generate, generate_for_models, shard
    from conformance.selection import check_model

    check_model(args.model, None, args.cases)
    if args.cases:
        return _list_file(args, shard(read_cases_file(args.cases), args.shard))
    every = generate_for_models(args.tier, args.model) if args.model else generate(args.tier)
    cases = shard(every, args.shard)
    if not cases:
        raise ValueError(f"no cases selected (tier {args.tier}, shard {args.shard})")
    if args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=["case_id", *asdict(cases[0])])
        w.writeheader()
        for c in cases:
            w.writerow({"case_id": c.id, **asdict(c), **_labels(c)})
    else:
        for c in cases:
            axes = " ".join(f"{k}={v}" for k, v in {**asdict(c), **_labels(c)}.items())
            print(f"{c.id}  {axes}")
    got, want = coverage(args.tier, every, args.model)
    print(
        f"# {len(cases)} cases; coverage: {got} of {want} valid axis-value pairs "
        f"({100 * got / want:.1f}%)",
        file=sys.stdout if args.format != "csv" else sys.stderr,
    )
    return 0


def _labels(case) -> dict:
    """The columns where a case's rows say more than its axis values (a model preset brings its
    own position bias): as results.csv labels it."""
    from conformance.cases import Case

    if not isinstance(case, Case):
        return {}
    return {"position_bias": case.columns()["position_bias"]}


def _list_file(args, cases) -> int:
    """`list --cases FILE`: the file's cases (axis rows and explicit shapes) with their ids."""
    if not cases:
        raise ValueError(f"no cases selected (--cases {args.cases}, shard {args.shard})")
    rows = [{"case_id": c.id, **c.columns()} for c in cases]
    if args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    else:
        for c in cases:
            text = " ".join(f"{k}={v}" for k, v in c.to_dict().items() if v not in (None, "", ()))
            print(f"{c.id}  {text}")
    print(f"# {len(cases)} cases from {args.cases}", file=sys.stderr)
    return 0


def _check_out_dir(out: str) -> None:
    """--out must be a directory this process can write (created if missing)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: {out!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create {out!r} ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out: {out!r} is not writable")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected seconds > 0, got {text!r}")
    return value


def resolve_run(args):
    """The run's plan, resolved once (ValueError naming the option: exit 2, nothing touched)."""
    from conformance import selection
    from conformance.engine import Plan
    from conformance.generate import TIERS

    if args.tier not in TIERS:
        raise ValueError(f"--tier: expected one of {TIERS}, got {args.tier!r}")
    if args.cases and not Path(args.cases).is_file():
        raise ValueError(f"--cases: no such file {args.cases!r}")
    timeout, _ = _engine_options(args)
    if args.gpus is not None:
        args.gpus = parse_gpus(args.gpus, torch.cuda.device_count())
    shapes = selection.workloads(args.tier, args.model, args.cases, args.case, args.shard)
    picked = selection.backends(args.backend, args.backend_module)
    tests = selection.tests(shapes, picked, args.k)
    if not tests:
        why = f" (-k {args.k!r} matches no CASE_ID::BACKEND)" if args.k else ""
        raise ValueError(f"no cases selected{why}")
    from conformance.engine import auto_workers

    tests = tuple(tests)
    workers = auto_workers(tests) if args.workers == "auto" else max(1, int(args.workers))
    if args.out is None:  # a user's backend never overwrites the project's own result set
        mine = [b.name for b, spec in picked if spec]
        args.out = f"{USER_OUT}/{mine[0]}" if mine and not args.backend else DEFAULT_OUT
    _check_out_dir(args.out)
    return Plan(tests, args.out, args.tier, workers, timeout, uuid.uuid4().hex)


def parse_gpus(text: str, available: int) -> str:
    """`--gpus 0,2`: which of the visible GPUs the engine may use (workers take them round
    robin), as a CUDA_VISIBLE_DEVICES value; ValueError naming what is wrong."""
    if available == 0:
        raise ValueError("--gpus: no CUDA device here")
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        ids = []
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < available for i in ids):
        raise ValueError(
            f"--gpus: expected distinct GPU indices in 0..{available - 1} separated by commas, "
            f"got {text!r}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(i) for i in range(available)]
    return ",".join(names[i] for i in ids)


def cmd_run(args) -> int:
    """Resolve the plan, then run it on the engine (`supervise`); the report beside it."""
    plan = resolve_run(args)
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    cases = len({t.shape.id for t in plan.tests})
    backends = len({t.backend for t in plan.tests})
    print(
        f"[conformance] {len(plan.tests)} tests ({cases} cases x {backends} backends), "
        f"{plan.workers} worker(s) -> {plan.out}",
        flush=True,
    )
    code = supervise(plan)
    _render(Path(plan.out))
    return code


def supervise(plan) -> int:
    """Run the engine (conformance/engine.py) in a process of its own and supervise it: signals
    are passed on, and whatever happens to it (killed, a crash of its own), results.csv is
    written from what finished, every test that left no row an error row. Its exit code."""
    from conformance import engine
    from conformance.results import finalize_run, read_run, summary_lines

    child = engine.engine_context().Process(target=engine.engine_main, args=(plan,))
    received: list[int] = []

    def pass_on(signum, frame):
        received.append(signum)
        if child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    old = {s: signal.signal(s, pass_on) for s in engine.SIGNAL_EXIT}
    try:
        child.start()
        while child.exitcode is None:
            child.join(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = child.exitcode
    info = read_run(Path(plan.out))
    final = info.get("run_id") == plan.run_id and info.get("state") in ("complete", "interrupted")
    if not final or code not in (0, 1, 130, 143):
        # The engine died (or was killed) before it finished the result set: finish it here.
        state = "interrupted" if received else "complete"
        counts = finalize_run(Path(plan.out), state, plan)
        print(f"[conformance] the engine ended with exit code {code}", flush=True)
        for line in summary_lines(Path(plan.out), counts, state):
            print(line, flush=True)
        return engine.SIGNAL_EXIT[received[0]] if received else 1
    return engine.SIGNAL_EXIT[received[0]] if received else code


def _render(out: Path) -> None:
    """index.html beside results.csv (one command gives the report); a report that cannot be
    written is said, never a change of the run's verdict."""
    from reports.html import write_report

    bench = out / "bench.csv"
    try:
        page = write_report(
            [out / "results.csv"], out / "index.html", bench if bench.exists() else None
        )
        print(f"[conformance] report: {page}", flush=True)
    except Exception as e:  # the rows are the result; the page is a view of them
        print(f"[conformance] no report: {type(e).__name__}: {e}", flush=True)


def cmd_dump(args) -> int:
    import numpy as np

    from conformance import runner
    from conformance.cases import build_inputs, lower, select_cases
    from conformance.selection import check_model
    from conformance.shapes import Shape
    from conformance.workloads import Episode
    from reference.attention import attention

    check_model(args.model, [args.case_id], args.cases)
    (case,) = select_cases([args.case_id], args.cases)
    runner.check_fits([case if isinstance(case, Shape) else lower(case)], "dump")
    inputs = build_inputs(case)
    steps = inputs.steps if isinstance(inputs, Episode) else (inputs,)
    ref = inputs.with_fresh_cache()
    ref_steps = ref.steps if isinstance(ref, Episode) else (ref,)
    arrays = {}
    for i, (step, rstep) in enumerate(zip(steps, ref_steps)):
        p = f"step{i}_"
        md = step.metadata
        if rstep.kv_cache is not None:
            arrays[p + "key_cache_before"] = _np(rstep.kv_cache[0])
            arrays[p + "value_cache_before"] = _np(rstep.kv_cache[1])
        out = attention(*rstep.args())
        for name in ("query", "key", "value"):
            t = getattr(step, name)
            if t is not None:
                arrays[p + name] = _np(t)
        for name in ("block_tables", "slot_mapping", "cross_block_tables", "cross_slot_mapping"):
            t = getattr(md, name)
            if t is not None:
                arrays[p + name] = t.numpy()
        for name in ("query_lens", "context_lens", "encoder_seq_lens"):
            if getattr(md, name) is not None:
                arrays[p + name] = np.array(getattr(md, name), dtype=np.int64)
        if md.position_bias != "none":  # the table as the backend receives it
            arrays[p + "relative_attention_bias"] = _np(md.relative_attention_bias)
        arrays[p + "reference_output"] = out.numpy()
        if rstep.kv_cache is not None:
            arrays[p + "key_cache_after"] = _np(rstep.kv_cache[0])
            arrays[p + "value_cache_after"] = _np(rstep.kv_cache[1])
    out_dir = Path(args.out)
    _check_out_dir(args.out)
    verdicts = _dump_backend(args, case, arrays) if args.backend or args.backend_module else None
    np.savez_compressed(out_dir / "case.npz", **arrays)
    meta = {
        "case_id": case.id,
        **case.to_dict(),
        **_labels(case),
        "steps": [
            dict(
                attn_kind=s.attn_kind.value,
                block_size=s.metadata.block_size,
                sliding_window=s.metadata.sliding_window,
                scale=s.metadata.scale_for(s.query.shape[-1]),
                kv_cache_dtype=s.metadata.kv_cache_dtype,
                k_scale=None if s.metadata.k_scale is None else s.metadata.k_scale.tolist(),
                v_scale=None if s.metadata.v_scale is None else s.metadata.v_scale.tolist(),
                **_bias_fields(s),
                **({"backend": verdicts[i]} if verdicts else {}),
            )
            for i, s in enumerate(steps)
        ],
        "note": "bfloat16 and fp8 tensors are stored as float32 (numpy has neither); fp8 "
        "caches hold the stored values, unscaled; a step with position_bias t5 adds "
        "stepN_relative_attention_bias[bucket(key position - query position), head] to its "
        "scaled scores (Hugging Face's buckets, bidirectional as said; a decoder query at "
        "context_len + its index)",
    }
    (out_dir / "case.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out_dir / 'case.npz'} ({len(arrays)} arrays) and {out_dir / 'case.json'}")
    if verdicts:
        for i, v in enumerate(verdicts):
            print(
                f"step {i}: {v['backend']} {v['status']}{': ' + v['reason'] if v['reason'] else ''}"
            )
        return 1 if any(v["status"] in (Status.FAIL, Status.ERROR) for v in verdicts) else 0
    return 0


def _bias_fields(step) -> dict:
    """A dumped step's position bias: which, its bucket configuration and direction."""
    md = step.metadata
    if md.position_bias == "none":
        return dict(position_bias="none")
    return dict(
        position_bias=md.position_bias,
        relative_attention_num_buckets=md.relative_attention_num_buckets,
        relative_attention_max_distance=md.relative_attention_max_distance,
        bidirectional=step.attn_kind.value == "encoder",
    )


def _dump_backend(args, case, arrays: dict) -> list[dict]:
    """Run one backend on the dumped case, step by step as the matrix does: its outputs and
    caches go beside the reference's (`stepN_backend_output`, `..._backend_key_cache_after`),
    its verdicts into case.json."""
    from conformance import runner, selection
    from conformance.cases import lower
    from conformance.shapes import Shape

    ((backend, _),) = selection.backends(
        [args.backend] if args.backend else ([] if args.backend_module else None),
        [args.backend_module] if args.backend_module else None,
    )
    shape = case if isinstance(case, Shape) else lower(case)
    run = runner.case_run(shape)
    expected = run.expected_for(backend.capabilities.fp8_prefill_reads_inputs)
    device = torch.device(backend.device())
    mine = run.fresh(device)
    finite = backend.capabilities.finite_unowned_slots
    if finite:  # as the runner gives it: finite poison where nothing was written
        runner.poison_finite(mine)
    pool = runner.ExpectedCaches(mine if finite else run.pristine)
    verdicts = []
    for i, (step, pristine, exp) in enumerate(zip(runner.steps_of(mine), run.steps, expected)):
        after = pool.advance(exp)
        v = runner.judge_step(backend, step, pristine, exp, after, device, args.case_timeout)
        if v.output is not None:
            arrays[f"step{i}_backend_output"] = _np(v.output.detach().cpu())
        if step.kv_cache is not None:
            arrays[f"step{i}_backend_key_cache_after"] = _np(step.kv_cache[0].cpu())
            arrays[f"step{i}_backend_value_cache_after"] = _np(step.kv_cache[1].cpu())
            if v.status != Status.PASS:
                runner._take_expected_cache(step, after)
        c = v.comparison
        verdicts.append(
            dict(
                backend=backend.name,
                status=str(v.status),
                reason=v.reason,
                **{m: getattr(c, m) for m in ("max_abs_err", "tolerance", "err_ratio", "rms_ratio")}
                if c is not None
                else {},
            )
        )
    return verdicts


def cmd_shrink(args) -> int:
    """The smallest case that still fails as CASE_ID does with the backend
    (conformance/shrink.py): exit 1 with it in OUT/shrunk.jsonl, 0 when the case passes."""
    from conformance import runner, selection
    from conformance.cases import lower, select_cases
    from conformance.shapes import Shape
    from conformance.shrink import shrink

    selection.check_model(args.model, [args.case_id], args.cases)
    (case,) = select_cases([args.case_id], args.cases)
    shape = case if isinstance(case, Shape) else lower(case)
    runner.check_fits([shape], "shrink")
    if bool(args.backend) == bool(args.backend_module):
        raise ValueError("shrink: give one backend, --backend NAME or --backend-module SPEC")
    ((backend, spec),) = selection.backends(
        [args.backend] if args.backend else [],
        [args.backend_module] if args.backend_module else None,
    )
    out = Path(args.out or f"reports/out/shrink/{backend.name}")
    _check_out_dir(str(out))
    budget = positive_seconds(str(args.budget))
    s = shrink(shape, backend, spec, budget, positive_seconds(str(args.case_timeout)))
    which = f"--backend-module {spec}" if spec else f"--backend {backend.name}"
    if s.failure is None:
        print(f"{args.case_id} passes with {backend.name}: nothing to shrink")
        return 0
    what = lambda sig: f"{sig[0]} at {sig[1]} ({sig[2]})" if sig else "passes"
    line = json.dumps(s.shape.to_dict())
    (out / "shrunk.jsonl").write_text(line + "\n")
    print(f"{args.case_id} with {backend.name}: {what(s.failure)}")
    print(f"shrunk in {s.seconds:.0f} s: {s.kept} simpler cases kept of {s.tried} tried"
          + (" (the budget ended the search)" if s.budget_spent else ""))  # fmt: skip
    print(f"  from: {json.dumps(s.original.to_dict())}")
    print(f"  to:   {line}")
    print(f"  run:  python -m conformance run --cases {out / 'shrunk.jsonl'} {which}")
    print(f"  dump: python -m conformance dump {s.shape.id} --cases {out / 'shrunk.jsonl'} "
          f"--out {out / 'dump'} {which}")  # fmt: skip
    same = s.still == s.failure
    print(
        f"verdict: the shrunk case {'still fails' if same else 'does NOT fail'} for the "
        f"original reason ({what(s.failure)}{'' if same else '; now: ' + what(s.still)})"
    )
    return 1


def cmd_mutate(args) -> int:
    """The selection against the catalogue of planted faults (conformance/mutants.py), on the
    engine (workers, crash and hang isolation, each fault's search cut at its first catch
    unless --all): a table, OUT/mutate.csv and OUT/index.html; exit 1 when a fault survives."""
    import pandas as pd

    from conformance import selection
    from conformance.engine import Plan, auto_workers
    from conformance.mutants import FAULTS, mutant_tests, verdicts
    from conformance.schema import read_jsonl
    from reports.html import write_mutation_report

    if not (args.backend or args.backend_module):
        raise ValueError("mutate: give the backend(s): --backend NAME or --backend-module SPEC")
    faults = args.fault or list(FAULTS)
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"--fault: expected one of {list(FAULTS)}, got {f!r}")
    timeout, workers = _engine_options(args)
    shapes = selection.workloads(args.tier, args.model, args.cases, args.case, args.shard)
    picked = selection.backends(args.backend, args.backend_module)
    keep = selection.keyword_filter(args.k)
    for backend, _ in picked:
        if not any(keep(f"{s.id}::{backend.name}") for s in shapes):
            raise ValueError(f"no cases selected for {backend.name}")
    tests = mutant_tests(shapes, picked, faults, keep)
    out = Path(args.out or f"reports/out/mutate/{picked[0][0].name}")
    _check_out_dir(str(out))
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = parse_gpus(args.gpus, torch.cuda.device_count())
    n = auto_workers(tests) if workers == "auto" else int(workers)
    plan = Plan(tests, str(out), args.tier, n, timeout, uuid.uuid4().hex,
                first_catch=not args.all, quiet=True)  # fmt: skip
    print(f"[mutate] {len(faults)} faults x {len(picked)} backend(s): {len(tests)} tests that "
          f"a fault touches, {n} worker(s) -> {out}", flush=True)  # fmt: skip
    code = supervise(plan)
    if code in (130, 143):
        return code
    rows = read_jsonl(out / "results.jsonl") if (out / "results.jsonl").exists() else []
    table = []
    for v in verdicts(tests, rows, faults, [b.name for b, _ in picked]):
        text = f"caught by {v.failing_rows} failing row(s) in {v.tests_run} test(s)"
        print(f"{v.backend:20s} {v.fault:24s} " + (f"{text}, first {v.first}" if v.caught
              else f"SURVIVES all {v.tests_run} test(s) it touches"), flush=True)  # fmt: skip
        table.append(dict(v.__dict__, tier=args.tier, tests_in_selection=len(shapes)))
    table = pd.DataFrame(table)
    table.to_csv(out / "mutate.csv", index=False)
    write_mutation_report(table, out / "index.html")
    caught = int(table.caught.sum())
    print(f"[mutate] this selection catches {caught} of {len(table)} planted faults "
          f"(fault x backend) -> {out / 'mutate.csv'}")  # fmt: skip
    return 0 if caught == len(table) else 1


def _engine_options(args) -> tuple[float, str]:
    """--case-timeout and -n, checked (ValueError naming the option)."""
    try:
        timeout = positive_seconds(str(args.case_timeout))
    except ValueError as e:
        raise ValueError(f"--case-timeout: {e}") from None
    if args.workers != "auto" and not args.workers.isdigit():
        raise ValueError(f"-n: expected 'auto' or a number of workers, got {args.workers!r}")
    return timeout, args.workers if args.workers == "auto" else str(max(1, int(args.workers)))


def _np(t: torch.Tensor):
    wide = t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
    return (t.float() if wide else t).numpy().copy()


OTHER_COMMANDS = {  # `encdec-attn render ...` and friends: one entry point for everything
    "render": ("reports.__main__", True),
    "merge": ("reports.__main__", True),
    "gate": ("reports.gate", False),
    "bench": ("bench.__main__", False),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OTHER_COMMANDS:
        module, keep = OTHER_COMMANDS[argv[0]]
        other = __import__(module, fromlist=["main"]).main
        return other(argv if keep else argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m conformance (or encdec-attn)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    tiers = "smoke (CPU, CI), full (GPU), exhaustive (kind x phase x block x dtype x layout)"

    def engine_options(parser):
        parser.add_argument(
            "-n",
            dest="workers",
            default=os.environ.get("CONFORMANCE_WORKERS", "1"),
            help="worker processes (default 1; 'auto': one per core on the CPU; on GPUs their "
            "share of the cores, as many as each GPU's memory holds)",
        )
        parser.add_argument(
            "--case-timeout",
            default=str(DEFAULT_TIMEOUT_S),
            help="seconds one backend call may take (> 0)",
        )
        parser.add_argument(
            "--gpus", default=None, help="GPU indices the workers use, e.g. 0,1 (default: all)"
        )

    def workload_options(parser):
        parser.add_argument("--tier", default="smoke", help=f"the generated matrix: {tiers}")
        parser.add_argument(
            "--model", default=None, help="the cases around a model preset (NAME or all)"
        )
        parser.add_argument(
            "--cases", default=None, help="a JSON-lines file of explicit shapes or axis rows"
        )
        parser.add_argument(
            "--shard", default=None, help="i/n: the i-th of n deterministic slices (by case id)"
        )

    pl = sub.add_parser("list", help="print the cases of a tier and its pair coverage")
    workload_options(pl)
    pl.add_argument("--format", choices=["text", "csv"], default="text")
    pr = sub.add_parser(
        "run",
        help="run the matrix: every selected case against every selected backend",
        description="Run the matrix. Exit 0: nothing failed or errored; 1: something did; "
        "2: a usage mistake (one line, nothing in --out touched); 130/143: interrupted.",
    )
    workload_options(pr)
    pr.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="a registered backend (repeatable; default: all but the reference): "
        + ", ".join(backend_names()),
    )
    pr.add_argument(
        "--backend-module",
        action="append",
        metavar="SPEC",
        help="your backend: package.module:Class or path/to/file.py:Class (repeatable); its "
        f"results go to {USER_OUT}/<name>/ unless --out says otherwise. It declares what it "
        f"supports as `capabilities = Capabilities(...)` (optimized/backend.py; fields and "
        f"defaults: {Capabilities.describe()})",
    )
    pr.add_argument("-k", default=None, help="a pytest-style -k expression over CASE_ID::BACKEND")
    pr.add_argument("--case", action="append", help="one case id (repeatable)")
    pr.add_argument(
        "--out",
        default=None,
        help="results folder (results.csv, index.html, run.json); default reports/out, or "
        f"{USER_OUT}/<name> for a --backend-module run",
    )
    engine_options(pr)
    pd = sub.add_parser(
        "dump",
        help="write one case's inputs, caches and reference output (and a backend's, beside)",
        description="Write one case's inputs, caches before/after and reference output to "
        "OUT/case.npz and OUT/case.json; with --backend or --backend-module, run that backend "
        "on them as the matrix does and write its output, caches and verdict beside "
        "(exit 1 when it fails).",
    )
    pd.add_argument("case_id")
    pd.add_argument("--out", required=True)
    pd.add_argument("--cases", default=None, help="the file of an explicit shape's id")
    pd.add_argument("--model", default=None, help="the model preset the case belongs to")
    pd.add_argument("--backend", default=None, metavar="NAME", help="a registered backend")
    pd.add_argument("--backend-module", default=None, metavar="SPEC", help="your backend")
    pd.add_argument("--case-timeout", default=DEFAULT_TIMEOUT_S, type=float, help=argparse.SUPPRESS)
    pm = sub.add_parser(
        "mutate",
        help="how many planted faults (conformance/mutants.py) a selection catches",
        description="Run the selection against a catalogue of the bugs paged kernels have, each "
        "planted around the backend: per fault, caught (a row fails or errors) or not, by how "
        "many failing rows. On the engine, as `run` (-n, --gpus, --case-timeout; a crash or a "
        "hang is that test's error); a fault's search stops at its first catch unless --all. "
        "Writes OUT/mutate.csv and OUT/index.html (and the engine's results.csv). Exit 1 when "
        "a fault survives.",
    )
    workload_options(pm)
    pm.add_argument("--backend", action="append", metavar="NAME", help="a registered backend")
    pm.add_argument("--backend-module", action="append", metavar="SPEC", help="your backend")
    pm.add_argument("--case", action="append", help="one case id (repeatable)")
    pm.add_argument("-k", default=None, help="a pytest-style -k expression over CASE_ID::BACKEND")
    pm.add_argument("--fault", action="append", help="only these faults (repeatable)")
    pm.add_argument("--all", action="store_true", help="every test a fault touches, for counts")
    pm.add_argument("--out", default=None, help="default reports/out/mutate/<backend name>")
    engine_options(pm)
    psh = sub.add_parser(
        "shrink",
        help="the smallest case that still fails as CASE_ID does with a backend",
        description="From a failing case, search for a smaller explicit shape that fails the same "
        "way (the same verdict on the same step kind for the same kind of reason): fewer "
        "sequences, shorter lengths, fewer heads, the smallest head size, a default page, "
        "contiguous layout, no window, default scale, fp32. Writes OUT/shrunk.jsonl and prints "
        "the commands that re-run and dump it. Exit 1: it still fails; 0: the case passes.",
    )
    psh.add_argument("case_id")
    psh.add_argument("--tier", default="smoke", help="the tier the case id comes from (any: an "
                     "id names its case)")  # fmt: skip
    psh.add_argument("--model", default=None, help="the model preset the case belongs to")
    psh.add_argument("--cases", default=None, help="the file of an explicit shape's id")
    psh.add_argument("--backend", default=None, metavar="NAME", help="a registered backend")
    psh.add_argument("--backend-module", default=None, metavar="SPEC", help="your backend")
    psh.add_argument("--out", default=None, help="default reports/out/shrink/<backend name>")
    psh.add_argument("--budget", default="300", help="seconds the search may take (> 0)")
    psh.add_argument("--case-timeout", default=str(DEFAULT_TIMEOUT_S), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            from conformance.generate import TIERS

            if args.tier not in TIERS:
                p.error(f"--tier: expected one of {TIERS}, got {args.tier!r}")
            return cmd_list(args)
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "shrink":
            return cmd_shrink(args)
        if args.cmd == "mutate":
            return cmd_mutate(args)
        return cmd_dump(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
