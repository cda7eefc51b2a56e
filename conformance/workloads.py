"""Test fixtures: deterministic steps and whole episodes (metadata, tensors, pre-filled paged
caches) built from a seed. Not the spec (that is `reference/`): what the matrix, the tests and
the benchmarks feed it.

Steps: metadata, tensors and pre-filled paged caches built from a seed. Whatever the spec lets
hold anything is non-finite: unwritten cache slots (NaN) and padding rows of query (NaN), key
(Inf) and value (NaN).

`build_step(...)` is what tests, the conformance matrix and benchmarks use to get a valid step for
given lengths and a block-table layout. The caches hold NaN everywhere nothing was written, so any
read of a slot a sequence does not own shows up as NaN in the output. Each step also keeps every
sequence's whole K/V history contiguously (`key_history`), for the dense cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from reference.fp8 import cache_dtype, dequantize, quantize
from reference.metadata import AttnKind, StepMetadata


class Layout(StrEnum):
    """Where a step's blocks sit in the pool (block tables). Unused blocks hold NaN."""

    CONTIGUOUS = "contiguous"  # sequence 0's blocks first, in order
    SHUFFLED = "shuffled"  # a random permutation of the pool
    INTERLEAVED = "interleaved"  # every other block belongs to another layer (finite data)
    SHARED_PREFIX = "shared"  # decoder sequences share their common-prefix blocks, read-only
    HIGHEST = "highest"  # allocated from the top: block num_blocks-1 is in use
    NULL_BLOCK = "nullblock"  # block 0 is reserved (NaN) and table padding points at it
    FRAGMENTED = "fragmented"  # a pool three times larger than needed, blocks scattered


class CacheStrides(StrEnum):
    """How a step's two caches sit in memory; every one is handed to backends as
    `[num_blocks, block_size, num_kv_heads, head_size]` views (strided where not contiguous)."""

    CONTIGUOUS = "contiguous"  # two dense tensors
    KV_INTERLEAVED = "kv_interleaved"  # K and V views of one [blocks, 2, block, heads, d] pool
    HEAD_MAJOR = "head_major"  # each stored [blocks, heads, block, d], viewed in our order


def with_strides(caches: tuple[torch.Tensor, torch.Tensor], strides: CacheStrides | str):
    """The same caches (values bit for bit) laid out as `strides` says."""
    k, v = caches
    strides = CacheStrides(strides)
    if strides == CacheStrides.KV_INTERLEAVED:
        pool = torch.stack([k, v], dim=1)  # [blocks, 2, block_size, heads, d]
        return pool[:, 0], pool[:, 1]
    if strides == CacheStrides.HEAD_MAJOR:
        return tuple(c.transpose(1, 2).contiguous().transpose(1, 2) for c in caches)
    return k, v


def _on(t: torch.Tensor, device) -> bool:
    d = torch.device(device)
    return t.device.type == d.type and d.index in (None, t.device.index)


def copy_caches(caches, device=None) -> tuple[torch.Tensor, ...]:
    """A copy of `caches` on `device` (theirs by default) in the same layout: views of one pool
    stay views of one (copied) pool, strides stay what they were."""
    bases: dict[int, torch.Tensor] = {}
    out = []
    for c in caches:
        base = c if c._base is None else c._base
        if id(base) not in bases:
            bases[id(base)] = base.to(device or base.device, copy=True)
        out.append(bases[id(base)].as_strided(c.shape, c.stride(), c.storage_offset()))
    return tuple(out)


