"""Sweeps that picked the launch parameters of our kernels (GPU), and the shapes `ncu` profiles.

    python -m tuning.tune [--only decode splits cache chunk short weak d64 host few fused heads
                                 card tiny stages paging]
    python -m tuning.tune profile   (each default kernel once: run it under ncu)

`decode`: tile size × warps × stages, then split counts, on decode shapes with many programs;
`splits`: split-K counts on long contexts with few programs; `cache`: tokens per program × warps
of the cache write; `chunk`: the prefill tile; `short`: the query tile of a few queries (cross
prefill, short chunks); `weak`: register caps, splits and stages on the decode shapes below the
H100 targets; `d64`: small-tile launches on the named models' decode shapes; `host`: host time
per call of the default and an explicit launch; `few`: splits and tiles for short contexts with
few programs, timed from CUDA graphs; `fused`: the split-K merge in the main kernel against the
separate reduce launch (kernel time); `heads`: adjacent kv heads per decode program; `card`:
every heads × launch × split count on the grid's short decode shapes, as CSV with each
variant's resident programs, to fit a card's launch rule offline (`in_flight_saturates`); `tiny`:
the same on grids far under one wave, down to one K/V tile a split; `stages`: the same with
five-stage launches on small grids; `paging`: what the block
table and the L2 flush cost (our kernel paged and packed, SDPA, a copy) and register caps. Their
output picked `launch_candidates` and `choose_num_splits` in optimized/ops/plan.py and
`TOKENS_PER_PROGRAM` in optimized/ops/reshape_and_cache.py. (An earlier sweep also tried
CUDA-core products on one row per program for MHA decode instead of 16-row tl.dot tiles:
1.5-2.5x slower on every shape, so it is gone.)
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton

from bench.harness import graph_ms, median_ms
from optimized.kernels.paged_attention import _paged_attention_kernel
from optimized.ops.paged_attention import paged_attention
from optimized.ops.plan import Launch, make_schedule
from optimized.ops.reshape_and_cache import reshape_and_cache

# name, batch, kv_len, heads, kv_heads, head_size, block_size, query_len, causal
DECODE = [
    ("whisper-self-b64-bs16", 64, 448, 20, 20, 64, 16, 1, True),
    ("whisper-self-b64-bs256", 64, 448, 20, 20, 64, 256, 1, True),
    ("whisper-cross-b64-bs16", 64, 1500, 20, 20, 64, 16, 1, False),
    ("mha-d64-b256-c1k-bs256", 256, 1024, 32, 32, 64, 256, 1, True),
    ("mha-d128-b64-c4k-bs16", 64, 4096, 32, 32, 128, 16, 1, True),
    ("mha-d128-b4-c32k-bs256", 4, 32768, 32, 32, 128, 256, 1, True),
    ("gqa2-d128-b64-c4k-bs16", 64, 4096, 32, 16, 128, 16, 1, True),
]
SPLITS = [
    ("gqa8-b4-c32k-bs16", 4, 32768, 32, 4, 128, 16, 1, True),
    ("gqa8-b4-c32k-bs256", 4, 32768, 32, 4, 128, 256, 1, True),
    ("gqa4-b4-c32k-bs16", 4, 32768, 32, 8, 128, 16, 1, True),
    ("gqa8-b16-c16k-bs256", 16, 16384, 32, 4, 128, 256, 1, True),
]
CHUNK = [("chunk-gqa4-d128", 8, 4608, 32, 8, 128, 16, 512, True)]


def _paged_kv(batch, kv_len, num_kv_heads, head_size, block_size, dtype):
    """A shuffled paged cache holding `batch` sequences of `kv_len` tokens, and their tables."""
    per_seq = triton.cdiv(kv_len, block_size)
    shape = (batch * per_seq, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    tables = torch.randperm(batch * per_seq, device="cuda", generator=g).view(batch, per_seq)
    return key_cache, value_cache, tables.to(torch.int32)


def _setup(b, kv, h, kvh, d, bs, ql, causal, block_q=None):
    kc, vc, tables = _paged_kv(b, kv, kvh, d, bs, torch.bfloat16)
    q = torch.randn(b * ql, h, d, device="cuda", dtype=torch.bfloat16)
    ctx = kv - ql if causal else 0
    sched = make_schedule((ql,) * b, (kv,) * b, (ctx,) * b, h // kvh, "cuda", block_q=block_q)
    # The output preallocated, as the grid bench has it: without, every call (and captured
    # graph) also zeroes a fresh output. The committed tune-*.csv sweeps were timed with that
    # zeroing: the same few µs on every launch of a shape, so their rankings stand.
    run = functools.partial(paged_attention, q, kc, vc, tables, sched, causal=causal,
                            scale=d**-0.5, out=torch.empty_like(q))  # fmt: skip
    return run, 2 * b * kv * kvh * d * 2


def _registers(run) -> str:
    """Registers (and spills) per thread of the main kernel `run` launches: the in-memory kernel
    cache is dropped first, so the launch loads exactly one variant (from Triton's disk cache)."""
    _paged_attention_kernel.device_caches.clear()
    run()
    kernels = [k for c in _paged_attention_kernel.device_caches.values() for k in c[0].values()]
    return ",".join(_describe(k) for k in kernels)


def _describe(kernel) -> str:
    """`<registers>r[+<spills>sp] <tile_n>/<warps>/<stages>` of one compiled variant."""
    try:
        tile = kernel.src.constants[(kernel.src.fn.arg_names.index("TILE_N"),)]
    except Exception:
        tile = "?"
    spills = f"+{kernel.n_spills}sp" if kernel.n_spills else ""
    md = kernel.metadata
    return f"{kernel.n_regs}r{spills} {tile}/{md.num_warps}/{md.num_stages}"


def _report(name: str, results: list, nbytes: int, top: int = 3) -> None:
    results.sort(key=lambda r: r[0])
    for ms, cfg, regs in results[:top]:
        print(f"{name:26s} {cfg} {regs} {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def _report_default(name: str, run, nbytes: int, measure=median_ms) -> None:
    regs = _registers(run)
    ms = measure(run)
    print(f"{name:26s} default {regs} {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def _overrides(cfg: dict) -> dict:
    """A sweep's config as `paged_attention` overrides: tile/warps/stages make the plan's Launch,
    heads_per_program its heads; everything else passes as is."""
    cfg = dict(cfg)
    parts = [cfg.pop(k, None) for k in ("tile_n", "num_warps", "num_stages")]
    if any(p is not None for p in parts):
        t, w, st = parts
        cfg["launch"] = Launch(t or 64, w or 4, st or 2)
    if "heads_per_program" in cfg:
        cfg["heads"] = cfg.pop("heads_per_program")
    return cfg


def _sweep(run, configs, measure=median_ms) -> list:
    results = []
    for cfg in configs:
        try:
            fn = functools.partial(
                run, **(_overrides(cfg) if getattr(run, "func", None) is paged_attention else cfg)
            )
            regs = _registers(fn)
            results.append((measure(fn), cfg, regs))
        except Exception as e:
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}")
    return results


def tune_decode() -> None:
    for name, *shape in DECODE:
        run, nbytes = _setup(*shape)
        configs = [
            dict(tile_n=t, num_warps=w, num_stages=s)
            for t, w, s in itertools.product((16, 32, 64), (2, 4), (2, 3))
        ]
        _report(name, _sweep(run, configs), nbytes)
        _report(name, _sweep(run, [dict(num_splits=n) for n in (1, 2, 4)]), nbytes)
        _report_default(name, run, nbytes)


def tune_splits() -> None:
    for name, *shape in SPLITS:
        run, nbytes = _setup(*shape)
        configs = [
            dict(num_splits=n, tile_n=t, num_stages=s, num_warps=4)
            for n, t, s in itertools.product((8, 16, 32, 64), (32, 64), (2, 3))
        ]
        _report(name, _sweep(run, configs), nbytes, top=5)
        _report_default(name, run, nbytes)


def tune_chunk() -> None:
    for name, *shape in CHUNK:
        run, nbytes = _setup(*shape)
        configs = [
            dict(tile_n=t, num_warps=w, num_stages=s)
            for t, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
        ]
        _report(name, _sweep(run, configs), nbytes)


def _cache_setup(num_tokens, kv_heads=8, head_size=128, block_size=16):
    key = torch.randn(num_tokens, kv_heads, head_size, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    num_blocks = -(-num_tokens // block_size) * 2
    kc = torch.empty(num_blocks, block_size, kv_heads, head_size, device="cuda", dtype=key.dtype)
    vc = torch.empty_like(kc)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    run = functools.partial(reshape_and_cache, key, value, kc, vc, slots)
    return run, 4 * key.numel() * key.element_size()


def tune_cache() -> None:
    for n in (8192, 32768):
        run, nbytes = _cache_setup(n)
        configs = [
            dict(tokens_per_program=t, num_warps=w)
            for t, w in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8))
        ]
        _report(f"cache-write-{n}", _sweep(run, configs), nbytes, top=5)
        _report_default(f"cache-write-{n}", run, nbytes)
        src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        ms = median_ms(functools.partial(dst.copy_, src))
        print(f"copy of the same bytes        {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s")


# Candidate launches for small tiles (16/32 rows): tile_n, warps, stages.
LAUNCHES = [
    dict(tile_n=t, num_warps=w, num_stages=st)
    for t, w, st in (
        (16, 1, 2),
        (32, 1, 2),
        (32, 1, 3),
        (32, 2, 2),
        (32, 2, 3),
        (64, 2, 2),
        (64, 2, 3),
        (64, 4, 2),
    )
]

# Decode with head size 64 on the named model shapes: one launch for all?
D64 = [
    (f"{m}-{kind}-b{b}-bs16", b, kv, h, h, 64, 16, 1, kind == "self")
    for m, h, enc, dec in (
        ("whisper", 20, 1500, 448),
        ("bart", 16, 1024, 1024),
        ("t5", 32, 512, 512),
    )
    for kind, kv in (("cross", enc), ("self", dec))
    for b in (64, 256)
] + [("mha-d64-b16-c4k-bs16", 16, 4096, 32, 32, 64, 16, 1, True)]


def tune_d64() -> None:
    for name, *shape in D64:
        run, nbytes = _setup(*shape)
        _report_default(name, run, nbytes)
        _report(name, _sweep(run, LAUNCHES), nbytes, top=len(LAUNCHES))


# A few decoder tokens against the whole encoder (cross prefill), and short causal chunks.
SHORT = [
    ("whisper-crossprefill-b64-q4", 64, 1500, 20, 20, 64, 16, 4, False),
    ("t5-crossprefill-b64-q4", 64, 512, 32, 32, 64, 16, 4, False),
    ("whisper-crossprefill-b64-q16", 64, 1500, 20, 20, 64, 16, 16, False),
    ("gqa4-chunk-b16-q8-c4k", 16, 4096, 32, 8, 128, 16, 8, True),
    ("mha-chunk-b16-q32-c4k", 16, 4096, 32, 32, 128, 16, 32, True),
    ("mha-d64-chunk-b16-q32-c4k", 16, 4096, 32, 32, 64, 16, 32, True),
    ("bart-crossprefill-b64-q4", 64, 1024, 16, 16, 64, 16, 4, False),
    ("whisper-crossprefill-b256-q4", 256, 1500, 20, 20, 64, 16, 4, False),
]


def tune_short() -> None:
    """The query tile for short queries: the old 64-row prefill tile (default launch) against
    the rows the longest query needs (16/32) over decode-like and prefill-like launches."""
    for name, *shape in SHORT:
        old_block_q = max(1, 64 // triton.next_power_of_2(shape[2] // shape[3]))
        run, nbytes = _setup(*shape, block_q=old_block_q)
        _report_default(f"{name} 64-row", run, nbytes)
        run, nbytes = _setup(*shape)
        _report_default(name, run, nbytes)
        _report(name, _sweep(run, LAUNCHES), nbytes, top=len(LAUNCHES))


# Decode shapes below the targets: register caps (more resident programs), splits, stages.
WEAK_DECODE = [
    ("whisper-self-b64-bs16", 64, 448, 20, 20, 64, 16, 1, True),
    ("t5-cross-b64-bs16", 64, 512, 32, 32, 64, 16, 1, False),
    ("t5-cross-b64-bs256", 64, 512, 32, 32, 64, 256, 1, False),
    ("mha-d64-b16-c4k-bs16", 16, 4096, 32, 32, 64, 16, 1, True),
    ("gqa4-b16-c4k-bs16", 16, 4096, 32, 8, 128, 16, 1, True),
    ("gqa8-b16-c4k-bs16", 16, 4096, 32, 4, 128, 16, 1, True),
    ("gqa8-b4-c32k-bs256", 4, 32768, 32, 4, 128, 256, 1, True),
]


def tune_weak() -> None:
    for name, *shape in WEAK_DECODE:
        run, nbytes = _setup(*shape)
        _report_default(name, run, nbytes)
        _report(name, _sweep(run, [dict(maxnreg=r) for r in (56, 64, 72, 80, 96)]), nbytes)
        _report(name, _sweep(run, [dict(num_splits=n) for n in (1, 2, 4, 8, 16, 32)]), nbytes, 4)
        configs = [
            dict(tile_n=t, num_warps=w, num_stages=st)
            for t, w, st in itertools.product((16, 32, 64), (1, 2, 4), (2, 3, 4))
        ]
        _report(name, _sweep(run, configs), nbytes, top=4)


# Short contexts with few programs (GQA at batch 16/64, 1k tokens; d64 at batch 16): split count
# × K/V tile × warps, timed from CUDA graphs (kernel time; do_bench is host-bound below ~150 µs).
FEW = [
    ("gqa8-b16-c1k", 16, 1024, 32, 4, 128, 16, 1, True),
    ("gqa4-b16-c1k", 16, 1024, 32, 8, 128, 16, 1, True),
    ("gqa8-b64-c1k", 64, 1024, 32, 4, 128, 16, 1, True),
    ("gqa8-b16-c4k", 16, 4096, 32, 4, 128, 16, 1, True),
    ("mha-d64-b16-c1k", 16, 1024, 32, 32, 64, 16, 1, True),
    ("mha-d64-b16-c4k", 16, 4096, 32, 32, 64, 16, 1, True),
]


def tune_few() -> None:
    for name, *shape in FEW:
        run, nbytes = _setup(*shape)
        _report_default(name, run, nbytes, measure=graph_ms)
        configs = [
            dict(num_splits=n, tile_n=t, num_warps=w, num_stages=2)
            for n, t, w in itertools.product((1, 2, 4, 8, 16, 32), (16, 32, 64), (2, 4))
        ]
        _report(name, _sweep(run, configs, measure=graph_ms), nbytes, top=6)


def tune_fused() -> None:
    """The split-K merge in the main kernel (its last split) against the separate reduce
    launch, with the default launch choice and with the splits the sweeps found best; kernel
    time from CUDA graphs."""
    for name, *shape in FEW + SPLITS + WEAK[1:3]:
        run, nbytes = _setup(*shape)
        configs = [
            dict(fused_reduce=f, **extra)
            for extra in ({}, dict(num_splits=8), dict(num_splits=16))
            for f in (True, False)
        ]
        for ms, cfg, regs in _sweep(run, configs, measure=graph_ms):
            print(f"{name:26s} {cfg} {regs} {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


# Decode shapes of the grid's model rows (MHA, head size 64) for `heads`.
MODEL_DECODE = [
    ("whisper-cross-b64-bs16", 64, 1500, 20, 20, 64, 16, 1, False),
    ("bart-self-b64-bs16", 64, 1024, 16, 16, 64, 16, 1, True),
    ("t5xl-self-b256-bs16", 256, 512, 32, 32, 64, 16, 1, True),
    ("mha-d64-b64-c1k-bs16", 64, 1024, 32, 32, 64, 16, 1, True),
    ("mha-d128-b64-c1k-bs16", 64, 1024, 32, 32, 128, 16, 1, True),
    ("gqa4-b64-c4k-bs16", 64, 4096, 32, 8, 128, 16, 1, True),
]


def tune_heads() -> None:
    """Adjacent kv heads per decode program (each token's K/V of those heads one contiguous run,
    fewer programs), default launch choice and a 32-token tile; kernel time from CUDA graphs."""
    seen = set()
    for name, *shape in FEW + WEAK + DECODE + MODEL_DECODE:
        if tuple(shape) in seen:
            continue
        seen.add(tuple(shape))
        run, nbytes = _setup(*shape)
        h, kvh, d = shape[2:5]
        group_pad = triton.next_power_of_2(h // kvh)
        counts = [n for n in (1, 2, 4, 8) if kvh % n == 0 and n * group_pad <= 16 and n * d <= 512]
        configs = [dict(heads_per_program=n) for n in counts]
        configs += [dict(heads_per_program=n, tile_n=32, num_warps=4) for n in counts if n > 1]
        for ms, cfg, regs in _sweep(run, configs, measure=graph_ms):
            print(f"{name:26s} {cfg} {regs} {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def tune_host() -> None:
    """Host time per call (a grid so small that the GPU waits on the host): the default launch
    (memoized choice among candidates) against an explicit one."""
    import time

    for name, *shape in (
        ("tiny-d64-decode", 1, 64, 4, 4, 64, 16, 1, True),
        ("tiny-d128-decode", 1, 64, 4, 4, 128, 16, 1, True),
    ):
        run, _ = _setup(*shape)
        for label, kw in (("default", {}), ("explicit", dict(tile_n=32, num_warps=2))):
            fn = functools.partial(run, **_overrides(kw))
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(500):
                fn()
            torch.cuda.synchronize()
            us = (time.perf_counter() - start) / 500 * 1e6
            print(f"{name:26s} {label:8s} {us:.1f} us per call", flush=True)


# Decode shapes of the grid and the models (bf16, page 16) for `card`: the rows a card's launch
# choice left behind SDPA on contiguous K/V, and rows it did not (a new rule must not cost them).
CARD = [
    (f"{kind}-b{b}-c{c}", b, c, h, kvh, d, 16, 1, causal)
    for kind, h, kvh, d, causal, shapes in (
        (
            "mha-d64",
            32,
            32,
            64,
            True,
            ((16, 1024), (16, 4096), (16, 16384), (64, 1024), (4, 32768)),
        ),
        ("gqa8", 32, 4, 128, True, ((16, 1024), (16, 4096), (64, 1024), (64, 4096), (4, 32768))),
        ("gqa4", 32, 8, 128, True, ((16, 1024), (16, 4096), (64, 1024), (64, 4096), (16, 16384))),
        ("mha-d128", 32, 32, 128, True, ((16, 1024), (64, 4096), (4, 32768))),
        ("t5xl-cross", 32, 32, 64, False, ((64, 512), (256, 512))),
        ("whisper-cross", 20, 20, 64, False, ((64, 1500), (256, 1500))),
        ("whisper-self", 20, 20, 64, True, ((64, 448), (256, 448))),
        ("bart-self", 16, 16, 64, True, ((64, 1024),)),
    )
    for b, c in shapes
]
CARD_LAUNCHES = [
    (16, 1, 2),
    (32, 2, 2),
    (64, 2, 2),
    (32, 4, 2),
    (64, 4, 2),
    (128, 4, 2),
    (64, 4, 3),
    (32, 4, 5),
    (128, 4, 5),
]


def tune_card() -> None:
    """Every heads × launch × split count on the `CARD` shapes, kernel time from CUDA graphs,
    as CSV: with each variant's registers, shared memory and resident programs (what the
    occupancy model sees), so a card's launch rule can be fitted offline. `default` rows are
    the plan the current rule makes."""
    _occupancy_sweep(CARD, (1, 2, 4, 8, 16), min_tiles=4)


# Grids far under one wave (`tiny`): batch 1 and 16 decode of the models, small-batch GQA, and
# cross prefill of 4 tokens at batch 16, where the model bench saw forced splits win.
TINY = [
    (f"{name}-b{b}", b, c, h, kvh, d, 16, ql, causal)
    for name, c, h, kvh, d, ql, causal, batches in (
        ("whisper-self", 448, 20, 20, 64, 1, True, (1, 16)),
        ("whisper-cross", 1500, 20, 20, 64, 1, False, (1, 16)),
        ("bart-self", 1024, 16, 16, 64, 1, True, (1, 16)),
        ("whisper-xprefill", 1500, 20, 20, 64, 4, False, (16,)),
        ("bart-xprefill", 1024, 16, 16, 64, 4, False, (16,)),
        ("gqa8-c1k", 1024, 32, 4, 128, 1, True, (1, 16)),
        ("gqa4-c1k", 1024, 32, 8, 128, 1, True, (16,)),
        ("gqa8-c4k", 4096, 32, 4, 128, 1, True, (16,)),
        ("gqa4-c4k", 4096, 32, 8, 128, 1, True, (16,)),
        ("mha-d128-c4k", 4096, 32, 32, 128, 1, True, (1,)),
    )
    for b in batches
]


def tune_tiny() -> None:
    """`card`'s sweep on the `TINY` shapes, with split counts down to one K/V tile a split."""
    _occupancy_sweep(TINY, (1, 2, 3, 4, 6, 8, 12, 16, 32), min_tiles=1)


# Small decode grids for `stages`: five-stage launches (two K/V tiles a program) against the
# single-buffered ones (reports/results/h200/tune-stages.csv.gz: `DOUBLE_BUFFERS` in plan.py).
STAGES = [
    (f"{kind}-b{b}-c{c // 1024}k", b, c, h, kvh, d, 16, 1, True)
    for kind, h, kvh, d, shapes in (
        ("gqa8", 32, 4, 128, ((16, 1024), (16, 4096), (64, 1024), (64, 4096))),
        ("gqa4", 32, 8, 128, ((16, 1024), (16, 4096), (64, 1024))),
        ("mha-d64", 32, 32, 64, ((16, 1024), (64, 1024))),
        ("mha-d128", 32, 32, 128, ((16, 1024),)),
    )
    for b, c in shapes
] + [("whisper-self-b64", 64, 448, 20, 20, 64, 16, 1, True)]
STAGE_LAUNCHES = [(64, 4, 2), (64, 4, 3), (64, 4, 5), (32, 4, 2), (32, 4, 5), (32, 2, 5),
                  (16, 1, 5), (128, 4, 5), (64, 2, 5)]  # fmt: skip


def tune_stages() -> None:
    """`card`'s sweep on the `STAGES` shapes with five-stage launches (`STAGE_LAUNCHES`)."""
    _occupancy_sweep(STAGES, (1, 2, 4, 8, 16), min_tiles=1, launches=STAGE_LAUNCHES)


def _occupancy_sweep(shapes, split_counts, min_tiles: int, launches=None) -> None:
    from optimized.ops.paged_attention import plan_attention
    from optimized.ops.plan import Compiled, card_of

    card = card_of(torch.device("cuda", torch.cuda.current_device()))
    print("card,shape,heads,tile_n,warps,stages,splits,programs,resident,regs,shared,ms,gbps")
    for name, *shape in shapes:
        _, kv, h, kvh, d, _, ql, causal = shape
        run, nbytes = _setup(*shape)
        kc = run.args[1]
        q, sched = run.args[0], run.args[4]
        configs = [("default", {})]
        group_pad = triton.next_power_of_2(h // kvh)
        for heads in (1, 2) if ql == 1 else (1,):
            if kvh % heads or heads * group_pad > 16 or heads * d > 256:
                continue
            for (t, w, st), n in itertools.product(launches or CARD_LAUNCHES, split_counts):
                if n > 1 and triton.cdiv(kv, t) < min_tiles * n:
                    continue
                configs.append(("sweep", dict(heads=heads, launch=Launch(t, w, st), num_splits=n)))
        for label, cfg in configs:
            try:
                plan = plan_attention(q, kc, kc, run.args[3], sched, causal=causal, **cfg)
                fn = functools.partial(run, plan=plan)  # timed exactly as reported
                why: list[str] = []
                ms = graph_ms(fn, why=why)
                if why:  # a launch that failed is a comment line with its reason, not a NaN row
                    raise RuntimeError(why[0])
                _paged_attention_kernel.device_caches.clear()
                fn()
                caches = _paged_attention_kernel.device_caches.values()
                k = next(k for c in caches for k in c[0].values())
                res = card.resident(Compiled(k.n_regs, k.metadata.shared), plan.launch.num_warps)
                programs = sched.tile_seq.shape[0] * (kvh // plan.heads) * plan.num_splits
                L = plan.launch
                print(
                    f"{label},{name},{plan.heads},{L.tile_n},{L.num_warps},{L.num_stages},"
                    f"{plan.num_splits},{programs},{res},{k.n_regs},{k.metadata.shared},"
                    f"{ms:.5f},{nbytes / ms / 1e6:.0f}",
                    flush=True,
                )
            except Exception as e:
                print(f"# {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)


def tune_paging() -> None:
    """What paging and the L2 flush cost on the short decode shapes (`FEW`, plus two full
    grids), kernel time from CUDA graphs: our kernel on the paged cache, the same kernel on
    the same tokens packed contiguously (no block table), SDPA on contiguous K/V, and a copy
    of the same bytes, each after do_bench's flush (256 MB written: L2 left dirty) and after a
    read of 256 MB (L2 left clean); and our launch with register caps (a fifth program an SM
    for the d128 variants), as CSV; first the floor (`-,floor`: a one-element kernel)."""
    print("shape,what,flush,us,gbps")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = [("mha-d64-b64-c1k", 64, 1024, 32, 32, 64, 16, 1, True),
            ("mha-d128-b64-c4k", 64, 4096, 32, 32, 128, 16, 1, True)]  # fmt: skip
    # The harness's floor: one kernel on one element, timed as every call is (a graph replay
    # between two events after the flush): what no decode step can go below.
    one = torch.zeros(1, device="cuda")
    for flush in ("zero", "read"):
        print(f"-,floor,{flush},{graph_ms(lambda: one.add_(1), flush=flush) * 1e3:.2f},0")
    for name, b, kv, h, kvh, d, bs, ql, causal in [*FEW, *full]:
        run, nbytes = _setup(b, kv, h, kvh, d, bs, ql, causal)
        q, sched = run.args[0], run.args[4]
        packed = [torch.randn(b * kv, kvh, d, device="cuda", dtype=torch.bfloat16) for _ in "kv"]
        dense = [torch.randn(b, kvh, kv, d, device="cuda", dtype=torch.bfloat16) for _ in "kv"]
        src = torch.empty(nbytes // 2, dtype=torch.int8, device="cuda")  # the copy reads half
        calls = [  # and writes half of the K/V bytes
            ("ours", run),
            ("ours-packed", functools.partial(paged_attention, q, *packed, None, sched,
                                              causal=causal, scale=d**-0.5, paged=False,
                                              out=torch.empty_like(q))),
            ("sdpa-contiguous", functools.partial(sdpa, q.view(b, h, 1, d), *dense,
                                                  enable_gqa=True)),
            ("copy", functools.partial(torch.empty_like(src).copy_, src)),
            *[(f"ours-maxnreg{r}", functools.partial(run, maxnreg=r)) for r in (96, 80)],
        ]  # fmt: skip
        for what, fn in calls:
            for flush in ("zero", "read"):
                why: list[str] = []
                us = graph_ms(fn, flush=flush, why=why) * 1e3
                print(f"{name},{what},{flush},{us:.2f},{nbytes / us / 1e3:.0f}", flush=True)
                if why:  # NaN above: say why (the packed call once failed to launch unseen)
                    print(f"# {name} {what} {flush}: {why[0]}", flush=True)


SECTIONS = {
    "decode": tune_decode,
    "splits": tune_splits,
    "cache": tune_cache,
    "chunk": tune_chunk,
    "short": tune_short,
    "weak": tune_weak,
    "d64": tune_d64,
    "host": tune_host,
    "few": tune_few,
    "fused": tune_fused,
    "heads": tune_heads,
    "card": tune_card,
    "tiny": tune_tiny,
    "stages": tune_stages,
    "paging": tune_paging,
}


def main(only: list[str] | None = None) -> int:
    for name, fn in SECTIONS.items():
        if not only or name in only:
            print(f"# {name}", flush=True)
            fn()
    return 0


# Shapes of the H100 grid (reports/results/h100/bench.csv.gz) below the decode targets.
WEAK = [
    DECODE[0],  # Whisper self decode B64: 70-72% of copy (SDPA on contiguous K/V: 76%)
    ("gqa4-b16-c4k-bs16", 16, 4096, 32, 8, 128, 16, 1, True),  # 77% (graph)
    ("gqa8-b16-c4k-bs16", 16, 4096, 32, 4, 128, 16, 1, True),  # 65%
    SPLITS[0],  # GQA 8:1, batch 4, 32k: 80%
    ("gqa8-b16-c1k-bs256", 16, 1024, 32, 4, 128, 256, 1, True),  # 15% behind xFormers split-K
    ("mha-d128-b4-c32k-bs256", 4, 32768, 32, 32, 128, 256, 1, True),  # 2.8% behind it
    # Below SDPA on contiguous K/V: small-batch GQA at 1k, cross decode.
    ("gqa8-b16-c1k-bs16", 16, 1024, 32, 4, 128, 16, 1, True),
    ("gqa4-b16-c1k-bs16", 16, 1024, 32, 8, 128, 16, 1, True),
    ("whisper-cross-b256-bs16", 256, 1500, 20, 20, 64, 16, 1, False),
    ("t5xl-cross-b256-bs16", 256, 512, 32, 32, 64, 16, 1, False),
]


def profile() -> int:
    """Each weak-spot shape once with the default launch, plus a copy of the same bytes, for
    `ncu --clock-control none -k regex:'paged|reshape|split_k|copy'` to read counters from."""
    for name, *shape in WEAK:
        run, nbytes = _setup(*shape)
        run()
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        torch.empty_like(src).copy_(src)
        print(f"profiled {name}", flush=True)
    run, nbytes = _cache_setup(8192)
    run()
    torch.cuda.synchronize()
    print("profiled cache-write-8192")
    return 0


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if args[:1] == ["profile"]:
        raise SystemExit(profile())
    raise SystemExit(main(args[1:] if args[:1] == ["--only"] else args))
