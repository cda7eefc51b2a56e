"""The plan of a paged-attention call, made on the host before the launch: how the step's queries
are tiled (`Schedule`), which launch (K/V tile, warps, stages) and how many split-K splits.

Launch choice (GPU): a program holds as many query rows as the longest query needs (16 at decode,
16/32 for a few cross-prefill tokens, 64 for long queries). For 16/32-row tiles several launches
(K/V tile × warps) are compiled; each one's registers and shared memory, as Triton reports them,
give the programs an SM holds and the K/V tiles each buffers, and `launch_score` picks launch
and split count by how the grid fills the last wave and how many K/V bytes it keeps in flight
per SM against what saturates this card's memory (`in_flight_saturates`: its bandwidth per
SM), an SM drawing at most its share (`pick_launch`, memoized per shape). Double-buffered
paged decode launches (`DOUBLE_BUFFERS`, `SMALL_DOUBLE_BUFFERS`: one d64 or d128 head a
program) are weighed where the grid is half to one wave of them. The split counts weighed are
the occupancy rule's, none, more while the grid fits one wave (`split_counts`), and a second
launch to merge them is charged against the step's time at the card's bandwidth. MHA d64
decode takes two heads a program unless the grid is tiny (`heads_per_program`). The
interpreter has one launch and the occupancy split rule.

The device's own limits are read from it (shared memory per block, SMs, registers); choices are
memoized per (variant, grid, K/V tiles in power-of-two buckets), in a bounded memo, so a decode
loop whose context grows by one token a step does not decide again.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from optimized.kernels import cdiv, interpreting, next_power_of_2


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
    query, at least 16 (tl.dot) and at most 64: 16 at decode, 16 or 32 for a few cross-prefill
    tokens (a 64-row tile of padding costs registers and occupancy), 64 for long queries.
    Measurements: reports/results/h100/tune.txt, "Behind the code"."""
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