@dataclass(frozen=True)
class KVFormat:
    """How a workload's caches store K/V (reference/fp8.py): `kv_cache_dtype`, and for fp8 the
    scales as floats (one, or one per kv head)."""

    kv_cache_dtype: str = "auto"
    k_scale: tuple[float, ...] = ()
    v_scale: tuple[float, ...] = ()

    @property
    def fp8(self) -> bool:
        return self.kv_cache_dtype != "auto"

    def metadata(self) -> dict:
        """The StepMetadata fields: kv_cache_dtype, k_scale, v_scale (float32 tensors)."""
        if not self.fp8:
            return dict(kv_cache_dtype="auto", k_scale=None, v_scale=None)
        t = lambda xs: torch.tensor(xs, dtype=torch.float32)
        return dict(
            kv_cache_dtype=self.kv_cache_dtype, k_scale=t(self.k_scale), v_scale=t(self.v_scale)
        )

    def empty_cache(self, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        """A cache of `shape` whose every slot is NaN (an unwritten slot)."""
        if not self.fp8:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        nan = torch.full(shape, float("nan"), device=device)
        return nan.to(cache_dtype(self.kv_cache_dtype, dtype))

    def stored(self, x: torch.Tensor, scale) -> torch.Tensor:
        """What a cache holds for x [tokens, num_kv_heads, head_size] (fp8: quantized)."""
        if not self.fp8:
            return x
        return quantize(
            x, torch.tensor(scale, dtype=torch.float32, device=x.device), self.dtype_of()
        )

    def read(self, x: torch.Tensor, scale) -> torch.Tensor:
        """The values attention reads for x once it went through the cache (fp8: quantized and
        scaled back, float64; else x itself)."""
        if not self.fp8:
            return x
        scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device)
        return dequantize(self.stored(x, scale), scale_t)

    def dtype_of(self) -> torch.dtype:
        return cache_dtype(self.kv_cache_dtype, torch.float32)


AUTO = KVFormat()


