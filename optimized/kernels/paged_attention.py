"""Paged attention for any query length per sequence, with an optional split-K (flash-decoding).

One kernel family covers every attention step of the testbed:
- decode (1 query token), chunked prefill (a chunk on top of cached context) and full prefill;
- causal self-attention with optional sliding window, non-causal cross-attention, and
  non-paged (contiguous packed K/V, the encoder) by a constexpr;
- GQA/MQA: the query heads of one kv head are packed into the rows of one tile, so each K/V
  tile is loaded once per kv head;
- any block size (1..256) and head sizes that are not powers of two (80, 96), by masking.

Shapes:
    query:                   [num_tokens, num_heads, head_size]
    key_cache, value_cache:  [num_blocks, block_size, num_kv_heads, head_size]   (PAGED)
                             or packed [num_kv_tokens, num_kv_heads, head_size]  (not PAGED)
    block_tables:            [num_seqs, max_blocks_per_seq]
    out:                     [num_tokens, num_heads, head_size]

A program handles BLOCK_Q query tokens × all `group` query heads of one kv head of one sequence:
BLOCK_M = BLOCK_Q * GROUP_PAD rows, row = token * GROUP_PAD + head-in-group. It walks that
sequence's visible K/V in tiles of TILE_N tokens, translating each position through the block
table, so it never reads a slot its sequence does not own. Online softmax in fp32 (exp2), fp32
accumulation. With split-K (num_splits > 1) each program handles a contiguous range of kv tiles
and writes (m, l, acc) partials; `_split_k_reduce_kernel` merges them (one output row per
program on the GPU).

Compiles vs speed: what shapes the inner loop is a constexpr (dtype, BLOCK_M, GROUP_PAD, padded
head size, power-of-two head size, TILE_N, paged, power-of-two block size, causal, window).
Block size, split count, group, head size and window length are runtime arguments, so one
compiled kernel serves every block size and split count; the reduce takes the group and row
count at runtime too. (With causal, window and the group's padding also at runtime the 16-seed
full tier compiled ~4x fewer variants and ran in 4.7 instead of 6.1 min, but prefill lost
20-40% and GQA decode ~16% on the H100.)

Launch choice (GPU): a program holds as many query rows as the longest query needs (16 at decode,
16/32 for a few cross-prefill tokens, 64 for long queries). For 16/32-row tiles several launches
(K/V tile × warps) are compiled; each one's registers and shared memory, as Triton reports them,
give the programs an SM holds, and `launch_score` picks launch and split count by how the grid
fills the last wave and how many K/V bytes it keeps in flight per SM (`pick_launch`, memoized
per shape). The interpreter has one launch and the occupancy split rule.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from optimized.kernels import cdiv, interpreting, next_power_of_2

LOG2E = 1.4426950408889634


# Per-call integers that only steer loops and addresses are not specialized (Triton would compile
# a variant for each value that is 1 or a multiple of 16); strides of K/V/Q stay specialized,
# their alignment is what lets loads vectorize.
@triton.jit(
    do_not_specialize=[
        "sliding_window",
        "block_size",
        "block_shift",
        "num_splits",
        "kv_tiles_per_split",
        "stride_bt_seq",
        "group",
        "head_size",
    ]
)
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    tile_seq_ptr,
    tile_q_first_ptr,
    query_start_loc_ptr,
    query_lens_ptr,
    kv_lens_ptr,
    context_lens_ptr,
    kv_start_loc_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    scale_log2,
    sliding_window,
    block_size,
    block_shift,
    num_splits,
    kv_tiles_per_split,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_bt_seq,
    group,
    head_size,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGED: tl.constexpr,
    POW2_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q_first = tl.load(tile_q_first_ptr + tile)
    q_len = tl.load(query_lens_ptr + seq)
    kv_len = tl.load(kv_lens_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_valid = (q_idx < q_len) & (g < group)
    head = kv_head * group + g
    d = tl.arange(0, HEAD_PAD)
    if EVEN_D:  # a power-of-two head size: no mask along d, so loads vectorize
        d_valid = d < HEAD_PAD
    else:
        d_valid = d < head_size
    q_offs = (q_start + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    pos = context + q_idx  # absolute position of each row's query token (causal only)

    # The K/V range this tile can see: causal stops at its last query, a window starts late.
    kv_end = kv_len
    kv_begin = 0
    if CAUSAL:
        kv_end = tl.minimum(context + tl.minimum(q_first + BLOCK_Q, q_len), kv_len)
        if WINDOW:
            kv_begin = tl.maximum(context + q_first - sliding_window + 1, 0)
    # Split s walks tiles [s * per_split, (s + 1) * per_split) of the range (one split: all).
    t_begin = kv_begin // TILE_N + split * kv_tiles_per_split
    t_end = tl.minimum(t_begin + kv_tiles_per_split, tl.cdiv(kv_end, TILE_N))

    if PAGED:
        kv_start = 0
    else:
        kv_start = tl.load(kv_start_loc_ptr + seq).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for t in range(t_begin, t_end):
        n = t * TILE_N + tl.arange(0, TILE_N)
        n_valid = n < kv_end
        if PAGED:
            if POW2_BLOCK:  # shifts, not integer divisions, for every position of the tile
                logical, offset = n >> block_shift, n & (block_size - 1)
            else:
                logical, offset = n // block_size, n % block_size
            block = tl.load(
                block_tables_ptr + seq * stride_bt_seq + logical, mask=n_valid, other=0
            ).to(tl.int64)
            k_row = block * stride_kc_block + offset * stride_kc_tok
            v_row = block * stride_vc_block + offset * stride_vc_tok
        else:
            k_row = (kv_start + n) * stride_kc_tok
            v_row = (kv_start + n) * stride_vc_tok
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(
            key_cache_ptr + k_row[:, None] + kv_head * stride_kc_head + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            value_cache_ptr + v_row[:, None] + kv_head * stride_vc_head + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # Masks as constexprs: the compares on every score cost prefill ~20-40% when they were
        # runtime flags (H100 bench: chunked prefill 154 -> 94 TFLOP/s).
        visible = n_valid[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= pos[:, None])
            if WINDOW:
                visible = visible & (n[None, :] > pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if num_splits == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = (
            (q_start + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
        )
        tl.store(
            out_ptr + o_offs,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )
    else:
        part = ((tile * tl.num_programs(1) + kv_head) * num_splits + split).to(tl.int64) * BLOCK_M
        tl.store(part_m_ptr + part + rows, m_i)
        tl.store(part_l_ptr + part + rows, l_i)
        tl.store(part_acc_ptr + (part + rows)[:, None] * HEAD_PAD + d[None, :], acc)


@triton.jit(do_not_specialize=["num_splits", "group", "group_pad", "block_m", "head_size"])
def _split_k_reduce_kernel(
    out_ptr,
    tile_seq_ptr,
    tile_q_first_ptr,
    query_start_loc_ptr,
    query_lens_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    group,
    group_pad,
    block_m,
    head_size,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Merge the partials of ROWS output rows: out = Σ_s 2^(m_s - m) acc_s / Σ_s 2^(m_s - m) l_s.

    Every split of the ROWS rows loaded at once (a program per tile that walked the splits one
    after another took 44 µs of a 140 µs decode step at 32 splits): on the GPU ROWS × SPLITS_PAD
    × HEAD_PAD stays ~8k elements; the interpreter takes a whole tile per program (it pays per
    program, not per element)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    q_idx = tl.load(tile_q_first_ptr + tile) + r // group_pad
    g = r % group_pad
    row_valid = (q_idx < tl.load(query_lens_ptr + seq)) & (g < group)  # padding rows: no output
    s = tl.arange(0, SPLITS_PAD)
    part = ((tile * tl.num_programs(1) + kv_head) * num_splits + s).to(tl.int64)
    off = part[None, :] * block_m + r[:, None]  # [ROWS, SPLITS_PAD]
    mask = row_valid[:, None] & (s < num_splits)[None, :]
    m_s = tl.load(part_m_ptr + off, mask=mask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + off, mask=mask, other=0.0)
    d = tl.arange(0, HEAD_PAD)
    acc_s = tl.load(
        part_acc_ptr + off[:, :, None] * HEAD_PAD + d[None, None, :],
        mask=mask[:, :, None],
        other=0.0,
    )
    m = tl.max(m_s, 1)
    w = tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # empty splits weigh 0
    l_sum = tl.sum(w * l_s, 1)
    out = tl.sum(w[:, :, None] * acc_s, 1) / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    head = kv_head * group + g
    o_offs = (q_start + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
    tl.store(
        out_ptr + o_offs,
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (d < head_size)[None, :],
    )


@dataclass(frozen=True, eq=False)
class Schedule:
    """Device tensors describing one step's tiles; build once per step, reuse across layers.

    tile_seq, tile_q_first: [num_tiles] sequence and first query index of each program
    query_start_loc:        [num_seqs + 1] offsets of each sequence's queries
    query_lens, kv_lens, context_lens: [num_seqs]
    kv_start_loc:           [num_seqs + 1] offsets of packed K/V (non-paged only)
    """

    tile_seq: torch.Tensor
    tile_q_first: torch.Tensor
    query_start_loc: torch.Tensor
    query_lens: torch.Tensor
    kv_lens: torch.Tensor
    context_lens: torch.Tensor
    kv_start_loc: torch.Tensor
    block_q: int
    max_query_len: int
    max_kv_len: int


def block_q_for(max_query_len: int, group: int) -> int:
    """Query tokens per program. A tile has tokens × padded group rows: as few as hold the longest
    query, at least 16 (tl.dot) and at most 64. Decode: 16 rows (measured on the H200: CUDA-core
    products on one row per program were 1.5-2.5x slower at MHA decode); a few cross-prefill
    tokens: 16 or 32, not a 64-row tile of mostly padding (ncu, H100, Whisper cross prefill of 4
    tokens: 148 registers, 3 programs per SM, 68.6% of DRAM peak); long queries: 64."""
    group_pad = next_power_of_2(group)
    rows = min(64, max(16, next_power_of_2(max(max_query_len, 1)) * group_pad))
    return max(1, rows // group_pad)


def make_schedule(
    query_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    context_lens: tuple[int, ...],
    group: int,
    device: torch.device | str,
    block_q: int | None = None,
) -> Schedule:
    """Tile every sequence's queries into programs of `block_q` tokens (host-side, once).
    block_q: None picks `block_q_for`; a power of two overrides it (tuning, tests)."""
    block_q = block_q or block_q_for(max(query_lens, default=1), group)
    if block_q & (block_q - 1):
        raise ValueError(f"block_q: expected a power of two, got {block_q}")
    tiles = [(i, q0) for i, n in enumerate(query_lens) for q0 in range(0, n, block_q)]
    as_t = lambda xs: torch.tensor(list(xs), dtype=torch.int32, device=device)
    starts, kv_starts = [0], [0]
    for n, m in zip(query_lens, kv_lens):
        starts.append(starts[-1] + n)
        kv_starts.append(kv_starts[-1] + m)
    return Schedule(
        tile_seq=as_t(t[0] for t in tiles),
        tile_q_first=as_t(t[1] for t in tiles),
        query_start_loc=as_t(starts),
        query_lens=as_t(query_lens),
        kv_lens=as_t(kv_lens),
        context_lens=as_t(context_lens),
        kv_start_loc=as_t(kv_starts),
        block_q=block_q,
        max_query_len=max(query_lens, default=0),
        max_kv_len=max(kv_lens, default=0),
    )


# Shared memory one program may take on the H100/H200 (sm_90: 227 KB per block, opt-in).
SMEM_LIMIT_BYTES = 232_448


def smem_bytes(block_m: int, tile_n: int, head_pad: int, elem_bytes: int, num_stages: int) -> int:
    """Shared memory Triton 3.6 allocates for this kernel: the Q tile, (stages - 1) buffered
    K and V tiles, and the fp32 P tile. Fits the one figure Triton reported (fp32, d256, 64 rows,
    tile 64, 3 stages: 344,320 bytes) exactly."""
    kv = 2 * tile_n * head_pad * elem_bytes * max(num_stages - 1, 1)
    return block_m * head_pad * elem_bytes + kv + block_m * tile_n * 4 + 256


@dataclass(frozen=True)
class Launch:
    """One launch of the main kernel: K/V tile, warps, pipeline stages. `weight`: its throughput
    per resident program relative to the first candidate, when both fit the grid in one wave."""

    tile_n: int
    num_warps: int
    num_stages: int
    weight: float = 1.0


def _fit_smem(cfg: Launch, block_m: int, head_pad: int, elem_bytes: int) -> Launch:
    """Fewer stages, then smaller K/V tiles, until the program fits shared memory."""
    fits = lambda c: (
        smem_bytes(block_m, c.tile_n, head_pad, elem_bytes, c.num_stages) <= SMEM_LIMIT_BYTES
    )
    while not fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while not fits(cfg) and cfg.tile_n > 16:
        cfg = replace(cfg, tile_n=cfg.tile_n // 2)
    return cfg


def launch_candidates(
    head_pad: int, prefill: bool, block_m: int = 64, elem_bytes: int = 2
) -> tuple[Launch, ...]:
    """The launches `pick_launch` chooses from; the first is the default. The interpreter wants
    few, small tiles; on the GPU these come from the sweeps in `bench/tune.py` (H100, bf16),
    shrunk to fit shared memory: fp32 with head size 256 at prefill asked for 344 KB and failed
    to launch (found by the full conformance tier on the H100)."""
    if interpreting():
        return (Launch(16, 4, 1),)
    return _gpu_launch_candidates(head_pad, prefill, block_m, elem_bytes)


@functools.cache
def _gpu_launch_candidates(
    head_pad: int, prefill: bool, block_m: int, elem_bytes: int
) -> tuple[Launch, ...]:
    if prefill:
        cands = [Launch(64, 4, 3)]
    elif head_pad <= 64:
        # H100, Triton 3.6: 32/2/2 holds 10-12 programs per SM (80-92 registers), 64/2/2 eight
        # (119-121), 16/1/2 twenty-one (93) but streams ~5% slower per program. Which is fastest
        # depends on how the grid fills the last wave (T5 cross decode B64, 2,048 programs:
        # 2,164 / 2,357 / 2,381 GB/s; BART self B256: 2,537 / 2,713 / 2,679).
        cands = [Launch(32, 2, 2), Launch(64, 2, 2), Launch(16, 1, 2, weight=0.95)]
    elif head_pad <= 128 and block_m >= 32:
        # 32-row tiles (a few queries × a GQA group): 2 warps (H100: GQA 4:1 chunk of 8 tokens
        # 1,732 -> 2,037 GB/s; 4 warps held 158 registers).
        cands = [Launch(32, 2, 2)]
    else:
        # Two stages, not three: 64 KB of K/V tiles per program lets a fourth program onto an
        # SM (ncu, H200: three stages held 3 programs/SM, 1.29 waves at 512 programs; 1.4x slower).
        cands = [Launch(64, 4, 2)]
    out = []
    for c in cands:
        c = _fit_smem(c, block_m, head_pad, elem_bytes)
        if c not in out:
            out.append(c)
    return tuple(out)


def resident_programs(
    n_regs: int, num_warps: int, shared: int, props: dict[str, int] | None = None
) -> int:
    """Programs of one compiled kernel an SM holds at once (CUDA occupancy: registers are
    allocated per warp in units of 256, shared memory per block plus 1 KB the runtime reserves).
    Matches ncu on the H100: 92 registers × 2 warps → 10, 111 × 4 → 4, 80 × 2 → 12."""
    p = props or {}
    regs_per_sm = p.get("regs", 65536)
    smem_per_sm = p.get("smem", 233_472)
    threads_per_sm = p.get("threads", 2048)
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_smem = smem_per_sm // (shared + 1024) if shared else 32
    by_threads = threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, 32))


def wave_efficiency(num_programs: int, slots: int) -> float:
    """How much of the GPU the grid keeps busy: 1 when it fits one wave (bandwidth, not waves,
    is the limit then), else the filled fraction of its waves (1.29 waves -> 0.65)."""
    if slots <= 0:
        return 0.0
    waves = num_programs / slots
    return 1.0 if waves <= 1 else waves / math.ceil(waves)


@dataclass(frozen=True)
class Option:
    """A launch with its split count, as the occupancy model sees it.

    resident: programs of the compiled variant one SM holds; programs: the grid incl. splits;
    tile_bytes: K and V bytes one program loads per K/V tile."""

    launch: Launch
    splits: int
    resident: int
    programs: int
    tile_bytes: int


# K/V bytes in flight per SM from which more stop helping (H100, fitted to bench tune `few`: d64
# decode at batch 16 had ~32 KB per SM with 32-token tiles and ran 11% slower than with 64-token
# ones; at ~63 KB per SM the tile no longer mattered).
IN_FLIGHT_SATURATES = 48 << 10
# A split-K launch also writes partials and runs the reduce (H100: GQA 8:1, batch 64, 1k
# tokens ran 2,022 GB/s unsplit and 1,642 with the two splits the occupancy rule asked for).
SPLIT_COST = 0.95


def launch_score(o: Option, num_sms: int) -> float:
    """weight × wave efficiency × how close the loads in flight come to saturating memory,
    less the split-K overhead."""
    per_sm = min(o.programs / num_sms, o.resident)
    in_flight = per_sm * o.tile_bytes * max(o.launch.num_stages - 1, 1)
    fill = min(1.0, in_flight / IN_FLIGHT_SATURATES)
    eff = wave_efficiency(o.programs, o.resident * num_sms)
    return o.launch.weight * eff * fill * (SPLIT_COST if o.splits > 1 else 1.0)


def pick_launch(options: list[Option], num_sms: int) -> int:
    """Index of the best option by `launch_score`; ties go to the earlier (default) one."""
    scores = [launch_score(o, num_sms) for o in options]
    return max(range(len(scores)), key=lambda i: (round(scores[i], 3), -i))


MAX_AUTO_SPLITS = 32


@functools.cache
def _unused_fp32(device: torch.device) -> torch.Tensor:
    """A stand-in for the partials when there is no split (never read or written): one per
    device, not an allocation per call."""
    return torch.empty(1, dtype=torch.float32, device=device)


_RESIDENT: dict[tuple, int] = {}
_CHOSEN: dict[tuple, tuple[Launch, int]] = {}


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
        _RESIDENT[key] = resident_programs(
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


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_programs: int, num_kv_tiles: int, device: torch.device, head_pad: int = 128
) -> int:
    """Split the K/V walk only when the tiles alone cannot fill the GPU (flash-decoding).

    Target: half the programs an SM can hold. ncu on the H100: the d128 decode kernel holds 4 per
    SM (111 registers, 4 warps), the d64 one 10 (92 registers, 2 warps). For d128 that is about
    two per SM (four per SM was measured slower: 1.64 vs 2.10 TB/s at batch 4, 32k context, GQA
    8:1); d64 at batch 16 and 4k context ran 512 programs in 0.39 waves (12% occupancy) under a
    two-per-SM rule for every head size (five per SM: +5% at 4k, +12% at 16k, +17% at batch 4,
    32k)."""
    # d64 splits further only on long contexts: at 1k tokens (32 tiles) the extra partials and
    # reduce launch cost more than the occupancy brings (H100: 1,883 -> 1,618 GB/s at batch 16).
    per_sm = 5 if head_pad <= 64 and num_kv_tiles >= 64 else 2
    target = per_sm * _num_sms(device)
    if num_programs >= target or num_kv_tiles < 8:
        return 1
    # Each split still walks at least four K/V tiles.
    splits = next_power_of_2(math.ceil(target / num_programs))
    return max(1, min(splits, MAX_AUTO_SPLITS, num_kv_tiles // 4))


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
) -> torch.Tensor:
    """Attention of packed `query` over paged (or packed, `paged=False`) K/V; returns `out`.

    query: [num_tokens, num_heads, head_size]; K/V caches as in the module docstring.
    Rows of `out` that belong to no sequence (padding) are left as they were (zeros by default).
    num_splits: None picks by occupancy; 1 disables split-K.
    reduce_rows: output rows per split-K reduce program (default on the GPU: as many as ~8k fp32
    partials allow, 1 keeps the split count padded to 32; in the interpreter a tile).
    maxnreg: a register cap per thread for the main kernel (tuning: more resident programs).
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
    block_m = schedule.block_q * group_pad
    head_pad = max(16, next_power_of_2(head_size))
    # The prefill launch (bigger K/V tiles, more stages) only for 64-row tiles of many queries;
    # 16/32-row tiles of a few queries stream K/V like decode.
    prefill = schedule.max_query_len > 1 and block_m >= 64
    cands = launch_candidates(head_pad, prefill, block_m, query.element_size())
    if tile_n or num_warps or num_stages or maxnreg:  # an explicit launch (tuning, tests)
        d = cands[0]
        cands = (Launch(tile_n or d.tile_n, num_warps or d.num_warps, num_stages or d.num_stages),)
    num_programs = num_tiles * num_kv_heads

    def splits_for(c: Launch) -> tuple[int, int]:
        kv_tiles = cdiv(max(schedule.max_kv_len, 1), c.tile_n)
        n = num_splits or choose_num_splits(num_programs, kv_tiles, query.device, head_pad)
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
    )

    def kernel_args(splits: int, tiles_per_split: int, part_m, part_l, part_acc) -> tuple:
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
        )

    if interpreting():  # no registers to read: the split rule alone
        cfg = cands[0]
        num_splits, num_kv_tiles = splits_for(cfg)
    else:
        # Launch by occupancy: each candidate's registers and shared memory as compiled, with its
        # split count and without, scored by how the grid fills the GPU (`launch_score`).
        # Memoized: the choice took ~70 µs of host time per call, more than a 110 µs decode
        # kernel hides (H100, do_bench).
        variant = (query.device, query.dtype, tuple(meta.items()))
        key = (variant, cands, num_programs, schedule.max_kv_len, num_splits)
        choice = _CHOSEN.get(key)
        if choice is None:
            unused = _unused_fp32(query.device)
            tile_bytes = 2 * head_pad * query.element_size()
            options = []
            for c in cands:
                auto, _ = splits_for(c)
                make_args = lambda s=auto: kernel_args(s, 1, unused, unused, unused)
                resident = _resident(c, variant, meta, make_args)
                for s in (auto, 1) if num_splits is None and auto > 1 else (auto,):
                    options.append(Option(c, s, resident, num_programs * s, c.tile_n * tile_bytes))
            best = options[pick_launch(options, _num_sms(query.device))]
            choice = _CHOSEN[key] = (best.launch, best.splits)
        cfg, num_splits = choice
        num_kv_tiles = cdiv(max(schedule.max_kv_len, 1), cfg.tile_n)
    tiles_per_split = cdiv(num_kv_tiles, num_splits)
    if num_splits > 1:
        part_rows = num_programs * num_splits * block_m
        part_m = torch.empty(part_rows, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(part_rows, head_pad, dtype=torch.float32, device=query.device)
    else:  # unused; fp32 like the real partials, so both cases share one compiled kernel
        part_m = part_l = part_acc = _unused_fp32(query.device)
    grid = (num_tiles, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        *kernel_args(num_splits, tiles_per_split, part_m, part_l, part_acc),
        **meta,
        TILE_N=cfg.tile_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )
    if num_splits > 1:
        splits_pad = next_power_of_2(num_splits)
        if interpreting():
            rows = reduce_rows or block_m
        else:
            # As many rows per program as fit ~8k fp32 partials of `acc` (64 registers a thread),
            # up to a whole tile, instead of one row per program (ncu, H100: the row-per-program
            # reduce took 7.4-10.8 µs, 10-28% of a GQA decode step at batch 16).
            rows = reduce_rows or max(1, min(block_m, 8192 // (splits_pad * head_pad)))
            if rows == 1:  # one padded split count for all: one compile per head size
                splits_pad = max(splits_pad, MAX_AUTO_SPLITS)
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