@functools.cache
def smem_limit(device: torch.device) -> int:
    """Shared memory one program may take on `device` (the opt-in maximum per block; 227 KB on
    the H100/H200)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def smem_bytes(
    block_m: int,
    tile_n: int,
    head_pad: int,
    elem_bytes: int,
    num_stages: int,
    buffers: int | None = None,
) -> int:
    """Shared memory Triton 3.6 allocates for this kernel: the Q tile, `buffers` (default:
    stages - 1) buffered K and V tiles, and the fp32 P tile. Fits the one figure Triton
    reported (fp32, d256, 64 rows, tile 64, 3 stages: 344,320 bytes) exactly."""
    kv = 2 * tile_n * head_pad * elem_bytes * (buffers or max(num_stages - 1, 1))
    return block_m * head_pad * elem_bytes + kv + block_m * tile_n * 4 + 256


def decode_kv_buffers(num_stages: int) -> int:
    """K/V tiles a program of the paged decode loop holds as Triton 3.6 compiles it (sm_90):
    the block-table load is pipelined ahead of the K/V loads, so with 2-4 stages a program
    has one tile (the next one is issued only once the current one is consumed) and with 5-6
    two (the next one loads while the current one is computed on). `bench/test_registers.py`
    compiles it to check."""
    return 1 if num_stages < 5 else 2


def compiled_kv_buffers(
    shared: int, block_m: int, wide: int, elem_bytes: int, tile_n: int, kv_elem_bytes: int
) -> int:
    """K/V tiles a compiled program buffers, from its shared memory (`shared`, bytes): what is
    left after the Q tile, in whole K+V tiles (the block-table and P tiles are small)."""
    tile = 2 * tile_n * wide * kv_elem_bytes
    return max(1, (shared - block_m * wide * elem_bytes) // tile)


@dataclass(frozen=True)
class Launch:
    """One launch of the main kernel: K/V tile, warps, pipeline stages. `weight`: its throughput
    per resident program relative to the first candidate, when both fit the grid in one wave."""

    tile_n: int
    num_warps: int
    num_stages: int
    weight: float = 1.0


def _fit_smem(
    cfg: Launch,
    block_m: int,
    head_pad: int,
    elem_bytes: int,
    limit: int,
    prefill: bool,
    paged: bool = True,
) -> Launch:
    """Fewer stages, then smaller K/V tiles, until the program fits `limit` bytes. Only the
    paged decode loop holds fewer K/V tiles than stages - 1 (`decode_kv_buffers`): packed K/V
    has no block-table load to pipeline ahead, so Triton buffers a K/V tile per stage."""

    def fits(c: Launch) -> bool:
        buffers = decode_kv_buffers(c.num_stages) if paged and not prefill else None
        return smem_bytes(block_m, c.tile_n, head_pad, elem_bytes, c.num_stages, buffers) <= limit

    while not fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while not fits(cfg) and cfg.tile_n > 16:
        cfg = replace(cfg, tile_n=cfg.tile_n // 2)
    return cfg


# Five stages: two 128-token K/V tiles a program (`decode_kv_buffers`; 190 registers, 137 KB
# of shared memory at d128: one program an SM), the next tile loading while the current one is
# computed on. Offered for decode of one d64 or d128 head a program with 16-bit queries and
# cache (what was measured), and weighed only where the grid, splits included, covers half to
# one wave of it, also with the split count that makes one wave: H200, GQA batch 16 (kernel
# time, page 16): 8:1 at 1k 24.2 -> 21.6 us (two splits), 4:1 at 1k 32.7 -> 30.0, 4:1 at 4k
# 80.3 -> 78.2 (no split), 8:1 at 4k 54.6 -> 51.0 (two splits, in the sweep); at two waves it
# lost 6-12%, on 16-32 programs 6% (reports/results/h200/tune-stages.csv,
# tune-tiny-stages.csv). One d64 head a program (the models' decode at batch 1-16, replayed on
# tune-tiny-stages.csv): Whisper self decode batch 1 13.8 -> 12.2 us, BART self decode batch 16
# 33.5 -> 31.9, Whisper cross prefill batch 16 +1.4%.
DOUBLE_BUFFERS = Launch(128, 4, 5)
# The same two buffers in 32-token tiles (96 registers, 38 KB at d128: five programs an SM),
# offered beside it and weighed on the same grids: GQA 8:1 at batch 1, 1k (4 programs, 32
# splits) 12.5 -> 11.2 us in reports/results/h200/tune-tiny-rerun.csv; elsewhere the score
# keeps its choice (`python -m bench replay` on the H200's six sweeps).
SMALL_DOUBLE_BUFFERS = Launch(32, 4, 5)


def launch_candidates(
    head_pad: int,
    prefill: bool,
    block_m: int = 64,
    elem_bytes: int = 2,
    smem: int | None = None,
    heads: int = 1,
    kv_fp8: bool = False,
    paged: bool = True,
) -> tuple[Launch, ...]:
    """The launches `pick_launch` chooses from; the first is the default. The interpreter wants
    few, small tiles; on the GPU these come from the sweeps in `bench/tune.py` (H100, bf16),
    shrunk to fit shared memory: fp32 with head size 256 at prefill asked for 344 KB and failed
    to launch (found by the full conformance tier on the H100). `head_pad` is the K/V columns
    a program reads per token: padded head size × `heads` (kv heads per program). An fp8 cache
    moves half the bytes a token: decode also gets each launch with twice the K/V tile (the same
    bytes in flight per program as the model dtype's), and the occupancy model chooses.
    `elem_bytes` is the query's element size (K/V tiles are sized as if that wide: never too
    small for shared memory). `paged`: False for packed K/V (the encoder)."""
    if interpreting():  # the interpreter pays per loop iteration, not per element: wide tiles
        return (Launch(64, 4, 1),)
    if smem is None:
        smem = smem_limit(torch.device("cuda", torch.cuda.current_device()))
    return _gpu_launch_candidates(
        head_pad, prefill, block_m, elem_bytes, smem, heads, kv_fp8, paged
    )


@functools.cache
def _gpu_launch_candidates(
    head_pad: int,
    prefill: bool,
    block_m: int,
    elem_bytes: int,
    smem: int,
    heads: int = 1,
    kv_fp8: bool = False,
    paged: bool = True,
) -> tuple[Launch, ...]:
    if prefill:
        cands = [Launch(64, 4, 3)]
    elif heads > 1:
        # Two d64 heads a program: 64-token tiles on many waves, 32-token ones (94 registers, a
        # fifth program per SM) where the grid is near one wave (tune.txt, "heads").
        cands = [Launch(64, 4, 2), Launch(32, 4, 2)]
    elif head_pad <= 64:
        # Three launches that differ in programs per SM; which is fastest depends on how the
        # grid fills the last wave, so `pick_launch` chooses (tune.txt: d64, few).
        cands = [Launch(32, 2, 2), Launch(64, 2, 2), Launch(16, 1, 2, weight=0.95)]
    elif head_pad <= 128 and block_m >= 32:
        # 32-row tiles (a few queries × a GQA group): 2 warps (4 held too many registers).
        cands = [Launch(32, 2, 2)]
    else:
        # Two stages, not three: 64 KB of K/V tiles per program lets a fourth program onto an SM.
        cands = [Launch(64, 4, 2)]
    if kv_fp8 and not prefill:
        cands += [replace(c, tile_n=2 * c.tile_n) for c in cands]
    # Double buffers for the paged decode of one d64 or d128 head a program, 16-bit, and only
    # whole: on a part with less shared memory the launch would shrink to one buffer. Not for
    # packed K/V: there five stages are four K/V tiles (270 KB at d128, over sm_90's 227 KB).
    one_head = heads == 1 and head_pad <= 128 and block_m == 16
    offered = one_head and paged and not (prefill or kv_fp8) and elem_bytes == 2
    fit = lambda: _fit_smem(DOUBLE_BUFFERS, block_m, head_pad, elem_bytes, smem, prefill)
    if offered and fit() == DOUBLE_BUFFERS:
        cands += [DOUBLE_BUFFERS, SMALL_DOUBLE_BUFFERS]
    out = []
    for c in cands:
        c = _fit_smem(c, block_m, head_pad, elem_bytes, smem, prefill, paged)
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


@functools.cache
def sm_limits(device: torch.device) -> dict[str, int]:
    """An SM's registers, shared memory and threads on `device`, as `resident_programs` takes
    them (read once per device: the probe asks for every compiled variant)."""
    props = torch.cuda.get_device_properties(device)
    return dict(
        regs=getattr(props, "regs_per_multiprocessor", 65536),
        smem=props.shared_memory_per_multiprocessor,
        threads=props.max_threads_per_multi_processor,
    )


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
    tile_bytes: K and V bytes one program loads per K/V tile; reduce_launch: its partials are
    merged by a second launch; buffers: K/V tiles a program holds as compiled."""

    launch: Launch
    splits: int
    resident: int
    programs: int
    tile_bytes: int
    reduce_launch: bool = False
    buffers: int = 1


