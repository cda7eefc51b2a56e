"""How large a workload is, from its explicit shape alone (nothing built): one derivation from
a `Shape`'s steps, used wherever a size is needed.

    steps(shape)          each step's lengths (`StepSize`): an episode's encoder step included
    host_bytes(shape)     what `Shape.build` allocates on the CPU (inputs, caches, histories)
    device_bytes(shape)   what one test of it may hold on its device: the case (inputs moved
                          once, the expected outputs and cache writes), one backend's copy and
                          the expected caches beside it, and the largest working set a step's
                          attention forms (dense float32 scores, as a gather-then-SDPA backend
                          allocates; the reference's chunks are bounded below that)
    problem(shape, ...)   why this machine cannot hold it ('' when it can)

The engine grants a test it has never measured `device_bytes` (a measured one its measured peak,
conformance/scheduler.py); the bench counts the bytes and products a step reads and computes
(`StepSize.kv_bytes`, `StepSize.flops`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# float32 scores and the temporaries beside them (mask or bias, the softmax, its output) that a
# dense backend holds at once; the reference's padded float64 chunks stay under its bound.
DENSE_TEMPORARIES = 4
# The allocator's rounding and fragments: a share of the total, and a floor.
SLACK = 1.25
SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class StepSize:
    """One step's lengths: per sequence its query tokens, visible keys and first query
    position; the query rows (padding included) and the new K/V rows it brings."""

    attn_kind: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    first: tuple[int, ...]  # the absolute position of each sequence's first query token
    rows: int
    new_kv_rows: int  # rows of key/value (padding included); 0: none (a cross decode)
    cached: bool  # reads a paged cache
    window: int | None = None

    @property
    def causal(self) -> bool:
        return self.attn_kind == "decoder"

    def visible(self) -> int:
        """(query, key) pairs the step's masks let through."""
        if not self.causal:
            return sum(q * k for q, k in zip(self.q_lens, self.kv_lens))
        total = 0
        for q, f in zip(self.q_lens, self.first):
            # query j sits at position f + j and sees positions 0..f+j (a window: the last w)
            seen = (f + j + 1 for j in range(q))
            total += sum(min(n, self.window) if self.window else n for n in seen)
        return total

    def kv_bytes(self, kv_row_bytes: int) -> int:
        """K and V bytes the step's attention reads (`kv_row_bytes`: one token's K or V)."""
        return 2 * sum(self.kv_lens) * kv_row_bytes

    def flops(self, num_heads: int, head_size: int) -> float:
        """The visible score and P·V products: 4 flops a (query head, key, dim)."""
        return 4.0 * self.visible() * num_heads * head_size

    def dense_scores(self, num_heads: int) -> int:
        """Elements of [num_seqs, num_heads, max query len, max kv len]: padded scores."""
        return len(self.q_lens) * num_heads * max(self.q_lens, default=1) * max(self.kv_lens)


@functools.lru_cache(maxsize=8192)
def steps(shape) -> tuple[StepSize, ...]:
    """The steps `shape.build()` makes, in order, as lengths (a shape is a frozen value: its
    steps are computed once)."""
    s, pad = shape, shape.padding_tokens
    enc = tuple(s.encoder_seq_lens or ())
    zeros = (0,) * len(enc or s.query_lens)
    if s.attn_kind == "encoder":
        return (StepSize("encoder", enc, enc, zeros, sum(enc) + pad, sum(enc) + pad, False),)
    if s.attn_kind == "episode":
        out = [StepSize("encoder", enc, enc, zeros, sum(enc), sum(enc), False)]
        ctx, q = zeros, tuple(s.query_lens)
        for t in range(s.decode_steps + 1):
            seq = tuple(c + n for c, n in zip(ctx, q))
            out.append(StepSize("decoder", q, seq, ctx, sum(q), sum(q), True, s.sliding_window))
            cross_new = sum(enc) if t == 0 else 0
            out.append(StepSize("encoder_decoder", q, enc, zeros, sum(q), cross_new, True))
            ctx, q = seq, (1,) * len(q)
        return tuple(out)
    ctx = tuple(s.context_lens or zeros)
    q = tuple(s.query_lens)
    if s.attn_kind == "decoder":
        seq = tuple(c + n for c, n in zip(ctx, q))
        return (StepSize("decoder", q, seq, ctx, sum(q) + pad, sum(q) + pad, True,
                         s.sliding_window),)  # fmt: skip
    new = sum(e for e, c in zip(enc, ctx) if c == 0)
    return (StepSize("encoder_decoder", q, enc, zeros, sum(q) + pad, new + pad if new else 0,
                     True),)  # fmt: skip


