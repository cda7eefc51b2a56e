"""The paged-attention launcher: validates layouts, asks the plan (`optimized/ops/plan.py`) for
tiles, launch and split count, runs `_paged_attention_kernel` (with split-K its last split
merges the partials; `fused_reduce=False` runs the separate reduce instead).

Shapes as in `optimized/kernels/paged_attention.py`.
"""

from __future__ import annotations

import functools

import torch

from optimized.kernels import cdiv, interpreting, next_power_of_2
from optimized.kernels.paged_attention import _paged_attention_kernel, _split_k_reduce_kernel
from optimized.ops import plan
from optimized.ops.plan import Launch, Option, Schedule

LOG2E = 1.4426950408889634


@functools.cache
def _unused_fp32(device: torch.device) -> torch.Tensor:
    """A stand-in for the partials when there is no split (never read or written): one per
    device, not an allocation per call."""
    return torch.empty(1, dtype=torch.float32, device=device)


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, n: int) -> torch.Tensor:
    """The fused reduce's arrival counters, one int32 per (tile, kv head), zero between launches
    (the last program of each resets its own): allocated once per device and grown in powers of
    two, never inside a CUDA-graph capture. Launches on one device share them, so they must not
    run concurrently on two streams."""
    have = _ARRIVALS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"paged_attention: {n} split-K arrival counters needed inside a CUDA-graph "
                "capture; run the shape once before capturing it"
            )
        have = torch.zeros(max(4096, next_power_of_2(n)), dtype=torch.int32, device=device)
        _ARRIVALS[device] = have
    return have


_RESIDENT: dict[tuple, int] = {}  # one entry per compiled variant
_CHOSEN = plan.Memo()