# K/V bytes in flight per SM from which more stop helping, on the H100 SXM (fitted to
# tune.txt `few`); other cards scale it by their bandwidth per SM (`in_flight_saturates`).
IN_FLIGHT_SATURATES = 48 << 10
# The H100 SXM's memory (2,619 MHz, 5,120-bit HBM3, 132 SMs): the card that fit was made on.
H100_MEMORY = (2_619_000, 5120, 132)
# A split-K launch also writes partials and runs the reduce: a split must win by this much.
SPLIT_COST = 0.95
# And a second launch merging the partials costs about this long, whatever the step (without
# it more splits won on the score where they lost 4.6% on the H200 (GQA 8:1 b16 1k: 8 splits
# 27.0 us, 4 splits 25.8; tune-tiny.csv); with it 4k keeps 8 splits, 54.9 against 57.8).
REDUCE_LAUNCH_US = 2.0


def in_flight_saturates(memory_clock_khz: int, bus_width_bits: int, sms: int) -> int:
    """K/V bytes in flight per SM that saturate a card's memory. Little's law: at the same
    latency the bytes in flight grow with bandwidth per SM, so the H100's fit is scaled by the
    card's clock × bus width ÷ SMs against the H100's. The H200 (3,201 MHz, 6,016 bits, 132 SMs)
    gets 69 KB: its sweep wants the launches with ~124 KB in flight where 48 KB chose ~62 KB
    ones (1.26-1.37x faster at half a wave: reports/results/h200/tune-card.csv). Unknown
    figures (0) keep the H100's."""
    if min(memory_clock_khz, bus_width_bits, sms) <= 0:
        return IN_FLIGHT_SATURATES
    clock, bus, h100_sms = H100_MEMORY
    ratio = (memory_clock_khz * bus_width_bits / sms) / (clock * bus / h100_sms)
    return round(IN_FLIGHT_SATURATES * ratio)


