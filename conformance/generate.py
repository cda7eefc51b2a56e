"""The matrix, generated: all-pairs covering of the axes (allpairspy, invalid combinations
filtered by rule) plus explicit edge cases, per tier; and the pair-coverage measure.

Tiers:
- smoke:      small shapes, every valid pair of axis values covered; CPU/CI (interpreter).
- full:       small and large shapes (≥ 2k-token sequences), all pairs covered under several
              seeds (each seed a different covering), for the GPU.
- exhaustive: the full cross product of a chosen sub-space (kind × phase × block size × dtype ×
              layout), for nightly runs.
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections import OrderedDict

from allpairspy import AllPairs

from conformance.cases import AXES, PAIRWISE_SIZES, Case, invalid_reasons
from conformance.models import get_model, model_names

TIERS = ("smoke", "full", "exhaustive")
# Pairwise seeds of the full tier: each seed covers every valid pair once more (`list --tier
# full` counts the cases). The environment variable makes a larger run (a nightly) without a
# code change.
FULL_SEEDS = int(os.environ.get("CONFORMANCE_FULL_SEEDS", "16"))
# Seeds of the full tier whose covering includes strided caches: a kernel that assumes dense
# caches fails on any of them, so two coverings (not sixteen) hold the tier's time.
STRIDES_SEEDS = 2


# Most values first: allpairspy builds rows greedily in axis order and covers more that way.
PAIRWISE_ORDER = (
    "block_size",
    "layout",
    "batch",
    "head_size",
    "phase",
    "kind",
    "heads",
    "dtype",
    "window",
    "scale",
    "size",
)


FILL_ORDER = (
    "kind",
    "phase",
    "batch",
    "layout",
    "window",
    "block_size",
    "heads",
    "head_size",
    "dtype",
    "scale",
    "size",
)


# Axes covered after the others, by completion only: the covering of the other axes stays what
# it was before they existed (their cases, ids and baselines unchanged). Their cases are filled,
# among values that cover as many new pairs, with the cheapest (`CHEAPER`: fewer tokens, heads,
# head columns to run; unlisted values cost the same).
LATER_AXES = ("position_bias", "cache_strides")  # each completed in turn, in this order
CHEAPER = {
    "block_size": (1, 8, 16, 32, 64, 128, 256),  # ragged lengths grow with the page
    "heads": ("h4kv4", "h8kv1", "h8kv2", "h32kv8"),
    "head_size": (64, 80, 96, 128, 256),
    "phase": ("decode", "mixed", "chunked", "prefill", "episode"),
    "batch": ("single", "enc_longer", "many_short", "uniform", "enc_shorter", "ragged", "few_long"),
}


def _pairwise(
    axes: dict[str, tuple], fixed: dict, seed: int, later: tuple = LATER_AXES
) -> list[Case]:
    """allpairspy's covering, then a greedy completion for the few valid pairs its filtered
    search leaves out, so every valid pair is covered; pairs of `later` (of LATER_AXES) last
    (the others keep their defaults)."""
    names = [n for n in PAIRWISE_ORDER if n in axes]
    # A different value order per seed gives a different covering of the same pairs.
    rotated = OrderedDict((n, _rotate(axes[n], seed + i)) for i, n in enumerate(names))

    def ok(row) -> bool:
        return not invalid_reasons({**fixed, **dict(zip(names, row))})

    cases = [
        Case(**fixed, **dict(zip(names, row)), seed=seed)
        for row in AllPairs(list(rotated.values()), filter_func=ok)
    ]
    first = {k: v for k, v in axes.items() if k not in LATER_AXES}
    cases = _complete(cases, first, fixed, seed, rotated, names)
    for k, axis in enumerate(LATER_AXES):  # earlier axes' cases keep their ids
        if axis in later:
            upto = {a: v for a, v in axes.items() if a not in LATER_AXES[k + 1 :]}
            cases = _complete(cases, upto, fixed, seed, rotated, names, only=(axis,))
    return cases


def _complete(cases, axes, fixed, seed, rotated, names, only=()) -> list[Case]:
    """`cases` plus a case for each valid pair of `axes` they miss (with `only`: pairs with
    one of those axes), its other axes filled the most constrained first: valid, covering the
    most pairs not yet covered."""
    covered = covered_pairs(cases, axes)
    missing = [
        p for p in valid_pairs(axes, fixed) - covered if not only or {p[0], p[2]} & set(only)
    ]
    for pair in sorted(missing, key=str):
        if pair in covered:
            continue
        a, x, b, y = pair
        row = {a: x, b: y}
        for n in sorted(names, key=FILL_ORDER.index):
            if n in row:
                continue
            options = [val for val in rotated[n] if not invalid_reasons({**fixed, **row, n: val})]
            row[n] = max(options, key=lambda val: _gain(row, n, val, covered, bool(only)))
        case = Case(**fixed, **row, seed=seed)
        cases.append(case)
        covered |= covered_pairs([case], axes)
    return cases


def _gain(row: dict, n: str, val, covered: set, cheap_first: bool) -> tuple:
    """(new pairs `row` would cover with n = val, and with `cheap_first` how cheap val is)."""
    new = sum((m, row[m], n, val) not in covered and (n, val, m, row[m]) not in covered
              for m in row)  # fmt: skip
    return new, -CHEAPER[n].index(val) if cheap_first and n in CHEAPER else 0


def _rotate(values: tuple, k: int) -> list:
    k %= len(values)
    return list(values[k:] + values[:k])


EDGE_CASES = [
    # the block arithmetic at its limits
    dict(
        kind="decoder",
        phase="decode",
        batch="ragged",
        block_size=1,
        heads="h8kv1",
        head_size=64,
        dtype="float16",
        layout="shuffled",
    ),
    dict(
        kind="decoder",
        phase="chunked",
        batch="ragged",
        block_size=256,
        heads="h8kv2",
        head_size=96,
        dtype="bfloat16",
        layout="highest",
        window="on",
    ),
    dict(
        kind="cross",
        phase="decode",
        batch="single",
        block_size=256,
        heads="h4kv4",
        head_size=128,
        dtype="float32",
        layout="nullblock",
    ),
    dict(
        kind="decoder",
        phase="mixed",
        batch="ragged",
        block_size=8,
        heads="h32kv8",
        head_size=80,
        dtype="float16",
        layout="fragmented",
        window="on",
    ),
    dict(
        kind="cross",
        phase="mixed",
        batch="enc_longer",
        block_size=16,
        heads="h8kv2",
        head_size=64,
        dtype="bfloat16",
        layout="interleaved",
    ),
    dict(
        kind="episode",
        phase="episode",
        batch="enc_shorter",
        block_size=16,
        heads="h8kv2",
        head_size=64,
        dtype="float16",
        layout="interleaved",
    ),
    dict(
        kind="decoder",
        phase="decode",
        batch="many_short",
        block_size=16,
        heads="h4kv4",
        head_size=256,
        dtype="float32",
        layout="shared",
    ),
    dict(
        kind="encoder",
        phase="prefill",
        batch="ragged",
        block_size=16,
        heads="h8kv1",
        head_size=80,
        dtype="bfloat16",
        layout="contiguous",
    ),
]


# Paths the GPU takes that small shapes never reach: one sequence of 8,203 tokens in 1,026
# blocks of 8 (32 split-K splits even under the interpreter, whose launch model assumes 4 SMs),
# two of 2,200 and 4,100 tokens (16 splits), a cross cache of 2,055 one-token blocks. Few heads
# and a small head size keep them cheap on the CPU.
LONG_EDGE_CASES = [
    dict(
        kind="decoder",
        phase="decode",
        batch="single",
        block_size=8,
        heads="h8kv1",
        head_size=64,
        dtype="float16",
        layout="shuffled",
        size="long",
    ),
    dict(
        kind="decoder",
        phase="decode",
        batch="few_long",
        block_size=16,
        heads="h8kv1",
        head_size=64,
        dtype="bfloat16",
        layout="fragmented",
        size="long",
    ),
    dict(
        kind="cross",
        phase="decode",
        batch="single",
        block_size=1,
        heads="h4kv4",
        head_size=64,
        dtype="float32",
        layout="nullblock",
        size="long",
    ),
]


def _fp8(kind, phase, batch, block_size, heads, head_size, dtype, layout, kv, scale, **more):
    return dict(kind=kind, phase=phase, batch=batch, block_size=block_size, heads=heads,
                head_size=head_size, dtype=dtype, layout=layout, kv_cache_dtype=kv,
                kv_scale=scale, **more)  # fmt: skip


# T5's bias on a decoder prefill of its own (episodes hold one too): lengths past the bf16
# bucket boundaries at 16 and 32.
BIAS_EDGE_CASES = [
    dict(kind="decoder", phase="prefill", batch="few_long", block_size=16, heads="h8kv2",
         head_size=64, dtype="bfloat16", layout="shuffled", position_bias="t5"),
]  # fmt: skip


# fp8 caches on every kind x phase that has a cache, both formats, mostly per-head scales on
# GQA geometries (a scale indexed by query head instead of kv head shows there); the pairwise
# covering adds per-tensor ones across the other axes.
FP8_EDGE_CASES = [
    _fp8(
        "decoder", "prefill", "ragged", 16, "h8kv2", 64, "bfloat16", "shuffled", "fp8_e5m2", "head"
    ),
    _fp8(
        "decoder", "decode", "ragged", 8, "h8kv2", 128, "float16", "fragmented", "fp8_e4m3", "head"
    ),
    _fp8(
        "decoder", "mixed", "ragged", 32, "h32kv8", 64, "bfloat16", "nullblock", "fp8_e5m2", "head"
    ),
    _fp8(
        "decoder",
        "chunked",
        "ragged",
        16,
        "h8kv2",
        80,
        "float32",
        "shuffled",
        "fp8_e4m3",
        "head",
        window="on",
    ),
    _fp8(
        "cross",
        "prefill",
        "enc_longer",
        16,
        "h8kv2",
        64,
        "float16",
        "interleaved",
        "fp8_e4m3",
        "head",
    ),
    _fp8("cross", "decode", "ragged", 16, "h8kv2", 96, "bfloat16", "shuffled", "fp8_e4m3", "head"),
    _fp8(
        "cross",
        "mixed",
        "enc_longer",
        8,
        "h8kv2",
        64,
        "bfloat16",
        "interleaved",
        "fp8_e5m2",
        "head",
    ),
    _fp8(
        "cross", "chunked", "ragged", 64, "h4kv4", 128, "float32", "highest", "fp8_e5m2", "tensor"
    ),
    _fp8(
        "episode",
        "episode",
        "enc_shorter",
        16,
        "h8kv2",
        64,
        "bfloat16",
        "interleaved",
        "fp8_e4m3",
        "head",
    ),
]


MODEL_FULL_SEEDS = 1  # pairwise coverings per model in the full tier


def model_space(tier: str, model: str) -> tuple[dict[str, tuple], dict]:
    """(axes that vary, fixed values) of the cases around `model`: its geometry, scale and dtype
    fixed; kind, phase, batch shape, block size, layout (and the window where the model has
    one) swept; smoke at 1/SMOKE_SCALE of its lengths, full at its real lengths."""
    preset = get_model(model)
    fixed = dict(
        model=preset.name,
        heads=preset.heads,
        head_size=preset.head_size,
        dtype=preset.dtype,
        scale="default",
        size="small" if tier == "smoke" else "large",
        cache_strides="contiguous",  # the tiers cover strided caches
    )
    axes = {k: v for k, v in AXES.items() if k not in fixed}
    axes["window"] = ("off", "on") if preset.sliding_window else ("off",)
    return axes, fixed


def generate_for_models(tier: str, spec: str) -> list[Case]:
    """`--model NAME|all`: the cases around each model, sorted by id."""
    if tier not in ("smoke", "full"):
        raise ValueError(f"--tier: --model takes smoke or full, got {tier!r}")
    found = []
    for name in model_names(spec):
        axes, fixed = model_space(tier, name)
        seeds = 1 if tier == "smoke" else MODEL_FULL_SEEDS
        found += [c for seed in range(seeds) for c in _pairwise(axes, fixed, seed)]
    return sorted({c.id: c for c in found}.values(), key=lambda c: c.id)


def generate(tier: str) -> list[Case]:
    """The cases of a tier, sorted by id, deterministic."""
    if tier not in TIERS:
        raise ValueError(f"--tier: expected one of {TIERS}, got {tier!r}")
    cases: dict[str, Case] = {}
    if tier == "smoke":
        small = {k: v for k, v in AXES.items() if k != "size"}
        found = _pairwise(small, {"size": "small"}, seed=0)
        found += [
            Case(**e) for e in EDGE_CASES + FP8_EDGE_CASES + LONG_EDGE_CASES + BIAS_EDGE_CASES
        ]
    elif tier == "full":
        axes = {**AXES, "size": PAIRWISE_SIZES}
        found = [
            c
            for s in range(FULL_SEEDS)
            for c in _pairwise(axes, {}, s, LATER_AXES if s < STRIDES_SEEDS else ("position_bias",))
        ]
        edges = EDGE_CASES + FP8_EDGE_CASES + BIAS_EDGE_CASES
        found += [Case(**e, size=size) for e in edges for size in PAIRWISE_SIZES]
        found += [Case(**e) for e in LONG_EDGE_CASES]
    else:
        sub = ("kind", "phase", "block_size", "dtype", "layout")
        found = []
        for values in itertools.product(*(AXES[a] for a in sub)):
            row = dict(zip(sub, values), batch="ragged", heads="h8kv2", head_size=64)
            if row["kind"] == "episode":
                row["batch"] = "enc_longer"
            if not invalid_reasons(row):
                found.append(Case(**row))
    for c in found:
        cases.setdefault(c.id, c)
    return sorted(cases.values(), key=lambda c: c.id)


def shard(cases: list[Case], spec: str | None) -> list[Case]:
    """`i/n` (1-based): a deterministic slice by a stable hash of the id."""
    if not spec:
        return cases
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 1 <= i <= n:
        raise ValueError(f"--shard: expected i/n with 1 <= i <= n, got {spec!r}")
    return [c for c in cases if zlib.crc32(c.id.encode()) % n == i - 1]


def valid_pairs(axes: dict[str, tuple] = AXES, fixed: dict | None = None) -> set[tuple]:
    """Every (axis, value, axis, value) pair that some valid case can hold."""
    fixed = fixed or {}
    names = [n for n in axes if n not in fixed]
    pairs = set()
    for a, b in itertools.combinations(names, 2):
        for x in axes[a]:
            for y in axes[b]:
                if not invalid_reasons({**fixed, a: x, b: y}):
                    pairs.add((a, x, b, y))
    return pairs


def covered_pairs(cases: list[Case], axes: dict[str, tuple] = AXES) -> set[tuple]:
    pairs = set()
    names = list(axes)
    for c in cases:
        for a, b in itertools.combinations(names, 2):
            pairs.add((a, getattr(c, a), b, getattr(c, b)))
    return pairs


def coverage(tier: str, cases: list[Case], model: str | None = None) -> tuple[int, int]:
    """(valid axis-value pairs covered by `cases`, valid pairs of the tier's space); with
    `model` (NAME or all), of the space around each model, summed."""
    if model:
        got = want = 0
        for name in model_names(model):
            axes, fixed = model_space(tier, name)
            mine = [c for c in cases if c.model == name]
            pairs = valid_pairs(axes, fixed)
            got += len(pairs & covered_pairs(mine, axes))
            want += len(pairs)
        return got, want
    if tier == "smoke":
        axes, fixed = {k: v for k, v in AXES.items() if k != "size"}, {"size": "small"}
    else:
        axes, fixed = {**AXES, "size": PAIRWISE_SIZES}, {}
    want = valid_pairs(axes, fixed)
    return len(want & covered_pairs(cases, axes)), len(want)
