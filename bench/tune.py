"""Sweeps that picked the launch parameters of our kernels (GPU), and the shapes `ncu` profiles.

    python -m bench tune [--only decode splits cache chunk]
    python -m bench profile          (each default kernel once: run it under ncu)

`decode`: tile size × warps × stages, then split counts, on decode shapes with many programs;
`splits`: split-K counts on long contexts with few programs; `cache`: tokens per program × warps
of the cache write; `chunk`: the prefill tile. Their output picked `launch_config` and
`choose_num_splits` in optimized/kernels/paged_attention.py and `TOKENS_PER_PROGRAM` in
reshape_and_cache.py. (An earlier sweep also tried CUDA-core products on one row per program for
MHA decode instead of 16-row tl.dot tiles: 1.5-2.5x slower on every shape, so it is gone.)
"""

from __future__ import annotations

import functools
import itertools

import torch

from bench.gpu import _paged_kv, median_ms
from optimized.kernels.paged_attention import make_schedule, paged_attention
from optimized.kernels.reshape_and_cache import reshape_and_cache

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


def _setup(b, kv, h, kvh, d, bs, ql, causal):
    kc, vc, tables = _paged_kv(b, kv, kvh, d, bs, torch.bfloat16)
    q = torch.randn(b * ql, h, d, device="cuda", dtype=torch.bfloat16)
    ctx = kv - ql if causal else 0
    sched = make_schedule((ql,) * b, (kv,) * b, (ctx,) * b, h // kvh, "cuda")
    run = functools.partial(paged_attention, q, kc, vc, tables, sched, causal=causal, scale=d**-0.5)
    return run, 2 * b * kv * kvh * d * 2


def _report(name: str, results: list, nbytes: int, top: int = 3) -> None:
    results.sort(key=lambda r: r[0])
    for ms, cfg in results[:top]:
        print(f"{name:26s} {cfg} {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def _report_default(name: str, run, nbytes: int) -> None:
    ms = median_ms(run)
    print(f"{name:26s} default {ms:.4f} ms {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def _sweep(run, configs) -> list:
    results = []
    for cfg in configs:
        try:
            results.append((median_ms(functools.partial(run, **cfg)), cfg))
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


SECTIONS = {"decode": tune_decode, "splits": tune_splits, "cache": tune_cache, "chunk": tune_chunk}


def main(only: list[str] | None = None) -> int:
    for name, fn in SECTIONS.items():
        if not only or name in only:
            print(f"# {name}", flush=True)
            fn()
    return 0


# The shapes below the targets in the H100 grid (reports/results/h100/bench.csv).
WEAK = [
    DECODE[0],  # Whisper self decode B64: 72% of copy
    ("t5-cross-b64-bs16", 64, 512, 32, 32, 64, 16, 1, False),  # 74-76%
    ("mha-d64-b16-c4k-bs16", 16, 4096, 32, 32, 64, 16, 1, True),  # 78%
    ("gqa8-b16-c4k-bs16", 16, 4096, 32, 4, 128, 16, 1, True),  # 65%
    ("whisper-crossprefill-b64-q4", 64, 1500, 20, 20, 64, 16, 4, False),  # 74%
    SPLITS[0],
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
