"""The plan of a paged-attention call for a `Card`: query tiles (`Schedule`), launch (K/V tile,
warps, stages), split-K splits, kv heads a program; the launcher only launches it. The model:
each candidate as compiled (`Compiled`) holds so many programs an SM; with a split count it
makes a grid rated by how it fills its last wave and the K/V bytes an SM keeps in flight
against what saturates the card's memory (`launch_score`); the shortest estimated time wins
(`pick_launch`). Named exceptions, each tested (optimized/tests/test_plan.py): `DOUBLE_BUFFERS`,
`heads_per_program`, `FUSED_REDUCE_MAX_SPLITS`. What measured the constants: tuning/README.md.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import NamedTuple

import torch

from optimized.kernels import cdiv, interpreting, next_power_of_2


@dataclass(frozen=True)
class Card:
    """A device's figures: read once from it (`card_of`), or built for another card."""

    name: str
    sms: int
    smem_per_block: int  # the opt-in most one program may take
    smem_per_sm: int = 233_472
    regs_per_sm: int = 65_536
    threads_per_sm: int = 2048
    memory_clock_khz: int = 2_619_000
    bus_width_bits: int = 5120
    copy_gbps: float = 0.0  # measured by the bench (0: not measured)
    matmul_tflops: float = 0.0  # likewise, bf16
    interpreter: bool = False  # Triton's interpreter: one launch, the occupancy split rule

    @property
    def bandwidth(self) -> float:
        """Peak memory bandwidth in bytes per µs (double data rate × bus width)."""
        return self.memory_clock_khz * 1e3 * self.bus_width_bits / 8 * 2 / 1e6

    @property
    def in_flight_saturates(self) -> int:
        """K/V bytes in flight per SM that saturate memory: the H100's fit scaled by bandwidth
        per SM (Little's law: at one latency the bytes in flight grow with it)."""
        return round(
            IN_FLIGHT_SATURATES * (self.bandwidth / self.sms) / (H100.bandwidth / H100.sms)
        )

    def resident(self, compiled: Compiled, num_warps: int) -> int:
        """Programs of a compiled launch an SM holds (registers in units of 256 a warp; shared
        memory plus the 1 KB the runtime reserves; threads; at most 32)."""
        regs_per_warp = -(-max(compiled.regs, 1) * 32 // 256) * 256
        by_regs = (self.regs_per_sm // regs_per_warp) // num_warps
        by_smem = self.smem_per_sm // (compiled.shared + 1024) if compiled.shared else 32
        return max(0, min(by_regs, by_smem, self.threads_per_sm // (32 * num_warps), 32))


H100 = Card("h100", sms=132, smem_per_block=232_448)
H200 = Card(
    "h200", sms=132, smem_per_block=232_448, memory_clock_khz=3_201_000, bus_width_bits=6016
)
INTERPRETER = Card("interpreter", sms=4, smem_per_block=1 << 30, interpreter=True)


@functools.cache
def card_of(device: torch.device) -> Card:
    """The card a device is (the interpreter's off CUDA); figures torch lacks are the H100's."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER
    p = torch.cuda.get_device_properties(device)
    return Card(
        name=p.name,
        sms=p.multi_processor_count,
        smem_per_block=getattr(p, "shared_memory_per_block_optin", 0) or p.shared_memory_per_block,
        smem_per_sm=p.shared_memory_per_multiprocessor,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 0) or H100.regs_per_sm,
        threads_per_sm=p.max_threads_per_multi_processor,
        memory_clock_khz=getattr(p, "memory_clock_rate", 0) or H100.memory_clock_khz,
        bus_width_bits=getattr(p, "memory_bus_width", 0) or H100.bus_width_bits,
    )


@dataclass(frozen=True, eq=False)
class Schedule:
    """One step's tiles as device tensors (per tile: its sequence and first query; per
    sequence: offsets and lengths); built once a step, reused across layers."""

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
    """Query tokens a program holds: tokens × padded group make as few rows as hold the longest
    query, at least 16 (tl.dot) and at most 64."""
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
    """Tile every sequence's queries into programs of `block_q` tokens (None: `block_q_for`)."""
    block_q = block_q or block_q_for(max(query_lens, default=1), group)
    if block_q & (block_q - 1):
        raise ValueError(f"block_q: expected a power of two, got {block_q}")
    tiles = [(i, q0) for i, n in enumerate(query_lens) for q0 in range(0, n, block_q)]
    as_t = lambda xs: torch.tensor(list(xs), dtype=torch.int32, device=device)
    offsets = lambda lens: as_t([0, *accumulate(lens)])
    return Schedule(
        tile_seq=as_t(t[0] for t in tiles),
        tile_q_first=as_t(t[1] for t in tiles),
        query_start_loc=offsets(query_lens),
        query_lens=as_t(query_lens),
        kv_lens=as_t(kv_lens),
        context_lens=as_t(context_lens),
        kv_start_loc=offsets(kv_lens),
        block_q=block_q,
        max_query_len=max(query_lens, default=0),
        max_kv_len=max(kv_lens, default=0),
    )


@dataclass(frozen=True)
class Launch:
    """One launch of the main kernel: K/V tile, warps, pipeline stages."""

    tile_n: int
    num_warps: int
    num_stages: int
    weight: float = 1.0  # throughput per resident program against the first candidate's


class Compiled(NamedTuple):
    """What a launch costs an SM as compiled: registers a thread, shared memory a program."""

    regs: int
    shared: int


# A probe: the launches' compiled facts, all at once.
Probe = Callable[[tuple[Launch, ...]], list[Compiled]]


def smem_bytes(block_m, tile_n, head_pad, elem_bytes, num_stages, buffers=None, bias=False) -> int:
    """Shared memory Triton 3.6 gives a program: the Q tile, `buffers` (default stages - 1) K
    and V tiles, the fp32 P tile (`bias`: a K and V tile and a P tile more, as compiled)."""
    kv = 2 * tile_n * head_pad * elem_bytes * (buffers or max(num_stages - 1, 1) + bias)
    return block_m * head_pad * elem_bytes + kv + block_m * tile_n * 4 * (1 + bias) + 256


def decode_kv_buffers(num_stages: int) -> int:
    """K/V tiles a paged decode program holds as compiled (the block-table load is pipelined
    ahead of the K/V loads): one with 2-4 stages, two with 5-6."""
    return 1 if num_stages < 5 else 2


def compiled_kv_buffers(
    shared: int, block_m: int, wide: int, elem_bytes: int, tile_n: int, kv_elem_bytes: int
) -> int:
    """K/V tiles a compiled program buffers: its shared memory past the Q tile, in K+V tiles."""
    return max(1, (shared - block_m * wide * elem_bytes) // (2 * tile_n * wide * kv_elem_bytes))


def _fit_smem(
    cfg: Launch, block_m, head_pad, elem_bytes, limit, prefill, paged=True, bias=False
) -> Launch:
    """Fewer stages, then smaller K/V tiles, until the program fits `limit` bytes (packed K/V
    buffers a K/V tile a stage: no block-table load to pipeline ahead)."""

    def fits(c: Launch) -> bool:
        buffers = decode_kv_buffers(c.num_stages) if paged and not prefill else None
        used = smem_bytes(block_m, c.tile_n, head_pad, elem_bytes, c.num_stages, buffers, bias)
        return used <= limit

    while not fits(cfg) and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while not fits(cfg) and cfg.tile_n > 16:
        cfg = replace(cfg, tile_n=cfg.tile_n // 2)
    return cfg


# Exception: two K/V tiles a program (five stages), in 128- and 32-token tiles, for the paged
# decode of one d64/d128 head with 16-bit queries and cache, weighed only where the grid is half
# to one wave of them (with the split count that makes one wave), and only whole.
DOUBLE_BUFFERS = Launch(128, 4, 5)
SMALL_DOUBLE_BUFFERS = Launch(32, 4, 5)


def launch_candidates(
    wide: int,
    prefill: bool,
    block_m: int,
    elem_bytes: int,
    card: Card,
    heads: int = 1,
    kv_fp8: bool = False,
    paged: bool = True,
    bias: bool = False,
) -> tuple[Launch, ...]:
    """The launches to choose from, the default first, fitted to the card's shared memory (`wide`:
    K/V columns a token; fp8 decode also gets each with twice the tile: the same bytes)."""
    if card.interpreter:  # it pays per loop iteration, not per element: wide tiles
        return (Launch(64, 4, 1),)
    return _gpu_candidates(
        wide, prefill, block_m, elem_bytes, card.smem_per_block, heads, kv_fp8, paged, bias
    )


@functools.cache
def _gpu_candidates(wide, prefill, block_m, elem_bytes, smem, heads, kv_fp8, paged, bias=False):
    if prefill:
        cands = [Launch(64, 4, 3)]
    elif heads > 1:
        cands = [Launch(64, 4, 2), Launch(32, 4, 2)]
    elif wide <= 64:
        cands = [Launch(32, 2, 2), Launch(64, 2, 2), Launch(16, 1, 2, weight=0.95)]
    elif wide <= 128 and block_m >= 32:
        cands = [Launch(32, 2, 2)]
    else:
        cands = [Launch(64, 4, 2)]
    if kv_fp8 and not prefill:
        cands += [replace(c, tile_n=2 * c.tile_n) for c in cands]
    one_head = heads == 1 and wide <= 128 and block_m == 16
    offered = one_head and paged and not (prefill or kv_fp8) and elem_bytes == 2
    whole = _fit_smem(DOUBLE_BUFFERS, block_m, wide, elem_bytes, smem, prefill, True, bias)
    whole = whole == DOUBLE_BUFFERS
    if offered and whole:
        cands += [DOUBLE_BUFFERS, SMALL_DOUBLE_BUFFERS]
    fitted = [_fit_smem(c, block_m, wide, elem_bytes, smem, prefill, paged, bias) for c in cands]
    return tuple(dict.fromkeys(fitted))


def wave_efficiency(num_programs: int, slots: int) -> float:
    """1 when the grid fits one wave, else the filled fraction of its waves."""
    if slots <= 0:
        return 0.0
    waves = num_programs / slots
    return 1.0 if waves <= 1 else waves / math.ceil(waves)


@dataclass(frozen=True)
class Option:
    """A launch × split count as the model sees it (resident programs an SM, grid, K+V bytes a
    tile, a second merging launch, K/V tiles buffered)."""

    launch: Launch
    splits: int
    resident: int
    programs: int
    tile_bytes: int
    reduce_launch: bool = False
    buffers: int = 1


IN_FLIGHT_SATURATES = 48 << 10  # K/V bytes in flight per SM that saturate the H100's memory
SPLIT_COST = 0.95  # a split-K launch writes partials and merges them: it must win by this much
REDUCE_LAUNCH_US = 2.0  # a second launch to merge partials, whatever the step
MAX_AUTO_SPLITS = 32
MIN_TILES_PER_SPLIT = 1
# Exception: up to this many splits the last split merges the partials in the main kernel.
FUSED_REDUCE_MAX_SPLITS = 4


def launch_score(o: Option, card: Card) -> float:
    """weight × wave efficiency × how close the bytes in flight come to saturating memory (an
    SM draws at most its share of the bandwidth), less the split-K overhead."""
    per_sm = min(o.programs / card.sms, o.resident)
    fill = min(
        1.0, per_sm * o.tile_bytes * o.buffers / card.in_flight_saturates, o.programs / card.sms
    )
    eff = wave_efficiency(o.programs, o.resident * card.sms)
    return o.launch.weight * eff * fill * (SPLIT_COST if o.splits > 1 else 1.0)


def pick_launch(options: list[Option], card: Card, ideal_us: float = math.inf) -> int:
    """The option with the shortest estimated time: the step at full bandwidth (`ideal_us`) ÷
    its score, plus `REDUCE_LAUNCH_US` for a second launch; ties keep the earlier one."""
    est = [
        1 / max(launch_score(o, card), 1e-9)
        + (REDUCE_LAUNCH_US / ideal_us if o.reduce_launch else 0)
        for o in options
    ]
    return min(range(len(est)), key=lambda i: (round(est[i], 3), i))


TWO_HEADS_MIN_PER_SM = 3
TWO_HEADS_SHORT_KV = 2048


def heads_per_program(
    num_kv_heads, group_pad, head_pad, decode, programs=None, sms=None, kv_len=0
) -> int:
    """Exception: MHA d64 decode takes two adjacent kv heads a program, except a latency-bound
    grid (under `TWO_HEADS_MIN_PER_SM` an SM, context at most `TWO_HEADS_SHORT_KV`)."""
    if decode and group_pad == 1 and head_pad == 64 and num_kv_heads % 2 == 0:
        tiny = programs is not None and sms is not None and programs < TWO_HEADS_MIN_PER_SM * sms
        if not (tiny and kv_len <= TWO_HEADS_SHORT_KV):
            return 2
    return 1


def choose_num_splits(num_programs: int, num_kv_tiles: int, card: Card, head_pad: int = 128):
    """Split the K/V walk only where the tiles alone cannot fill the GPU: to about two programs
    an SM (five for d64 on 64 or more tiles), each split at least four K/V tiles."""
    per_sm = 5 if head_pad <= 64 and num_kv_tiles >= 64 else 2
    target = per_sm * card.sms
    if num_programs >= target or num_kv_tiles < 8:
        return 1
    splits = next_power_of_2(math.ceil(target / num_programs))
    return max(1, min(splits, MAX_AUTO_SPLITS, num_kv_tiles // 4))


def split_counts(auto: int, kv_tiles: int, programs: int, slots: int) -> tuple[int, ...]:
    """Counts weighed: `auto` first (ties keep it), none, the most merged in-kernel, and powers of
    two above `auto` whose grid still fits one wave of `slots`."""
    top = min(MAX_AUTO_SPLITS, kv_tiles // MIN_TILES_PER_SPLIT)
    more = [1 << k for k in range(1, top.bit_length()) if auto < 1 << k and programs << k <= slots]
    fused = [FUSED_REDUCE_MAX_SPLITS] if auto > FUSED_REDUCE_MAX_SPLITS else []
    return (auto, *sorted({1, *fused, *more} - {auto}))


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


_CHOSEN = Memo()


@dataclass(frozen=True)
class Plan:
    """One launch: splits of `tiles_per_split` K/V tiles, `heads` kv heads a `block_m`-row program
    reading `wide` columns; partials merged in-kernel (`fused_reduce`) or by the reduce kernel
    (`reduce_rows` rows a program over `splits_pad`); `maxnreg` a register cap or None."""

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


def program_shape(schedule, num_kv_heads, group, head_size, card: Card, heads=None):
    """(kv heads a program, tile rows, K/V columns a row); `heads` None: `heads_per_program` (the
    interpreter grid-free); a given one is checked (a power of two, 16 rows, decode only)."""
    group_pad = next_power_of_2(group)
    head_pad = max(16, next_power_of_2(head_size))
    decode = schedule.max_query_len <= 1
    if heads is None:
        programs = schedule.tile_seq.shape[0] * num_kv_heads
        grid = (
            {}
            if card.interpreter
            else dict(programs=programs, sms=card.sms, kv_len=schedule.max_kv_len)
        )
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
    block_m = max(16, group_pad * heads) if heads > 1 else schedule.block_q * group_pad
    return heads, block_m, heads * head_pad


@dataclass(frozen=True)
class Geometry:
    """What the plan needs of a call besides its schedule."""

    num_kv_heads: int
    group: int
    head_size: int
    elem_bytes: int  # the query's
    kv_elem_bytes: int  # the cache's (1: fp8)
    paged: bool = True  # False: packed K/V (the encoder)
    bias: bool = False  # T5's position bias, gathered in-kernel


def make_plan(
    schedule: Schedule,
    g: Geometry,
    card: Card,
    probe: Probe,
    variant=(),
    *,
    num_splits=None,
    launch=None,
    heads=None,
    fused_reduce=None,
    reduce_rows=None,
    maxnreg=None,
) -> Plan:
    """One call's launch and splits by the model (`_choose`; the interpreter: its launch, the
    split rule), memoized per (variant, card, candidates, grid, K/V bucket); keywords override."""
    heads, block_m, wide = program_shape(
        schedule, g.num_kv_heads, g.group, g.head_size, card, heads
    )
    prefill = schedule.max_query_len > 1 and block_m >= 64
    fp8 = g.kv_elem_bytes == 1
    cands = (launch,)
    if not launch:
        args = (wide, prefill, block_m, g.elem_bytes, card, heads, fp8, g.paged, g.bias)
        cands = launch_candidates(*args)
    programs = schedule.tile_seq.shape[0] * (g.num_kv_heads // heads)
    kv_len = max(schedule.max_kv_len, 1)
    if card.interpreter:
        cfg, splits = cands[0], _auto_splits(cands[0], programs, kv_len, wide, card, num_splits)
    else:
        key = (variant, card, cands, programs, next_power_of_2(cdiv(kv_len, 16)), num_splits)
        cfg, splits = _CHOSEN.get(key) or _CHOSEN.put(
            key, _choose(cands, probe, programs, kv_len, heads, wide, block_m, g, card, num_splits)
        )
    tiles = cdiv(kv_len, cfg.tile_n)
    splits = max(1, min(splits, tiles))
    fused = fused_reduce if fused_reduce is not None else splits <= FUSED_REDUCE_MAX_SPLITS
    fused = (fused or heads > 1) and splits > 1  # the separate reduce reads one head a row
    rows, pad = _reduce(splits, fused, block_m, wide // heads, card, reduce_rows)
    return Plan(cfg, splits, cdiv(tiles, splits), heads, block_m, wide, fused, rows, pad, maxnreg)


def _reduce(splits, fused, block_m, head_pad, card, reduce_rows) -> tuple[int, int]:
    """(rows a reduce program, padded split count) where a second launch merges the partials:
    as many rows as fit ~8k fp32 partials (64 registers a thread), at most a tile."""
    if splits <= 1 or fused:
        return 0, 0
    pad = next_power_of_2(splits)
    rows = reduce_rows or (
        block_m if card.interpreter else max(1, min(block_m, 8192 // (pad * head_pad)))
    )
    if rows == 1 and not card.interpreter:  # one padded split count: one compile per size
        pad = max(pad, MAX_AUTO_SPLITS)
    if block_m % rows:
        raise ValueError(f"reduce_rows: expected a divisor of {block_m}, got {rows}")
    return rows, pad


def _auto_splits(c: Launch, programs, kv_len, wide, card, num_splits) -> int:
    tiles = cdiv(kv_len, c.tile_n)
    return max(1, min(num_splits or choose_num_splits(programs, tiles, card, wide), tiles))


def _that_fit(cands, probe, card: Card) -> list[tuple[Launch, Compiled]]:
    """The candidates whose compiled shared memory fits a program (the probe's word over the
    model's); where none does, each one stage fewer, then half the tile, until one does."""
    while True:
        fit = [(c, x) for c, x in zip(cands, probe(cands)) if x.shared <= card.smem_per_block]
        if fit or all(c.num_stages <= 2 and c.tile_n <= 16 for c in cands):
            return fit
        smaller = lambda c: (
            replace(c, num_stages=c.num_stages - 1)
            if c.num_stages > 2
            else replace(c, tile_n=max(16, c.tile_n // 2))
        )
        cands = tuple(dict.fromkeys(smaller(c) for c in cands))


def _choose(cands, probe, programs, kv_len, heads, wide, block_m, g: Geometry, card, num_splits):
    """(launch, splits) with the shortest estimated time over every candidate × split count."""
    tile_bytes = 2 * wide * g.kv_elem_bytes
    options = []
    for c, compiled in _that_fit(cands, probe, card):
        auto = _auto_splits(c, programs, kv_len, wide, card, num_splits)
        resident = card.resident(compiled, c.num_warps)
        buffers = compiled_kv_buffers(
            compiled.shared, block_m, wide, g.elem_bytes, c.tile_n, g.kv_elem_bytes
        )
        tiles, slots = cdiv(kv_len, c.tile_n), resident * card.sms
        counts = split_counts(auto, tiles, programs, slots) if num_splits is None else (auto,)
        if buffers > 1 and num_splits is None:  # double buffers: the count that makes a wave
            most = min(1 << max(0, (slots // max(programs, 1)).bit_length() - 1), tiles)
            counts += () if most in counts else (most,)
        for s in counts:
            if buffers > 1 and not card.sms // 2 <= programs * s <= slots and c != cands[0]:
                continue  # double buffers only on half to one wave of them
            second = s > FUSED_REDUCE_MAX_SPLITS and heads == 1
            options.append(
                Option(c, s, resident, programs * s, c.tile_n * tile_bytes, second, buffers)
            )
    if not options:
        tried = [(c.tile_n, c.num_warps, c.num_stages) for c in cands]
        raise ValueError(
            f"no launch of {tried} fits {card.smem_per_block} bytes of shared memory a program "
            f"(block_m={block_m}, wide={wide}, bias={g.bias})"
        )
    ideal_us = programs * kv_len * tile_bytes / card.bandwidth
    best = options[pick_launch(options, card, ideal_us)]
    return best.launch, best.splits