@functools.cache
def card_memory(device: torch.device) -> tuple[int, int, int]:
    """(memory clock in kHz, bus width in bits, SMs) of `device`; the H100 SXM's figures where
    it is not a GPU, or torch does not say."""
    if device.type != "cuda":
        return H100_MEMORY
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0) or H100_MEMORY[0]
    bus = getattr(props, "memory_bus_width", 0) or H100_MEMORY[1]
    return clock, bus, props.multi_processor_count


def card_bandwidth(device: torch.device) -> float:
    """Peak memory bandwidth of `device` in bytes per µs (double data rate × bus width)."""
    clock, bus, _ = card_memory(device)
    return clock * 1e3 * bus / 8 * 2 / 1e6


def card_in_flight(device: torch.device) -> int:
    """`in_flight_saturates` of `device` from its memory figures."""
    return in_flight_saturates(*card_memory(device))


def launch_score(o: Option, num_sms: int, saturates: int = IN_FLIGHT_SATURATES) -> float:
    """weight × wave efficiency × how close the loads in flight come to saturating memory
    (`saturates` bytes per SM), less the split-K overhead."""
    per_sm = min(o.programs / num_sms, o.resident)
    in_flight = per_sm * o.tile_bytes * o.buffers
    # An SM draws at most its share of the card's bandwidth: a grid of fewer programs than SMs
    # leaves the rest idle, however many bytes each program keeps in flight.
    fill = min(1.0, in_flight / saturates, o.programs / num_sms)
    eff = wave_efficiency(o.programs, o.resident * num_sms)
    return o.launch.weight * eff * fill * (SPLIT_COST if o.splits > 1 else 1.0)


def pick_launch(
    options: list[Option],
    num_sms: int,
    saturates: int = IN_FLIGHT_SATURATES,
    ideal_us: float = math.inf,
) -> int:
    """Index of the option with the shortest estimated time: the step's time at full bandwidth
    (`ideal_us`: its K/V bytes ÷ the card's bandwidth) ÷ `launch_score`, plus `REDUCE_LAUNCH_US`
    for a second launch; ties go to the earlier one (the default launch, the rule's splits)."""
    est = [
        1 / max(launch_score(o, num_sms, saturates), 1e-9)
        + (REDUCE_LAUNCH_US / ideal_us if o.reduce_launch else 0.0)
        for o in options
    ]
    return min(range(len(est)), key=lambda i: (round(est[i], 3), i))


# Two heads a program halve the grid. On a short context (a few K/V tiles a program: splits
# would be short too) under this many one-head programs an SM, the programs are worth more than
# the wider rows (H200, best of each: Whisper self decode b1 12.1 vs 13.0 us, b16 23.4 vs 24.4,
# BART b1 13.3 vs 14.8). From 512 programs on (3.9 an SM), or at 32k context, two heads equal
# or win (reports/results/h200/tune-tiny.csv, tune-card.csv; h100/tune.txt "heads").
TWO_HEADS_MIN_PER_SM = 3
TWO_HEADS_SHORT_KV = 2048


