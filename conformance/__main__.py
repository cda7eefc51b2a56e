"""The conformance command line (stable: people and CI scripts rely on it).

    python -m conformance list --tier T [--format csv] [--model NAME|all] [--cases FILE]
    python -m conformance run --tier T [--backend NAME ...] [-k EXPR] [--shard i/n] [--out DIR]
                              [--cases FILE] [--case ID] [--backend-module mod:Class] [-n N]
                              [--gpus 0,1] [--model NAME|all]
    python -m conformance dump CASE_ID --out DIR [--cases FILE]

`run` exits 0 when nothing failed or errored, 1 otherwise, 2 for bad usage (one line, nothing
in --out touched), 130 after Ctrl-C and 143 after SIGTERM (results kept, marked interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from optimized.kernels import interpret_without_cuda

interpret_without_cuda()  # before Triton is imported

from conformance.runner import DEFAULT_TIMEOUT_S


def cmd_list(args) -> int:
    from conformance.cases import read_cases_file
    from conformance.generate import coverage, generate, generate_for_models, shard

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
            w.writerow({"case_id": c.id, **asdict(c)})
    else:
        for c in cases:
            axes = " ".join(f"{k}={v}" for k, v in asdict(c).items())
            print(f"{c.id}  {axes}")
    got, want = coverage(args.tier, every, args.model)
    print(
        f"# {len(cases)} cases; coverage: {got} of {want} valid axis-value pairs "
        f"({100 * got / want:.1f}%)",
        file=sys.stdout if args.format != "csv" else sys.stderr,
    )
    return 0


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


def _check_run_args(args) -> None:
    """Bad usage is caught here, before anything in --out is touched (exit 2, one line)."""
    from _pytest.mark.expression import Expression

    from conformance.cases import select_cases
    from conformance.conftest import positive_seconds
    from conformance.generate import TIERS, shard
    from optimized.backend import backend_names, load_backend

    if args.tier not in TIERS:
        raise ValueError(f"--tier: expected one of {TIERS}, got {args.tier!r}")
    shard([], args.shard)
    if args.model:
        from conformance.generate import generate_for_models

        generate_for_models(args.tier, args.model)  # names and tier checked
    known = backend_names()
    for b in args.backend or []:
        if b not in known:
            raise ValueError(f"--backend: unknown backend {b!r}; known: {known}")
    for spec in args.backend_module or []:
        try:
            load_backend(spec)
        except ValueError:
            raise
        except Exception as e:  # an import error, or the class's constructor failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"--backend-module {spec}: {type(e).__name__}: {first}") from None
    if args.cases and not Path(args.cases).is_file():
        raise ValueError(f"--cases: no such file {args.cases!r}")
    if select_cases(args.case, args.cases) == []:
        raise ValueError(f"no cases selected: --cases {args.cases} holds no case")
    if args.k:
        try:
            Expression.compile(args.k)
        except SyntaxError as e:
            raise ValueError(f"-k: not a valid expression ({e.msg}): {args.k!r}") from None
    try:
        args.case_timeout = positive_seconds(str(args.case_timeout))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--case-timeout: {e}") from None
    if args.workers != "auto" and not (args.workers.isdigit()):
        raise ValueError(f"-n: expected 'auto' or a number of workers, got {args.workers!r}")
    _check_out_dir(args.out)
    if args.gpus is not None:
        args.gpus = parse_gpus(args.gpus, torch.cuda.device_count())


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


def _engine_argv(args) -> list[str]:
    here = Path(__file__).parent
    argv = [
        str(here / "test_matrix.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:benchmark",  # not used by the matrix; its xdist warning is noise on stderr
        "--tier",
        args.tier,
        "--out",
        args.out,
        "--rootdir",
        str(here.parent),
        "-o",
        "addopts=",
        "--case-timeout",
        str(args.case_timeout),
    ]
    for b in args.backend or []:
        argv += ["--backend", b]
    for m in args.backend_module or []:
        argv += ["--backend-module", m]
    for c in args.case or []:
        argv += ["--case", c]
    if args.k:
        argv += ["-k", args.k]
    if args.shard:
        argv += ["--shard", args.shard]
    if args.model:
        argv += ["--model", args.model]
    if args.cases:
        argv += ["--cases", args.cases]
    if args.workers and args.workers != "0":
        # Every crashed worker is replaced (xdist's default stops after 4 per worker, and the
        # tests still queued would then never run).
        argv += ["-n", args.workers, "--dist", "load", "--max-worker-restart", "100000"]
        if importlib.util.find_spec("pytest_timeout"):
            # Backstop for what SIGALRM cannot stop (a hung kernel blocks in C): pytest-timeout
            # ends the worker, xdist starts another, the controller records the crash row.
            argv += [
                "-p",
                "timeout",
                "--timeout",
                str(3 * args.case_timeout),
                "--timeout-method",
                "thread",
            ]
    return argv


SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _die_with_parent() -> None:
    """In the engine process: a SIGTERM when `run` itself dies (even by SIGKILL), so the engine
    never runs on as an orphan; it then stops like any interrupted run (Linux; elsewhere a
    no-op)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cmd_run(args) -> int:
    """Validate, then run the engine (pytest) in a child process and supervise it: signals are
    passed on, and whatever happens to the child (a backend calling os._exit, a segfault
    without workers), results.csv is written from what finished, every test that left no row
    is an error row, and an interrupted run is marked so."""
    from conformance.results import RUN_ID_ENV, finalize_run, read_run, summary_line

    _check_run_args(args)
    run_id = uuid.uuid4().hex
    env = dict(os.environ, **{RUN_ID_ENV: run_id})
    if args.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.gpus
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", *_engine_argv(args)], env=env, preexec_fn=_die_with_parent
    )
    received: list[int] = []

    def pass_on(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    old = {s: signal.signal(s, pass_on) for s in SIGNAL_EXIT}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # a signal between handlers: keep waiting for the child
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    info = read_run(Path(args.out))
    if info.get("run_id") != run_id:  # the engine never started a result set
        if code == 5:
            print("error: no cases selected (check -k, --shard, --case, --cases)", file=sys.stderr)
            return 2
        if received:
            return SIGNAL_EXIT[received[0]]
        print(f"error: the matrix did not start (engine exit code {code})", file=sys.stderr)
        return 2
    interrupted = bool(received) or code == 2 or info.get("state") == "interrupted"
    state = "interrupted" if interrupted else "complete"
    if info.get("state") != state or code not in (0, 1, 2):
        # The engine died (or was killed) before it wrote its CSV: write it here.
        counts = finalize_run(Path(args.out), state)
        print(summary_line(Path(args.out), counts, state))
    else:
        counts = read_run(Path(args.out)).get("counts", {})
    if received:
        return SIGNAL_EXIT[received[0]]
    if interrupted:
        return SIGNAL_EXIT[signal.SIGINT]
    return 1 if counts.get("fail", 0) or counts.get("error", 0) or code not in (0, 1) else 0


def cmd_dump(args) -> int:
    import numpy as np

    from conformance.cases import build_inputs, select_cases
    from conformance.workloads import Episode
    from reference.attention import attention

    (case,) = select_cases([args.case_id], args.cases)
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
        arrays[p + "reference_output"] = out.numpy()
        if rstep.kv_cache is not None:
            arrays[p + "key_cache_after"] = _np(rstep.kv_cache[0])
            arrays[p + "value_cache_after"] = _np(rstep.kv_cache[1])
    out_dir = Path(args.out)
    _check_out_dir(args.out)
    np.savez_compressed(out_dir / "case.npz", **arrays)
    meta = {
        "case_id": case.id,
        **case.to_dict(),
        "steps": [
            dict(
                attn_kind=s.attn_kind.value,
                block_size=s.metadata.block_size,
                sliding_window=s.metadata.sliding_window,
                scale=s.metadata.scale_for(s.query.shape[-1]),
            )
            for s in steps
        ],
        "note": "bfloat16 tensors are stored as float32 (numpy has no bfloat16)",
    }
    (out_dir / "case.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out_dir / 'case.npz'} ({len(arrays)} arrays) and {out_dir / 'case.json'}")
    return 0


def _np(t: torch.Tensor):
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m conformance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("list", help="print the cases of a tier and its pair coverage")
    pl.add_argument("--tier", default="smoke")
    pl.add_argument("--format", choices=["text", "csv"], default="text")
    pl.add_argument("--shard", default=None)
    pl.add_argument("--model", default=None, help="a model preset, or all")
    pl.add_argument("--cases", default=None, help="a cases file (axis rows, explicit shapes)")
    pr = sub.add_parser("run", help="run the matrix (pytest underneath)")
    pr.add_argument("--tier", default="smoke")
    pr.add_argument("--backend", action="append")
    pr.add_argument("--backend-module", action="append")
    pr.add_argument("-k", default=None, help="pytest -k expression over 'CASE_ID::BACKEND'")
    pr.add_argument("--shard", default=None)
    pr.add_argument("--model", default=None, help="a model preset, or all (conformance/models.py)")
    pr.add_argument("--out", default="reports/out")
    pr.add_argument(
        "--cases", default=None, help="JSON lines: axis rows or explicit shapes (--case filters)"
    )
    pr.add_argument("--case", action="append", help="one case id (repeatable)")
    pr.add_argument(
        "-n",
        dest="workers",
        default=os.environ.get("CONFORMANCE_WORKERS", "0"),
        help="pytest-xdist workers ('auto', N, or 0 for none)",
    )
    pr.add_argument("--case-timeout", default=str(DEFAULT_TIMEOUT_S), help="seconds per call (> 0)")
    pr.add_argument(
        "--gpus", default=None, help="GPU indices the workers use, e.g. 0,1 (default: all visible)"
    )
    pd = sub.add_parser("dump", help="write one case's inputs, caches and reference output")
    pd.add_argument("case_id")
    pd.add_argument("--out", required=True)
    pd.add_argument("--cases", default=None, help="the file of an explicit shape's id")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            from conformance.generate import TIERS

            if args.tier not in TIERS:
                p.error(f"--tier: expected one of {TIERS}, got {args.tier!r}")
            return cmd_list(args)
        if args.cmd == "run":
            return cmd_run(args)
        return cmd_dump(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
