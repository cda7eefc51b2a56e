"""Sweep the paged kernel's tile size, warps, stages and split-K on representative shapes (GPU).
Its output picked `launch_config` and `choose_num_splits` in optimized/kernels/paged_attention.py.
"""

from __future__ import annotations

import functools
import itertools

import torch

from bench.gpu import _paged_kv, median_ms
from optimized.kernels.paged_attention import make_schedule, paged_attention

SHAPES = [  # name, batch, kv_len, heads, kv_heads, head_size, block_size, query_len, causal
    ("decode-mha-d64", 64, 1500, 20, 20, 64, 16, 1, False),
    ("decode-whisper-self", 64, 448, 20, 20, 64, 16, 1, True),
    ("decode-gqa4-d128", 64, 4096, 32, 8, 128, 16, 1, True),
    ("decode-gqa8-d128-bs256", 16, 16384, 32, 4, 128, 256, 1, True),
    ("decode-gqa8-b4-c32k", 4, 32768, 32, 4, 128, 16, 1, True),
    ("chunk-gqa4-d128", 8, 4608, 32, 8, 128, 16, 512, True),
]


def main() -> int:
    for name, b, kv, h, kvh, d, bs, ql, causal in SHAPES:
        kc, vc, tables = _paged_kv(b, kv, kvh, d, bs, torch.bfloat16)
        q = torch.randn(b * ql, h, d, device="cuda", dtype=torch.bfloat16)
        ctx = kv - ql if causal else 0
        sched = make_schedule((ql,) * b, (kv,) * b, (ctx,) * b, h // kvh, "cuda")
        nbytes = 2 * b * kv * kvh * d * 2
        run = functools.partial(
            paged_attention, q, kc, vc, tables, sched, causal=causal, scale=d**-0.5
        )
        results = []
        for tile_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3)):
            cfg = dict(tile_n=tile_n, num_warps=warps, num_stages=stages)
            try:
                results.append((median_ms(functools.partial(run, **cfg)), cfg))
            except Exception as e:
                print(f"{name} {cfg}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        for ms, cfg in results[:3]:
            print(f"{name:24s} {cfg} {ms:.3f} ms {nbytes / ms / 1e6:.0f} GB/s")
        print(f"{name:24s} default {median_ms(run):.3f} ms")
        if ql == 1:  # split-K: the occupancy rule (None) against fixed splits
            for splits in (None, 1, 8, 16, 32, 64):
                ms = median_ms(functools.partial(run, num_splits=splits))
                print(f"{name:24s} num_splits={splits} {ms:.3f} ms {nbytes / ms / 1e6:.0f} GB/s")
    return 0