def _elem(shape) -> int:
    from conformance.shapes import DTYPES

    return DTYPES[shape.dtype].itemsize


def pool_bytes(shape) -> int:
    """Both caches of the pool its steps share (0 for the encoder)."""
    from conformance.workloads import pool_blocks

    cache_elem = 1 if shape.kv_cache_dtype != "auto" else _elem(shape)
    blocks = lambda lens: sum(-(-n // shape.block_size) for n in lens)
    enc = shape.encoder_seq_lens or ()
    if shape.attn_kind == "encoder":
        return 0
    if shape.attn_kind == "episode":
        needed = blocks([q + shape.decode_steps for q in shape.query_lens]) + blocks(enc)
    else:
        needed = blocks(steps(shape)[0].kv_lens)
    kv_row = shape.num_kv_heads * shape.head_size
    return 2 * pool_blocks(needed, shape.layout) * shape.block_size * kv_row * cache_elem


def _inputs_bytes(shape) -> int:
    """Every step's query, key and value (what a backend's copy holds besides the pool)."""
    row, kv_row = shape.num_heads * shape.head_size, shape.num_kv_heads * shape.head_size
    return sum((st.rows * row + 2 * st.new_kv_rows * kv_row) * _elem(shape) for st in steps(shape))


def host_bytes(shape) -> int:
    """What `build` allocates: inputs, the pool, every sequence's K/V history (fp8: float64, as
    attention reads it; an episode's encoder keeps its own)."""
    fp8 = shape.kv_cache_dtype != "auto"
    kv_row = shape.num_kv_heads * shape.head_size
    history_elem = 8 if fp8 else _elem(shape)
    sts = steps(shape)
    if shape.attn_kind == "episode":  # histories are built once, sliced per step
        enc = sum(shape.encoder_seq_lens)
        final = sum(q + shape.decode_steps for q in shape.query_lens)
        history = 2 * (final + enc) * kv_row * history_elem + 2 * enc * kv_row * _elem(shape)
    else:
        elem = _elem(shape) if sts[0].attn_kind == "encoder" else history_elem
        history = 2 * sum(sts[0].kv_lens) * kv_row * elem
    return _inputs_bytes(shape) + pool_bytes(shape) + history


def working_bytes(shape) -> int:
    """The largest transient a step's attention forms: dense float32 scores with their
    temporaries (a gather-then-SDPA backend), or the reference's bounded chunks."""
    from conformance.expected import CHUNK_BYTES, TEMPORARIES

    most = max(st.dense_scores(shape.num_heads) for st in steps(shape))
    # a chunk's float64 scores with their temporaries, and as much again for its padded K/V
    reference = 2 * min(8 * TEMPORARIES * most, CHUNK_BYTES)
    return max(4 * most * DENSE_TEMPORARIES, reference)


def device_bytes(shape) -> int:
    """What one test of `shape` may hold on its device at its peak: the case (inputs and pool,
    float64 expected outputs), a backend's copy of inputs and pool, the expected pool beside it,
    its output, and the largest working set; with the allocator's slack."""
    row = shape.num_heads * shape.head_size
    outputs = sum(st.rows * row for st in steps(shape))
    case = _inputs_bytes(shape) + pool_bytes(shape) + 8 * outputs
    backend = _inputs_bytes(shape) + 2 * pool_bytes(shape) + outputs * _elem(shape)
    return int(SLACK * (case + backend + working_bytes(shape))) + SLACK_BYTES


def problem(shape, memories: list[tuple[str, int]]) -> str:
    """Why a machine with `memories` (`runner.machine_memory()`: host RAM, and GPU memory where
    there is a GPU) cannot hold `shape` ('' when it can): the host builds it; a test of it runs
    on the GPU, or on the host where there is none."""
    on_gpu = any(what != "host RAM" for what, _ in memories)
    for what, have in memories:
        need = device_bytes(shape) if what != "host RAM" else host_bytes(shape) + (
            0 if on_gpu else device_bytes(shape))  # fmt: skip
        if need > have:
            return (
                f"too large for this machine: case {shape.id} needs about {need:,} bytes "
                f"({need / 2**30:,.1f} GiB) of {what}; its {what} is {have:,} bytes "
                f"({have / 2**30:,.1f} GiB)"
            )
    return ""
