"""The launch rule against a card's own sweep, without the card:

    python -m bench replay SWEEP.csv [SWEEP.csv ...] [--card h200|h100]

A sweep (`python -m bench tune --only card|tiny|stages`, committed under
reports/results/<card>/tune-*.csv) times every heads × launch × split count of each shape on
one card, with the resident programs and shared memory of each compiled variant. This plans
every shape of it as `optimized/ops/plan.py` would on that card (its SMs, shared memory and
memory figures; the resident programs and K/V buffers each launch had there, read from the
sweep's rows, or for a launch the sweep did not time compiled here for sm_90 like `bench
registers` does) and prints, per shape, the plan's measured time against the sweep's best.
Where the plan picks a launch or split count the sweep did not time, the row says so: the
ratio is unknown, not 1. A change to the rule can so be checked against every sweep a card
has made, before GPU time is spent on it (`bench/test_replay.py` does this for the H200's).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from bench.tune import CARD, STAGES, TINY
from optimized.ops import plan as planner

# name -> (batch, kv_len, heads, kv_heads, head_size, block_size, query_len, causal)
SHAPES = {name: tuple(shape) for name, *shape in CARD + TINY + STAGES}
# A card's figures as plan.py reads them from torch: SMs, shared memory per block (opt-in),
# memory clock (kHz) and bus width (bits).
CARDS = {
    "h100": dict(sms=132, smem=232_448, clock=2_619_000, bus=5120),
    "h200": dict(sms=132, smem=232_448, clock=3_201_000, bus=6016),
}


@dataclass(frozen=True)
class Replayed:
    """One shape of a sweep: the plan's (heads, tile, warps, stages, splits) and its time (µs,
    NaN where the sweep did not time it), and the sweep's best."""

    file: str
    shape: str
    plan: tuple
    plan_us: float
    best: tuple
    best_us: float

    @property
    def ratio(self) -> float:
        return self.plan_us / self.best_us


@contextlib.contextmanager
def as_on(card: str):
    """plan.py planning as on `card` (CARDS): its device queries answer with the card's
    figures, the GPU's launch rule instead of the interpreter's, and a fresh memo."""
    c = CARDS[card]
    saved = {n: getattr(planner, n) for n in ("interpreting", "smem_limit", "num_sms",
                                               "card_memory", "_CHOSEN")}  # fmt: skip
    planner.interpreting = lambda: False
    planner.smem_limit = lambda device: c["smem"]
    planner.num_sms = lambda device: c["sms"]
    planner.card_memory = lambda device: (c["clock"], c["bus"], c["sms"])
    planner._CHOSEN = planner.Memo()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(planner, name, value)


def read_sweep(path: str) -> dict[str, list[dict]]:
    """The sweep's timed rows (`sweep`, not the `default` ones) by shape."""
    rows = defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(line for line in f if not line.startswith("#")):
            if r["card"] == "sweep":
                rows[r["shape"]].append(r)
    return rows


def replay_shape(path: str, name: str, rows: list[dict]) -> Replayed:
    """Plan shape `name` with the probe answering from its sweep `rows`."""
    b, kv, h, kvh, d, _bs, ql, causal = SHAPES[name]
    key = lambda r: tuple(int(r[k]) for k in ("heads", "tile_n", "warps", "stages", "splits"))
    times = {key(r): float(r["ms"]) * 1e3 for r in rows}
    compiled = {key(r)[:4]: (int(r["resident"]), int(r["shared"])) for r in rows}
    group = h // kvh
    sched = planner.make_schedule((ql,) * b, (kv,) * b, ((kv - ql) if causal else 0,) * b,
                                  group, "cpu")  # fmt: skip
    cuda = torch.device("cuda")
    heads, block_m, wide = planner.program_shape(sched, kvh, group, d, None, cuda)

    def probe(c: planner.Launch, splits: int) -> tuple[int, int]:
        got = compiled.get((heads, c.tile_n, c.num_warps, c.num_stages))
        if got is None:  # a launch the sweep did not time: compiled here for sm_90
            got = _compiled_sm90(wide // heads, c, triton.next_power_of_2(group), heads)
        resident, shared = got
        return resident, planner.compiled_kv_buffers(shared, block_m, wide, 2, c.tile_n, 2)

    p = planner.make_plan(sched, num_kv_heads=kvh, group=group, head_size=d, elem_bytes=2,
                          kv_elem_bytes=2, device=cuda, probe=probe, heads=heads,
                          variant=(name, heads, block_m))  # fmt: skip
    chosen = (p.heads, p.launch.tile_n, p.launch.num_warps, p.launch.num_stages, p.num_splits)
    best = min(times, key=times.get)
    return Replayed(path, name, chosen, times.get(chosen, math.nan), best, times[best])


@functools.cache
def _compiled_sm90(head_pad: int, launch: planner.Launch, group_pad: int, heads: int):
    """(resident programs, shared memory) of a decode variant compiled offline for sm_90
    (`bench registers`: Triton's own ptxas, the registers a launch on the card has)."""
    from bench.registers import SM90, compile_decode, resources

    r = resources(compile_decode(head_pad, launch, group_pad, heads))
    return planner.resident_programs(r["registers"], launch.num_warps, r["shared"], SM90), r[
        "shared"
    ]


def replay(paths: list[str], card: str) -> list[Replayed]:
    out = []
    with as_on(card):
        for path in paths:
            for name, rows in read_sweep(path).items():
                out.append(replay_shape(path, name, rows))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("sweeps", nargs="+", help="tune CSVs (python -m bench tune --only card ...)")
    p.add_argument("--card", default="h200", choices=sorted(CARDS))
    args = p.parse_args(argv)
    for path in args.sweeps:
        if not Path(path).is_file():
            print(f"python -m bench replay: no such sweep: {path}", file=sys.stderr)
            return 2
        unknown = sorted(set(read_sweep(path)) - set(SHAPES))
        if unknown:
            print(f"python -m bench replay: {path}: shapes not in bench/tune.py: "
                  f"{', '.join(unknown)}", file=sys.stderr)  # fmt: skip
            return 2
    done = replay(args.sweeps, args.card)
    for r in done:
        plan = "/".join(map(str, r.plan))
        best = "/".join(map(str, r.best))
        print(f"{Path(r.file).name:24s} {r.shape:24s} plan {plan:18s} {r.plan_us:8.1f} us  "
              f"best {best:18s} {r.best_us:8.1f} us  x{r.ratio:.3f}")  # fmt: skip
    ok = [r.ratio for r in done if r.ratio == r.ratio]
    geo = math.exp(sum(map(math.log, ok)) / len(ok)) if ok else math.nan
    print(f"# {len(done)} shapes on {args.card}: plan ÷ best geo-mean {geo:.3f}, max "
          f"{max(ok, default=math.nan):.3f}; {len(done) - len(ok)} planned a launch or split "
          "count the sweep did not time")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