def heads_per_program(
    num_kv_heads: int,
    group_pad: int,
    head_pad: int,
    decode: bool,
    programs: int | None = None,
    sms: int | None = None,
    kv_len: int = 0,
) -> int:
    """Adjacent kv heads one decode program handles. Two for MHA decode with head size 64: each
    token's K/V row of the program is then 256 contiguous bytes instead of 128, and the 16-row
    tile holds two real rows instead of one (faster on every d64 decode shape of a wave or
    more; d128 and GQA rows are already 256 bytes, or full: reports/results/h100/tune.txt,
    "heads"). One where the one-head grid (`programs`) is under `TWO_HEADS_MIN_PER_SM` × `sms`
    and the context at most `TWO_HEADS_SHORT_KV` tokens (latency-bound)."""
    if decode and group_pad == 1 and head_pad == 64 and num_kv_heads % 2 == 0:
        tiny = programs is not None and sms is not None and programs < TWO_HEADS_MIN_PER_SM * sms
        if not (tiny and kv_len <= TWO_HEADS_SHORT_KV):
            return 2
    return 1


MAX_AUTO_SPLITS = 32
# Up to this many splits the last split merges the partials in the main kernel (no reduce
# launch): shorter than a second launch at few splits; past 8 the last program's serial merge
# costs more than the reduce kernel (reports/results/h100/tune.txt, "fused").
FUSED_REDUCE_MAX_SPLITS = 4


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (4 for the interpreter's launch model)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_programs: int, num_kv_tiles: int, device: torch.device, head_pad: int = 128
) -> int:
    """Split the K/V walk only when the tiles alone cannot fill the GPU (flash-decoding).

    Target: about half the programs an SM can hold (ncu: 4 for the d128 decode kernel, 10 for
    d64): two per SM, five for d64 on long contexts. Each split walks at least four K/V tiles.
    Measurements: reports/results/h100/tune.txt, "Behind the code"."""
    # d64 splits further only on long contexts: at 32 tiles the partials cost more than they win.
    per_sm = 5 if head_pad <= 64 and num_kv_tiles >= 64 else 2
    target = per_sm * num_sms(device)
    if num_programs >= target or num_kv_tiles < 8:
        return 1
    # Each split still walks at least four K/V tiles.
    splits = next_power_of_2(math.ceil(target / num_programs))
    return max(1, min(splits, MAX_AUTO_SPLITS, num_kv_tiles // 4))


MIN_TILES_PER_SPLIT = 1


def split_counts(auto: int, kv_tiles: int, programs: int, slots: int) -> tuple[int, ...]:
    """The split counts the launch score weighs for one launch: `auto` (`choose_num_splits`)
    first (ties keep it), none, the most splits that still merge in the kernel where `auto`
    needs a second launch, and every power of two above `auto` down to `MIN_TILES_PER_SPLIT`
    K/V tiles a split whose grid (`programs` × splits) still fits one wave of `slots`: more
    splits are there to fill the GPU; past one wave the wave model would reward a round count.
    (Fewer splits than `auto` on a grid that already fills one lost on the H200: fp8 MHA d128
    at batch 4, 32k, 2 splits 4.6% slower than 4.)"""
    top = min(MAX_AUTO_SPLITS, kv_tiles // MIN_TILES_PER_SPLIT)
    more = [1 << k for k in range(1, top.bit_length()) if auto < 1 << k and programs << k <= slots]
    fused = [FUSED_REDUCE_MAX_SPLITS] if auto > FUSED_REDUCE_MAX_SPLITS else []
    return (auto, *sorted({1, *fused, *more} - {auto}))


def kv_tile_bucket(max_kv_len: int) -> int:
    """The memo key's K/V length: 16-token tiles rounded up to a power of two (a context that
    grows by one token per decode step changes bucket at most log2 times)."""
    return next_power_of_2(cdiv(max(max_kv_len, 1), 16))


class Memo:
    """A bounded memo (least recently used out first) of launch choices."""

    def __init__(self, size: int = 4096):
        self.size, self.items = size, OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key, value):
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Plan:
    """One paged-attention launch, decided on the host before it runs (`make_plan`); the
    launcher (`optimized/ops/paged_attention.py`) only launches it.

    launch:          K/V tile, warps, stages of the main kernel
    num_splits:      split-K splits (1: none); tiles_per_split: K/V tiles each split walks
    heads:           adjacent kv heads a program handles (decode only)
    block_m:         rows of a program's tile (BLOCK_M); wide: K/V columns a row reads
    fused_reduce:    with splits, the last split merges the partials in the main kernel
    reduce_rows:     otherwise, output rows per `_split_k_reduce_kernel` program (0: no reduce)
    splits_pad:      the reduce kernel's padded split count
    maxnreg:         a register cap per thread (tuning), or None
    """

    launch: Launch
    num_splits: int
    tiles_per_split: int
    heads: int
    block_m: int
    wide: int
    fused_reduce: bool
    reduce_rows: int
    splits_pad: int
    maxnreg: int | None = None


_CHOSEN = Memo()


def program_shape(
    schedule: Schedule,
    num_kv_heads: int,
    group: int,
    head_size: int,
    heads: int | None = None,
    device: torch.device | None = None,
) -> tuple[int, int, int]:
    """(kv heads per program, rows of its tile, K/V columns a row reads): `heads` None picks
    `heads_per_program` (on a GPU `device`, by its grid against the SMs; the interpreter keeps
    the grid-free rule, so its tiers cover both variants); a given one must be a power of two
    dividing num_kv_heads, its padded group rows at most 16, and only at decode."""
    group_pad = next_power_of_2(group)
    head_pad = max(16, next_power_of_2(head_size))
    decode = schedule.max_query_len <= 1
    if heads is None:
        grid = {}
        if device is not None and device.type == "cuda" and not interpreting():
            programs = schedule.tile_seq.shape[0] * num_kv_heads
            grid = dict(programs=programs, sms=num_sms(device), kv_len=schedule.max_kv_len)
        heads = heads_per_program(num_kv_heads, group_pad, head_pad, decode, **grid)
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
    # One token per sequence with several heads: as few padded token rows as 16 rows allow.
    block_m = max(16, group_pad * heads) if heads > 1 else schedule.block_q * group_pad
    return heads, block_m, heads * head_pad


def make_plan(
    schedule: Schedule,
    *,
    num_kv_heads: int,
    group: int,
    head_size: int,
    elem_bytes: int,
    kv_elem_bytes: int,
    device: torch.device,
    probe,
    variant: tuple = (),
    num_splits: int | None = None,
    launch: Launch | None = None,
    heads: int | None = None,
    fused_reduce: bool | None = None,
    reduce_rows: int | None = None,
    maxnreg: int | None = None,
    paged: bool = True,
) -> Plan:
    """The plan of one call. Tiles come from `schedule`; `heads` (None: `heads_per_program`),
    launch and split count by occupancy: each candidate's resident programs per SM as compiled
    (`probe(launch, splits) -> (resident, K/V buffers)`, the launcher compiles the kernel
    without running it) and its split counts (`split_counts`), scored by `launch_score` (GPU
    only; the interpreter has one launch and the split rule). The GPU choice is memoized per
    (`variant`, candidates, grid, K/V tile bucket, num_splits): a decode loop whose context
    grows a token a step decides once per bucket. Explicit `num_splits`, `launch`, `heads`,
    `fused_reduce`, `reduce_rows` and `maxnreg` override (tuning, tests). `paged`: False for
    packed K/V (its loop buffers K/V differently: `launch_candidates`)."""
    heads, block_m, wide = program_shape(schedule, num_kv_heads, group, head_size, heads, device)
    head_pad = wide // heads
    # The prefill launch (bigger K/V tiles, more stages) only for 64-row tiles of many queries;
    # 16/32-row tiles of a few queries stream K/V like decode.
    prefill = schedule.max_query_len > 1 and block_m >= 64
    smem = None if interpreting() else smem_limit(device)
    kv_fp8 = kv_elem_bytes == 1
    cands = launch_candidates(wide, prefill, block_m, elem_bytes, smem, heads, kv_fp8, paged)
    if launch is not None:
        cands = (launch,)
    num_tiles = schedule.tile_seq.shape[0]
    num_programs = num_tiles * (num_kv_heads // heads)

    def splits_for(c: Launch) -> int:
        kv_tiles = cdiv(max(schedule.max_kv_len, 1), c.tile_n)
        n = num_splits or choose_num_splits(num_programs, kv_tiles, device, wide)
        return max(1, min(n, kv_tiles))

    if interpreting():
        cfg, splits = cands[0], splits_for(cands[0])
    else:
        key = (variant, cands, num_programs, kv_tile_bucket(schedule.max_kv_len), num_splits)
        choice = _CHOSEN.get(key)
        if choice is None:
            tile_bytes = 2 * wide * kv_elem_bytes
            options = []
            sms = num_sms(device)
            for c in cands:
                auto = splits_for(c)
                resident, buffers = probe(c, auto)
                tiles = cdiv(max(schedule.max_kv_len, 1), c.tile_n)
                slots = resident * sms
                counts = split_counts(auto, tiles, num_programs, slots)
                if buffers > 1:  # double buffers: also the most splits that fit one wave
                    most = 1 << max(0, (slots // max(num_programs, 1)).bit_length() - 1)
                    if min(most, tiles) not in counts:
                        counts = (*counts, min(most, tiles))
                for s in counts if num_splits is None else (auto,):
                    grid = num_programs * s
                    if buffers > 1 and not sms // 2 <= grid <= slots and c != cands[0]:
                        continue  # double buffers: a grid of half to one wave of them
                    second = s > FUSED_REDUCE_MAX_SPLITS and heads == 1
                    options.append(Option(c, s, resident, grid, c.tile_n * tile_bytes, second,
                                          buffers))  # fmt: skip
            kv_bytes = num_programs * max(schedule.max_kv_len, 1) * tile_bytes
            ideal_us = kv_bytes / card_bandwidth(device)
            best = options[pick_launch(options, sms, card_in_flight(device), ideal_us)]
            choice = _CHOSEN.put(key, (best.launch, best.splits))
        cfg, splits = choice
        splits = max(1, min(splits, cdiv(max(schedule.max_kv_len, 1), cfg.tile_n)))
    num_kv_tiles = cdiv(max(schedule.max_kv_len, 1), cfg.tile_n)
    if fused_reduce is None:
        fused_reduce = splits <= FUSED_REDUCE_MAX_SPLITS
    # The separate reduce reads one head's columns per row: several heads merge in the kernel.
    fused_reduce = (fused_reduce or heads > 1) and splits > 1
    rows = splits_pad = 0
    if splits > 1 and not fused_reduce:
        splits_pad = next_power_of_2(splits)
        if interpreting():
            rows = reduce_rows or block_m
        else:
            # As many rows per program as fit ~8k fp32 partials of `acc` (64 registers a
            # thread), up to a whole tile (tune.txt, "Behind the code").
            rows = reduce_rows or max(1, min(block_m, 8192 // (splits_pad * head_pad)))
            if rows == 1:  # one padded split count for all: one compile per head size
                splits_pad = max(splits_pad, MAX_AUTO_SPLITS)
        if block_m % rows:
            raise ValueError(f"reduce_rows: expected a divisor of {block_m}, got {rows}")
    return Plan(
        launch=cfg,
        num_splits=splits,
        tiles_per_split=cdiv(num_kv_tiles, splits),
        heads=heads,
        block_m=block_m,
        wide=wide,
        fused_reduce=fused_reduce,
        reduce_rows=rows,
        splits_pad=splits_pad,
        maxnreg=maxnreg,
    )
