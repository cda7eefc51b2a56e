"""Where one case's time goes: cProfile of the reference and of each backend's run.

    python tools/profile_case.py CASE_ID [--backend NAME ...] [--top N]

Prints wall times and the top functions by own time. Used to size the matrix tiers (the
reference, the comparisons and the backends' compiles all count against the tier's time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from optimized.kernels import interpret_without_cuda

interpret_without_cuda()  # before Triton is imported

from conformance.cases import Case
from conformance.runner import expected_for, run_case
from optimized.backend import get_backend


def profiled(label: str, fn, top: int):
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = fn()
    prof.disable()
    print(f"== {label}: {time.perf_counter() - t0:.2f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case_id")
    p.add_argument("--backend", action="append")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    case = Case.from_id(args.case_id)
    profiled("reference (inputs, reference, baseline)", lambda: expected_for(case), args.top)
    for name in args.backend or ["torch"]:
        backend = get_backend(name)
        rows = profiled(f"{name}: run_case", lambda b=backend: run_case(case, b), args.top)
        print(name, sorted({(r["step"], r["status"]) for r in rows})[:4], "...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