@dataclass(frozen=True)
class PositionBias:
    """A workload's position bias (reference/position_bias.py): `kind` none or t5, T5's config
    values; its table is drawn from the step's seed, after every other tensor (a bias case's
    other tensors are its no-bias twin's)."""

    kind: str = "none"
    num_buckets: int = 32
    max_distance: int = 128

    @property
    def label(self) -> str:
        """none, t5 (T5's 32 buckets up to 128), or t5-B-D for another config."""
        if self.kind == "none":
            return "none"
        config = (self.num_buckets, self.max_distance)
        return "t5" if config == (32, 128) else f"t5-{config[0]}-{config[1]}"

    def metadata(self, num_heads: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
        """The StepMetadata fields (the table drawn from `gen`, in the model dtype)."""
        if self.kind == "none":
            return {}
        table = torch.randn(self.num_buckets, num_heads, generator=gen, device=gen.device) * 2
        return dict(position_bias=self.kind, relative_attention_bias=table.to(dtype),
                    relative_attention_num_buckets=self.num_buckets,
                    relative_attention_max_distance=self.max_distance)  # fmt: skip


NO_BIAS = PositionBias()


@dataclass(frozen=True, eq=False)
class Step:
    """Everything one backend call consumes, plus the histories for checking.

    query:         [num_tokens, num_heads, head_size]
    key, value:    [num_kv_tokens, num_kv_heads, head_size] or None (cross decode)
    kv_cache:      (key_cache, value_cache) [num_blocks, block_size, num_kv_heads, head_size]
                   or None (encoder)
    key_history:   per sequence, its whole visible K/V [kv_len, num_kv_heads, head_size], as
                   attention reads it from the cache (fp8: the dequantized values, float64)
    """

    attn_kind: AttnKind
    metadata: StepMetadata
    query: torch.Tensor
    key: torch.Tensor | None
    value: torch.Tensor | None
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None
    key_history: tuple[torch.Tensor, ...]
    value_history: tuple[torch.Tensor, ...]

    def args(self):
        """(query, key, value, kv_cache, metadata, attn_kind): the backend call's arguments."""
        return self.query, self.key, self.value, self.kv_cache, self.metadata, self.attn_kind

    def with_fresh_cache(self) -> Step:
        """The same step with its own copy of the caches (each backend writes its own)."""
        if self.kv_cache is None:
            return self
        return replace(self, kv_cache=copy_caches(self.kv_cache))

    def to(self, device: torch.device | str, copy: bool = False) -> Step:
        """On `device`; `copy=True` copies every tensor even where it is already there (a
        backend's private inputs: nothing it does to them reaches another backend)."""
        mv = lambda t: None if t is None else t.to(device, copy=copy)
        md = self.metadata
        md = replace(
            md,
            block_tables=mv(md.block_tables),
            slot_mapping=mv(md.slot_mapping),
            cross_block_tables=mv(md.cross_block_tables),
            cross_slot_mapping=mv(md.cross_slot_mapping),
            k_scale=mv(md.k_scale),
            relative_attention_bias=mv(md.relative_attention_bias),
            v_scale=mv(md.v_scale),
        )
        cache = self.kv_cache
        if cache is not None and (copy or not all(_on(c, device) for c in cache)):
            cache = copy_caches(cache, device)
        return replace(
            self,
            metadata=md,
            query=mv(self.query),
            key=mv(self.key),
            value=mv(self.value),
            kv_cache=cache,
        )


def pool_blocks(needed: int, layout: Layout | str) -> int:
    """Blocks in the pool of a step whose sequences need `needed` blocks, by `layout`."""
    layout = Layout(layout)
    if layout == Layout.FRAGMENTED:
        return 3 * needed + 1
    if layout == Layout.INTERLEAVED:
        return 2 * needed
    return max(needed + (1 if layout == Layout.NULL_BLOCK else 0), 1)


def allocate_blocks(
    blocks_per_seq: list[int], layout: Layout, gen: torch.Generator, shared_blocks: int = 0
) -> tuple[list[list[int]], int, list[int]]:
    """Pick physical blocks for each sequence's logical blocks.

    Returns (tables, num_blocks, foreign_blocks): tables[i][b] is sequence i's b-th block;
    foreign blocks belong to "another layer" and hold finite data that no read may pick up.
    With `shared_blocks` > 0 every sequence's first `shared_blocks` blocks are the same.
    """
    layout = Layout(layout)
    own = [n - shared_blocks for n in blocks_per_seq] if shared_blocks else blocks_per_seq
    needed = sum(own) + shared_blocks
    reserve = 1 if layout == Layout.NULL_BLOCK else 0
    num_blocks = pool_blocks(needed, layout)
    if layout in (Layout.SHUFFLED, Layout.SHARED_PREFIX):
        pool = torch.randperm(num_blocks, generator=gen, device=gen.device).tolist()
    elif layout == Layout.FRAGMENTED:
        pool = torch.randperm(num_blocks, generator=gen, device=gen.device)[:needed].tolist()
    elif layout == Layout.INTERLEAVED:
        pool = list(range(0, num_blocks, 2))
    elif layout == Layout.HIGHEST:
        pool = list(range(num_blocks - 1, -1, -1))
    else:
        pool = list(range(reserve, num_blocks))
    foreign = list(range(1, num_blocks, 2)) if layout == Layout.INTERLEAVED else []
    shared, pool = pool[:shared_blocks], pool[shared_blocks:]
    tables, at = [], 0
    for n in own:
        tables.append(shared + pool[at : at + n])
        at += n
    return tables, num_blocks, foreign


def _table_tensor(tables: list[list[int]], pad_to: int) -> torch.Tensor:
    """[num_seqs, max_blocks] int32; padding entries are 0 (the null block under NULL_BLOCK)."""
    width = max([len(t) for t in tables] + [pad_to, 1])
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def build_step(
    attn_kind: AttnKind | str,
    query_lens: tuple[int, ...],
    context_lens: tuple[int, ...] | None = None,
    encoder_seq_lens: tuple[int, ...] | None = None,
    *,
    block_size: int = 16,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_size: int = 64,
    dtype: torch.dtype = torch.float32,
    layout: Layout | str = Layout.CONTIGUOUS,
    sliding_window: int | None = None,
    scale: float | None = None,
    num_padding_tokens: int = 0,
    extra_table_entries: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    kv_format: KVFormat = AUTO,
    position_bias: PositionBias = NO_BIAS,
    cache_strides: CacheStrides | str = CacheStrides.CONTIGUOUS,
) -> Step:
    """A valid, deterministic step of `attn_kind` for the given lengths.

    query_lens: decoder tokens per sequence (for ENCODER: ignored, the tokens are encoder tokens)
    context_lens: decoder tokens already cached (default 0: a first step)
    encoder_seq_lens: encoder tokens per sequence (ENCODER and ENCODER_DECODER)
    num_padding_tokens: trailing padding rows (slot -1) appended to the new tokens
    extra_table_entries: padding entries appended to every block table (never read)
    kv_format: how the caches store K/V (fp8: quantized with its scales; the cached context is
        stored quantized, as an engine's earlier steps would have written it)
    position_bias: T5's relative position bias (encoder and decoder steps), its table drawn last
    cache_strides: how the two caches sit in memory (the same values, `with_strides`)
    """
    kind = AttnKind(attn_kind)
    layout = Layout(layout)
    num_kv_heads = num_kv_heads or num_heads
    # Drawn where the step lives: the CPU (the matrix: reproducible anywhere) or a GPU (the
    # bench's large workloads; other numbers for the same seed).
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(
        *shape, generator=gen, dtype=torch.float32, device=gen.device
    ).to(dtype)
    if kind == AttnKind.ENCODER:
        query_lens = (0,) * len(encoder_seq_lens)
    num_seqs = len(query_lens)
    context_lens = tuple(context_lens) if context_lens is not None else (0,) * num_seqs
    md = StepMetadata(
        query_lens=tuple(query_lens),
        context_lens=context_lens,
        encoder_seq_lens=tuple(encoder_seq_lens) if encoder_seq_lens is not None else None,
        block_size=block_size,
        sliding_window=sliding_window if kind == AttnKind.DECODER else None,
        scale=scale,
        **(kv_format.metadata() if kind != AttnKind.ENCODER else {}),
    )
    kv_lens = md.kv_lens_for(kind)
    # Shared prefix: decoder sequences with context share their whole common context blocks.
    shared_blocks = 0
    if layout == Layout.SHARED_PREFIX and kind == AttnKind.DECODER and num_seqs > 1:
        shared_blocks = min(context_lens) // block_size
    key_history = [randn(n, num_kv_heads, head_size) for n in kv_lens]
    value_history = [randn(n, num_kv_heads, head_size) for n in kv_lens]
    for i in range(1, num_seqs):
        n = shared_blocks * block_size
        key_history[i][:n] = key_history[0][:n]
        value_history[i][:n] = value_history[0][:n]

    num_q = sum(md.query_lens_for(kind)) + num_padding_tokens
    query = randn(num_q, num_heads, head_size)
    # Padding rows may hold anything (the spec ignores them): give them NaN and Inf, so a kernel
    # that lets one leak into a real row (even with weight zero: 0 * NaN) fails. Drawn first and
    # overwritten, so every other tensor stays what the seed gives.
    query[num_q - num_padding_tokens :] = float("nan")
    new_lens = md.new_kv_lens_for(kind)
    first_new = context_lens if kind == AttnKind.DECODER else (0,) * num_seqs
    new_k = [key_history[i][first_new[i] : first_new[i] + new_lens[i]] for i in range(num_seqs)]
    new_v = [value_history[i][first_new[i] : first_new[i] + new_lens[i]] for i in range(num_seqs)]
    num_kv_pad = num_padding_tokens if kind != AttnKind.ENCODER_DECODER or sum(new_lens) else 0
    pad = randn(num_kv_pad, num_kv_heads, head_size).fill_(float("inf"))
    key = torch.cat([*new_k, pad]) if kind != AttnKind.ENCODER_DECODER or sum(new_lens) else None
    value = (
        torch.cat([*new_v, randn(num_kv_pad, num_kv_heads, head_size).fill_(float("nan"))])
        if key is not None
        else None
    )
    if kind == AttnKind.ENCODER:
        md = replace(md, **position_bias.metadata(num_heads, dtype, gen))
        step = Step(kind, md, query, key, value, None, tuple(key_history), tuple(value_history))
        return step.to(device)

    blocks_per_seq = [-(-n // block_size) for n in kv_lens]
    tables, num_blocks, foreign = allocate_blocks(blocks_per_seq, layout, gen, shared_blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = kv_format.empty_cache(shape, dtype, gen.device)
    value_cache = kv_format.empty_cache(shape, dtype, gen.device)
    ks, vs = kv_format.k_scale, kv_format.v_scale
    for b in foreign:  # another layer's blocks: plausible numbers, wrong ones to read
        key_cache[b] = kv_format.stored(randn(block_size, num_kv_heads, head_size), ks)
        value_cache[b] = kv_format.stored(randn(block_size, num_kv_heads, head_size), vs)
    slots, cached, cached_k, cached_v = [], [], [], []
    for i in range(num_seqs):
        pos = torch.arange(kv_lens[i])
        slot = torch.tensor(tables[i], dtype=torch.long)[pos // block_size] * block_size
        slot += pos % block_size
        new = (pos >= first_new[i]) & (pos < first_new[i] + new_lens[i])
        slots += slot[new].tolist()
        cached.append(slot[~new])  # cached before this step
        cached_k.append(key_history[i][~new])
        cached_v.append(value_history[i][~new])
    cached = torch.cat(cached) if cached else torch.zeros(0, dtype=torch.long)
    if len(cached):  # written as the engine's earlier steps would have (fp8: quantized)
        flat = lambda c: c.view(-1, num_kv_heads, head_size)
        flat(key_cache)[cached] = kv_format.stored(torch.cat(cached_k), ks)
        flat(value_cache)[cached] = kv_format.stored(torch.cat(cached_v), vs)
    key_history = [kv_format.read(h, ks) for h in key_history]  # what attention reads
    value_history = [kv_format.read(h, vs) for h in value_history]
    slots += [-1] * num_kv_pad
    table_tensor = _table_tensor(tables, max(blocks_per_seq, default=0) + extra_table_entries)
    slot_tensor = torch.tensor(slots, dtype=torch.int64)
    if kind == AttnKind.DECODER:
        md = replace(md, block_tables=table_tensor, slot_mapping=slot_tensor,
                     **position_bias.metadata(num_heads, dtype, gen))  # fmt: skip
    else:
        md = replace(md, cross_block_tables=table_tensor, cross_slot_mapping=slot_tensor)
    step = Step(
        kind,
        md,
        query,
        key,
        value,
        with_strides((key_cache, value_cache), cache_strides),
        tuple(key_history),
        tuple(value_history),
    )
    return step.to(device)


# ---- episodes --------------------------------------------------------------------------------
# A whole encoder/decoder episode: encoder prefill → decoder prefill → N decode steps.
#
# The steps share one paged-cache pool: self-attention and cross-attention blocks are allocated from
# it together (so a wrong table reads the other layer's real data), and every step's `kv_cache` is
# that pool. `with_fresh_cache()` gives a backend its own pool, carried across the steps.


@dataclass(frozen=True, eq=False)
class Episode:
    """steps: encoder, then per decoder step a (DECODER, ENCODER_DECODER) pair, in order.
    kv_cache: the pool every cached step reads and writes, (key_cache, value_cache)."""

    steps: tuple[Step, ...]
    kv_cache: tuple[torch.Tensor, torch.Tensor]

    def with_fresh_cache(self) -> Episode:
        pool = copy_caches(self.kv_cache)
        steps = tuple(s if s.kv_cache is None else replace(s, kv_cache=pool) for s in self.steps)
        return Episode(steps, pool)

    def to(self, device, copy: bool = False) -> Episode:
        """On `device`, the steps still sharing one pool; `copy=True` copies every tensor."""
        moved = copy or not all(_on(c, device) for c in self.kv_cache)
        pool = copy_caches(self.kv_cache, device) if moved else self.kv_cache
        steps = tuple(
            replace(
                replace(s, kv_cache=None).to(device, copy),
                kv_cache=None if s.kv_cache is None else pool,
            )
            for s in self.steps
        )
        return Episode(steps, pool)


def build_episode(
    encoder_seq_lens: tuple[int, ...],
    prompt_lens: tuple[int, ...],
    num_decode_steps: int,
    *,
    block_size: int = 16,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_size: int = 64,
    dtype: torch.dtype = torch.float32,
    layout: Layout | str = Layout.INTERLEAVED,
    scale: float | None = None,
    sliding_window: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    kv_format: KVFormat = AUTO,
    position_bias: PositionBias = NO_BIAS,
    cache_strides: CacheStrides | str = CacheStrides.CONTIGUOUS,
) -> Episode:
    """A deterministic encoder/decoder episode: the ENCODER step over `encoder_seq_lens`, then
    for the decoder prefill (prompts of `prompt_lens`) and each of `num_decode_steps` decode
    steps a DECODER step followed by an ENCODER_DECODER step with the same metadata.

    The cross K/V are written at the prefill step (every context_len is 0 there) and only read
    afterwards; self and cross blocks come from one pool allocated by `layout` (interleaved by
    default, so a wrong table reads the other attention's real data). Every cache slot starts
    as NaN; `kv_format` says how the pool stores K/V (the decoder and cross steps carry it).
    Steps hold the contiguous K/V histories (as attention reads them) for the dense checks.
    `position_bias`: T5's, on the encoder step and the decoder self-attention steps (two tables,
    as T5's encoder and decoder have their own), drawn last; the cross steps have none."""
    num_kv_heads = num_kv_heads or num_heads
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=gen.device).to(dtype)
    kv = lambda n: randn(n, num_kv_heads, head_size)
    num_seqs = len(prompt_lens)
    final_lens = [p + num_decode_steps for p in prompt_lens]
    self_k, self_v = [kv(n) for n in final_lens], [kv(n) for n in final_lens]
    cross_k, cross_v = [kv(n) for n in encoder_seq_lens], [kv(n) for n in encoder_seq_lens]

    # One pool: each sequence's self blocks, then its cross blocks.
    self_blocks = [-(-n // block_size) for n in final_lens]
    cross_blocks = [-(-n // block_size) for n in encoder_seq_lens]
    tables, num_blocks, _ = allocate_blocks(self_blocks + cross_blocks, Layout(layout), gen)
    self_tables = _table_tensor(tables[:num_seqs], max(self_blocks) + 1)
    cross_tables = _table_tensor(tables[num_seqs:], max(cross_blocks) + 1)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    empty = lambda: kv_format.empty_cache(shape, dtype, gen.device)
    pool = with_strides((empty(), empty()), cache_strides)
    read_k = lambda hist: [kv_format.read(h, kv_format.k_scale) for h in hist]
    read_v = lambda hist: [kv_format.read(h, kv_format.v_scale) for h in hist]
    self_read_k, self_read_v = read_k(self_k), read_v(self_v)
    cross_read_k, cross_read_v = read_k(cross_k), read_v(cross_v)

    def slots(table_list, first, count):
        return torch.tensor(
            [
                table_list[i][p // block_size] * block_size + p % block_size
                for i in range(num_seqs)
                for p in range(first[i], first[i] + count[i])
            ],
            dtype=torch.int64,
        )

    enc_md = StepMetadata(
        query_lens=(0,) * num_seqs,
        context_lens=(0,) * num_seqs,
        encoder_seq_lens=tuple(encoder_seq_lens),
        block_size=block_size,
        scale=scale,
    )
    enc_tokens = sum(encoder_seq_lens)
    enc_hist_k = [kv(n) for n in encoder_seq_lens]
    enc_hist_v = [kv(n) for n in encoder_seq_lens]
    steps = [
        Step(
            AttnKind.ENCODER,
            enc_md,
            randn(enc_tokens, num_heads, head_size),
            torch.cat(enc_hist_k),
            torch.cat(enc_hist_v),
            None,
            tuple(enc_hist_k),
            tuple(enc_hist_v),
        )
    ]
    context = (0,) * num_seqs
    query_lens = tuple(prompt_lens)
    for t in range(num_decode_steps + 1):
        md = StepMetadata(
            query_lens=query_lens,
            context_lens=context,
            block_size=block_size,
            encoder_seq_lens=tuple(encoder_seq_lens),
            block_tables=self_tables,
            slot_mapping=slots(tables[:num_seqs], context, query_lens),
            cross_block_tables=cross_tables,
            cross_slot_mapping=slots(
                tables[num_seqs:], (0,) * num_seqs, encoder_seq_lens if t == 0 else (0,) * num_seqs
            ),
            sliding_window=sliding_window,
            scale=scale,
            **kv_format.metadata(),
        )
        seq_lens = md.seq_lens
        new_k = torch.cat([self_k[i][context[i] : seq_lens[i]] for i in range(num_seqs)])
        new_v = torch.cat([self_v[i][context[i] : seq_lens[i]] for i in range(num_seqs)])
        num_q = sum(query_lens)
        steps.append(
            Step(
                AttnKind.DECODER,
                md,
                randn(num_q, num_heads, head_size),
                new_k,
                new_v,
                pool,
                tuple(k[:n] for k, n in zip(self_read_k, seq_lens)),
                tuple(v[:n] for v, n in zip(self_read_v, seq_lens)),
            )
        )
        first = t == 0
        steps.append(
            Step(
                AttnKind.ENCODER_DECODER,
                md,
                randn(num_q, num_heads, head_size),
                torch.cat(cross_k) if first else None,
                torch.cat(cross_v) if first else None,
                pool,
                tuple(cross_read_k),
                tuple(cross_read_v),
            )
        )
        context, query_lens = seq_lens, (1,) * num_seqs
    if position_bias.kind != "none":  # drawn after everything else: the tensors above unchanged
        enc_bias = position_bias.metadata(num_heads, dtype, gen)
        dec_bias = position_bias.metadata(num_heads, dtype, gen)
        steps = [
            s if s.attn_kind == AttnKind.ENCODER_DECODER
            else replace(s, metadata=replace(s.metadata, **(
                enc_bias if s.attn_kind == AttnKind.ENCODER else dec_bias)))
            for s in steps
        ]  # fmt: skip
    return Episode(tuple(steps), pool).to(device)