def _resident(c: Launch, variant: tuple, meta: dict, make_args) -> int:
    """Programs per SM of the kernel `c` compiles to for `variant` (device, dtype, constexprs):
    compiled once without launching, then cached."""
    key = (variant, c)
    if key not in _RESIDENT:
        device = variant[0]
        kernel = _paged_attention_kernel.warmup(
            *make_args(),
            grid=(1,),
            **meta,
            TILE_N=c.tile_n,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        if hasattr(kernel, "result"):  # compiled asynchronously
            kernel = kernel.result()
        kernel._init_handles()  # loads the binary: registers are known from here on
        props = torch.cuda.get_device_properties(device)
        _RESIDENT[key] = plan.resident_programs(
            kernel.n_regs,
            c.num_warps,
            kernel.metadata.shared,
            dict(
                regs=getattr(props, "regs_per_multiprocessor", 65536),
                smem=props.shared_memory_per_multiprocessor,
                threads=props.max_threads_per_multi_processor,
            ),
        )
    return _RESIDENT[key]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    schedule: Schedule,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    paged: bool = True,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    reduce_rows: int | None = None,
    maxnreg: int | None = None,
    fused_reduce: bool | None = None,
    heads_per_program: int | None = None,
) -> torch.Tensor:
    """Attention of packed `query` over paged (or packed, `paged=False`) K/V; returns `out`.

    query: [num_tokens, num_heads, head_size]; K/V caches as in the module docstring.
    Rows of `out` that belong to no sequence (padding) are left as they were (zeros by default).
    num_splits: None picks by occupancy; 1 disables split-K.
    reduce_rows: output rows per split-K reduce program (default on the GPU: as many as ~8k fp32
    partials allow, 1 keeps the split count padded to 32; in the interpreter a tile).
    maxnreg: a register cap per thread for the main kernel (tuning: more resident programs).
    fused_reduce: with split-K, the last split of each (tile, kv head) merges the partials in the
    main kernel (no second launch); False runs `_split_k_reduce_kernel` after it; None (default)
    fuses up to `plan.FUSED_REDUCE_MAX_SPLITS` splits, where the last program's serial merge is
    shorter than a second launch.
    heads_per_program: decode steps only (every query length 1): adjacent kv heads one program
    handles, reading each token's K/V of those heads as one contiguous run (a power of two that
    divides num_kv_heads, at most 16 // padded group rows); None lets the plan choose
    (`plan.heads_per_program`). With split-K its partials are merged in the main kernel.
    """
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError(
            f"query: expected a [num_tokens, num_heads, head_size] tensor with a "
            f"contiguous last dim, got shape {list(query.shape)}"
        )
    want_dims = 4 if paged else 3
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dim() != want_dims or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected {want_dims} dims with a contiguous last dim, "
                f"got shape {list(t.shape)}"
            )
        if t.device != query.device or t.dtype != query.dtype:
            raise ValueError(
                f"{name}: expected {query.dtype} on {query.device}, got {t.dtype} on {t.device}"
            )
        if t.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"{name}: head_size {t.shape[-1]} != query head_size {query.shape[-1]}"
            )
    if paged and (block_tables is None or block_tables.device != query.device):
        raise ValueError(
            "block_tables: expected a [num_seqs, max_blocks] tensor on the query's device"
        )
    _, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[-2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_kv_heads} does not divide num_heads={num_heads}")
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query) if out is None else out
    num_tiles = schedule.tile_seq.shape[0]
    if num_tiles == 0:
        return out
    group_pad = next_power_of_2(group)
    head_pad = max(16, next_power_of_2(head_size))
    decode = schedule.max_query_len <= 1
    heads = heads_per_program
    if heads is None:
        heads = plan.heads_per_program(num_kv_heads, group_pad, head_pad, decode)
    if heads < 1 or heads & (heads - 1) or num_kv_heads % heads or group_pad * heads > 16:
        raise ValueError(
            f"heads_per_program: expected a power of two dividing num_kv_heads={num_kv_heads} "
            f"with {group_pad} padded group rows each at most 16 rows, got {heads}"
        )
    if heads > 1 and not decode:
        raise ValueError(
            f"heads_per_program: > 1 only for decode steps, got max_query_len="
            f"{schedule.max_query_len}"
        )
    if heads > 1:  # one token per sequence: as few padded token rows as a 16-row tile allows
        block_m = max(16, group_pad * heads)
    else:
        block_m = schedule.block_q * group_pad
    wide = heads * head_pad  # columns of a K/V tile row, of acc and of the partials
    # The prefill launch (bigger K/V tiles, more stages) only for 64-row tiles of many queries;
    # 16/32-row tiles of a few queries stream K/V like decode.
    prefill = schedule.max_query_len > 1 and block_m >= 64
    smem = None if interpreting() else plan.smem_limit(query.device)
    cands = plan.launch_candidates(wide, prefill, block_m, query.element_size(), smem, heads)
    if tile_n or num_warps or num_stages or maxnreg:  # an explicit launch (tuning, tests)
        d = cands[0]
        cands = (Launch(tile_n or d.tile_n, num_warps or d.num_warps, num_stages or d.num_stages),)
    num_programs = num_tiles * (num_kv_heads // heads)

    def splits_for(c: Launch) -> tuple[int, int]:
        kv_tiles = cdiv(max(schedule.max_kv_len, 1), c.tile_n)
        n = num_splits or plan.choose_num_splits(num_programs, kv_tiles, query.device, wide)
        return max(1, min(n, kv_tiles)), kv_tiles

    fp32 = query.dtype == torch.float32
    window = (sliding_window or 0) if causal else 0
    block_size = key_cache.shape[1] if paged else 1
    bt = block_tables if paged else schedule.kv_lens  # any int tensor when unused
    meta = dict(
        BLOCK_M=block_m,
        GROUP_PAD=group_pad,
        HEAD_PAD=head_pad,
        EVEN_D=head_size == head_pad,
        PAGED=paged,
        POW2_BLOCK=block_size & (block_size - 1) == 0,
        CAUSAL=causal,
        WINDOW=window > 0,
        # The interpreter computes bf16 tl.dot on raw bits (triton issue 11584): upcast there.
        UPCAST_DOT=interpreting() and query.dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products (no TF32): the fp32 tolerance assumes it.
        DOT_PRECISION="ieee" if fp32 else "tf32",
        HEADS=heads,
    )

    def kernel_args(
        splits: int, tiles_per_split: int, part_m, part_l, part_acc, arrivals, fuse=False
    ) -> tuple:
        return (
            out,
            query,
            key_cache,
            value_cache,
            bt,
            schedule.tile_seq,
            schedule.tile_q_first,
            schedule.query_start_loc,
            schedule.query_lens,
            schedule.kv_lens,
            schedule.context_lens,
            schedule.kv_start_loc,
            part_m,
            part_l,
            part_acc,
            arrivals,
            scale * LOG2E,
            window,
            block_size,
            block_size.bit_length() - 1,
            splits,
            tiles_per_split,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            key_cache.stride(0) if paged else 0,
            key_cache.stride(-3),
            key_cache.stride(-2),
            value_cache.stride(0) if paged else 0,
            value_cache.stride(-3),
            value_cache.stride(-2),
            bt.stride(0),
            group,
            head_size,
            int(fuse),
        )

    if interpreting():  # no registers to read: the split rule alone
        cfg = cands[0]
        num_splits, num_kv_tiles = splits_for(cfg)
    else:
        # Launch by occupancy: each candidate's registers and shared memory as compiled, with its
        # split count and without, scored by how the grid fills the GPU (`launch_score`).
        # Memoized per K/V-length bucket (the choice costs ~70 µs of host time; reports/results/
        # h100/tune.txt): the first shape of a bucket decides for the bucket.
        variant = (query.device, query.dtype, tuple(meta.items()))
        key = (variant, cands, num_programs, plan.kv_tile_bucket(schedule.max_kv_len), num_splits)
        choice = _CHOSEN.get(key)
        if choice is None:
            unused = _unused_fp32(query.device)
            unused_i32 = _arrivals(query.device, 1)
            tile_bytes = 2 * wide * query.element_size()
            options = []
            for c in cands:
                auto, _ = splits_for(c)
                make_args = lambda s=auto: kernel_args(s, 1, unused, unused, unused, unused_i32)
                resident = _resident(c, variant, meta, make_args)
                for s in (auto, 1) if num_splits is None and auto > 1 else (auto,):
                    options.append(Option(c, s, resident, num_programs * s, c.tile_n * tile_bytes))
            best = options[plan.pick_launch(options, plan._num_sms(query.device))]
            choice = _CHOSEN.put(key, (best.launch, best.splits))
        cfg, num_splits = choice
        num_kv_tiles = cdiv(max(schedule.max_kv_len, 1), cfg.tile_n)
        num_splits = max(1, min(num_splits, num_kv_tiles))  # a shorter shape of the same bucket
    tiles_per_split = cdiv(num_kv_tiles, num_splits)
    if num_splits > 1:
        part_rows = num_programs * num_splits * block_m
        part_m = torch.empty(part_rows, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(part_rows, wide, dtype=torch.float32, device=query.device)
    else:  # unused; fp32 like the real partials, so both cases share one compiled kernel
        part_m = part_l = part_acc = _unused_fp32(query.device)
    if fused_reduce is None:
        fused_reduce = num_splits <= plan.FUSED_REDUCE_MAX_SPLITS
    # The separate reduce reads one head's columns per row: several heads merge in the kernel.
    fused_reduce = (fused_reduce or heads > 1) and num_splits > 1
    arrivals = _arrivals(query.device, num_programs if fused_reduce else 1)
    grid = (num_tiles, num_kv_heads // heads, num_splits)
    _paged_attention_kernel[grid](
        *kernel_args(num_splits, tiles_per_split, part_m, part_l, part_acc, arrivals, fused_reduce),
        **meta,
        TILE_N=cfg.tile_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )
    if num_splits > 1 and not fused_reduce:
        splits_pad = next_power_of_2(num_splits)
        if interpreting():
            rows = reduce_rows or block_m
        else:
            # As many rows per program as fit ~8k fp32 partials of `acc` (64 registers a thread),
            # up to a whole tile, not one row per program (tune.txt, "Behind the code").
            rows = reduce_rows or max(1, min(block_m, 8192 // (splits_pad * head_pad)))
            if rows == 1:  # one padded split count for all: one compile per head size
                splits_pad = max(splits_pad, plan.MAX_AUTO_SPLITS)
        if block_m % rows:
            raise ValueError(f"reduce_rows: expected a divisor of {block_m}, got {rows}")
        _split_k_reduce_kernel[(num_tiles, num_kv_heads, block_m // rows)](
            out,
            schedule.tile_seq,
            schedule.tile_q_first,
            schedule.query_start_loc,
            schedule.query_lens,
            part_m,
            part_l,
            part_acc,
            num_splits,
            out.stride(0),
            out.stride(1),
            group,
            group_pad,
            block_m,
            head_size,
            HEAD_PAD=head_pad,
            SPLITS_PAD=splits_pad,
            ROWS=rows,
        )
    return out
