"""The launch rule against a card's own sweep, without the card:

    python -m tuning.replay SWEEP.csv [SWEEP.csv ...] [--card h200|h100]

A sweep (`python -m tuning.tune --only card|tiny|stages`, committed under
reports/results/<card>/tune-*.csv) times every heads × launch × split count of each shape on
one card, with the resident programs and shared memory of each compiled variant. This plans
every shape of it as `optimized/ops/plan.py` would on that card (its SMs, shared memory and
memory figures; the resident programs and K/V buffers each launch had there, read from the
sweep's rows, or for a launch the sweep did not time compiled here for sm_90 like
`tuning/registers.py` does) and prints, per shape, the plan's measured time against the sweep's
best. Where the plan picks a launch or split count the sweep did not time, the row says so: the
ratio is unknown, not 1. A change to the rule can so be checked against every sweep a card has
made, before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import triton

from optimized.ops.plan import (
    H100,
    H200,
    Card,
    Compiled,
    Geometry,
    Launch,
    make_plan,
    make_schedule,
    program_shape,
)
from tuning.tune import CARD, STAGES, TINY

# name -> (batch, kv_len, heads, kv_heads, head_size, block_size, query_len, causal)
SHAPES = {name: tuple(shape) for name, *shape in CARD + TINY + STAGES}
CARDS = {"h100": H100, "h200": H200}


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


def read_sweep(path: str) -> dict[str, list[dict]]:
    """The sweep's timed rows (`sweep`, not the `default` ones) by shape."""
    rows = defaultdict(list)
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for r in csv.DictReader(line for line in f if not line.startswith("#")):
            if r["card"] == "sweep":
                rows[r["shape"]].append(r)
    return rows


def replay_shape(path: str, name: str, rows: list[dict], card: Card) -> Replayed:
    """Plan shape `name` for `card` with the probe answering from its sweep `rows`."""
    b, kv, h, kvh, d, _bs, ql, causal = SHAPES[name]
    key = lambda r: tuple(int(r[k]) for k in ("heads", "tile_n", "warps", "stages", "splits"))
    times = {key(r): float(r["ms"]) * 1e3 for r in rows}
    compiled = {key(r)[:4]: Compiled(int(r["regs"]), int(r["shared"])) for r in rows}
    group = h // kvh
    sched = make_schedule((ql,) * b, (kv,) * b, ((kv - ql) if causal else 0,) * b, group, "cpu")
    heads, block_m, wide = program_shape(sched, kvh, group, d, card)

    def probe(launches: tuple[Launch, ...]) -> list[Compiled]:
        return [
            compiled.get((heads, c.tile_n, c.num_warps, c.num_stages))
            or _compiled_sm90(wide // heads, c, triton.next_power_of_2(group), heads)
            for c in launches
        ]  # a launch the sweep did not time: compiled here for sm_90

    p = make_plan(sched, Geometry(kvh, group, d, 2, 2), card, probe, (path, name, heads, block_m),
                  heads=heads)  # fmt: skip
    chosen = (p.heads, p.launch.tile_n, p.launch.num_warps, p.launch.num_stages, p.num_splits)
    best = min(times, key=times.get)
    return Replayed(path, name, chosen, times.get(chosen, math.nan), best, times[best])


@functools.cache
def _compiled_sm90(head_pad: int, launch: Launch, group_pad: int, heads: int) -> Compiled:
    """A decode variant compiled offline for sm_90 (`tuning/registers.py`)."""
    from tuning.registers import compile_decode, resources

    r = resources(compile_decode(head_pad, launch, group_pad, heads))
    return Compiled(r["registers"], r["shared"])


def replay(paths: list[str], card: str) -> list[Replayed]:
    return [replay_shape(path, name, rows, CARDS[card])
            for path in paths for name, rows in read_sweep(path).items()]  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("sweeps", nargs="+", help="tune CSVs (python -m tuning.tune --only card ...)")
    p.add_argument("--card", default="h200", choices=sorted(CARDS))
    args = p.parse_args(argv)
    for path in args.sweeps:
        if not Path(path).is_file():
            print(f"python -m tuning.replay: no such sweep: {path}", file=sys.stderr)
            return 2
        unknown = sorted(set(read_sweep(path)) - set(SHAPES))
        if unknown:
            print(f"python -m tuning.replay: {path}: shapes not in tuning/tune.py: "
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
