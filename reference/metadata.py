"""Step metadata: what one engine step of one attention layer looks like, and its validation.

One `StepMetadata` describes a packed batch of `num_seqs` sequences for all three attention kinds;
each kind reads the fields it needs:

- ENCODER: the step's tokens are encoder tokens, `encoder_seq_lens[i]` of sequence i, packed.
  Every token sees every token of its own sequence. No cache.
- DECODER (self-attention): sequence i has `context_lens[i]` tokens already in the paged cache and
  `query_lens[i]` new tokens. The new tokens' K/V are written to `slot_mapping`; query token j of
  sequence i sits at absolute position `p = context_lens[i] + j` and sees positions `0..p`
  (with a sliding window `w`: only positions `> p - w`), read through `block_tables[i]`.
- ENCODER_DECODER (cross-attention): decoder tokens (`query_lens`) see all `encoder_seq_lens[i]`
  encoder tokens of their sequence (no causal mask). A sequence's cross K/V are written once, at
  its first decoder step (`context_lens[i] == 0`), to `cross_slot_mapping`; afterwards they are
  only read, through `cross_block_tables[i]`.

Packing: tokens of sequence 0 come first, then sequence 1, ... Engines put prefill sequences
(a prompt, or a chunk of one) before decode sequences (one token on top of a cached context);
the semantics do not depend on that order, so it is not enforced (a 1-token chunk looks like a
decode). Rows after the last real token are padding (a CUDA-graph-sized batch): their slots
are -1, they are never written, and their output is zero.

The paged cache: `key_cache`/`value_cache: [num_blocks, block_size, num_kv_heads, head_size]`,
slot `s = block_id * block_size + offset`. See `reference/paged_cache.py` for a worked example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from itertools import accumulate

import torch

# float64 is accepted (the reference computes in it); backends list what they support.
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class AttnKind(StrEnum):
    ENCODER = "encoder"
    DECODER = "decoder"
    ENCODER_DECODER = "encoder_decoder"


def _offsets(lens: tuple[int, ...]) -> tuple[int, ...]:
    """[0, l0, l0+l1, ...]: where each sequence starts in the packed tokens (len num_seqs+1)."""
    return (0, *accumulate(lens))


@dataclass(frozen=True, eq=False)
class StepMetadata:
    """Lengths, offsets and paged-cache addressing of one step.

    query_lens:          [num_seqs] new decoder tokens per sequence (1 at decode)
    context_lens:        [num_seqs] decoder tokens already cached before this step
    encoder_seq_lens:    [num_seqs] encoder tokens per sequence, or None (decoder-only step)
    block_size:          tokens per cache block
    block_tables:        [num_seqs, max_blocks_per_seq] int, self-attention cache blocks; entries
                         past a sequence's last needed block are padding and never read
    slot_mapping:        [num_tokens] int, cache slot of each new decoder token, -1 = not written
    cross_block_tables:  [num_seqs, max_cross_blocks_per_seq] int, cross-attention cache blocks
    cross_slot_mapping:  [num_encoder_tokens] int, cross cache slot of each new encoder token
    sliding_window:      decoder self-attention window w (position p sees positions > p - w)
    scale:               softmax scale; None means 1/sqrt(head_size)
    """

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_size: int = 16
    encoder_seq_lens: tuple[int, ...] | None = None
    block_tables: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    cross_block_tables: torch.Tensor | None = None
    cross_slot_mapping: torch.Tensor | None = None
    sliding_window: int | None = None
    scale: float | None = None

    # ---- derived sizes and offsets -------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Decoder tokens per sequence after this step (context + new)."""
        return tuple(c + q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def query_start_loc(self) -> tuple[int, ...]:
        """[num_seqs + 1] offsets of each sequence's decoder tokens in `query`."""
        return _offsets(self.query_lens)

    @property
    def encoder_start_loc(self) -> tuple[int, ...]:
        """[num_seqs + 1] offsets of each sequence's encoder tokens in an ENCODER step."""
        return _offsets(self.encoder_seq_lens or ())

    @property
    def cross_write_lens(self) -> tuple[int, ...]:
        """Encoder tokens whose cross K/V this step writes: all of them at a sequence's first
        decoder step (context_len == 0), none afterwards."""
        assert self.encoder_seq_lens is not None
        return tuple(e if c == 0 else 0 for e, c in zip(self.encoder_seq_lens, self.context_lens))

    @property
    def cross_kv_start_loc(self) -> tuple[int, ...]:
        """[num_seqs + 1] offsets of each sequence's new encoder tokens in cross `key`/`value`."""
        return _offsets(self.cross_write_lens)

    def scale_for(self, head_size: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_size)

    def query_lens_for(self, kind: AttnKind) -> tuple[int, ...]:
        """Query tokens per sequence: encoder tokens for ENCODER, decoder tokens otherwise."""
        return self.encoder_seq_lens if kind == AttnKind.ENCODER else self.query_lens

    def kv_lens_for(self, kind: AttnKind) -> tuple[int, ...]:
        """Keys each sequence's queries attend over (its whole visible K/V history)."""
        if kind == AttnKind.DECODER:
            return self.seq_lens
        return self.encoder_seq_lens

    def is_prefill_only(self) -> bool:
        """True when no sequence has cached decoder context (a first step for every sequence)."""
        return all(c == 0 for c in self.context_lens)

    # ---- the masks ------------------------------------------------------------------------
    def sequence_mask(self, kind: AttnKind, seq: int) -> torch.Tensor:
        """[query_len, kv_len] bool for sequence `seq`, True = query token j sees key position p.

        ENCODER / ENCODER_DECODER: every key of the sequence (no mask).
        DECODER: query token j sits at absolute position pos = context_len + j; it sees
        p <= pos (causal) and, with a sliding window w, only p > pos - w.
        """
        q_len, kv_len = self.query_lens_for(kind)[seq], self.kv_lens_for(kind)[seq]
        if kind != AttnKind.DECODER:
            return torch.ones(q_len, kv_len, dtype=torch.bool)
        pos = self.context_lens[seq] + torch.arange(q_len)[:, None]  # each query's position
        key_pos = torch.arange(kv_len)[None, :]
        mask = key_pos <= pos
        if self.sliding_window is not None:
            mask &= key_pos > pos - self.sliding_window
        return mask

    def materialize(self, kind: AttnKind) -> torch.Tensor:
        """Dense boolean mask `[num_real_query_tokens, sum(kv_lens)]`, True = visible.

        Rows are the packed query tokens; columns are every sequence's whole K/V history packed
        the same way (sequence 0's positions 0..kv_len-1, then sequence 1's, ...): block
        diagonal, each block `sequence_mask(kind, i)`.
        """
        q_lens, kv_lens = self.query_lens_for(kind), self.kv_lens_for(kind)
        mask = torch.zeros(sum(q_lens), sum(kv_lens), dtype=torch.bool)
        q0s, k0s = _offsets(q_lens), _offsets(kv_lens)
        for i in range(self.num_seqs):
            mask[q0s[i] : q0s[i + 1], k0s[i] : k0s[i + 1]] = self.sequence_mask(kind, i)
        return mask

    def tables_for(self, kind: AttnKind) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(block_tables, slot_mapping) that `kind` reads and writes (None for ENCODER)."""
        if kind == AttnKind.DECODER:
            return self.block_tables, self.slot_mapping
        if kind == AttnKind.ENCODER_DECODER:
            return self.cross_block_tables, self.cross_slot_mapping
        return None, None

    def new_kv_lens_for(self, kind: AttnKind) -> tuple[int, ...]:
        """New K/V tokens per sequence that this step brings for `kind`."""
        if kind == AttnKind.ENCODER:
            return self.encoder_seq_lens
        if kind == AttnKind.DECODER:
            return self.query_lens
        return self.cross_write_lens

    def new_kv_positions(self, kind: AttnKind) -> list[tuple[int, int]]:
        """(sequence, absolute position) of every real new K/V token, in packed order."""
        first = self.context_lens if kind == AttnKind.DECODER else (0,) * self.num_seqs
        return [
            (i, first[i] + j) for i, n in enumerate(self.new_kv_lens_for(kind)) for j in range(n)
        ]


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"{name}: {msg}")


def _lens(name: str, lens, num_seqs: int | None, minimum: int) -> None:
    if lens is None:
        raise _err(name, "is required for this attention kind")
    if num_seqs is not None and len(lens) != num_seqs:
        raise _err(name, f"has {len(lens)} entries, expected num_seqs={num_seqs}")
    for i, n in enumerate(lens):
        if not isinstance(n, int) or n < minimum:
            raise _err(name, f"entry {i} is {n!r}, expected an int >= {minimum}")


def _check_tensor(name, t, shape, device, dtype=None, dtypes=None) -> None:
    """Shape (None = any size in that dim), device and dtype of one tensor, with a clear error."""
    if not isinstance(t, torch.Tensor):
        raise _err(name, f"expected a tensor of shape {list(shape)}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise _err(name, f"expected shape [{want}], got {list(t.shape)}")
    if t.device != device:
        raise _err(name, f"expected device {device}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise _err(name, f"expected dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise _err(name, f"expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_paging(md, kind, num_blocks, num_new_tokens, device) -> None:
    """Tables and slots of `kind` against the cache size and each other."""
    tname = "block_tables" if kind == AttnKind.DECODER else "cross_block_tables"
    sname = "slot_mapping" if kind == AttnKind.DECODER else "cross_slot_mapping"
    tables, slots = md.tables_for(kind)
    if tables is None:
        raise _err(tname, f"is required for {kind.value} attention")
    if slots is None:
        raise _err(sname, f"is required for {kind.value} attention")
    if tables.dim() != 2 or tables.shape[0] != md.num_seqs:
        raise _err(
            tname,
            f"expected shape [num_seqs={md.num_seqs}, max_blocks_per_seq], "
            f"got {list(tables.shape)}",
        )
    if tables.dtype not in (torch.int32, torch.int64) or slots.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise _err(f"{tname}/{sname}", f"expected int32 or int64, got {tables.dtype}/{slots.dtype}")
    for name, t in ((tname, tables), (sname, slots)):
        if t.device != device:
            raise _err(name, f"expected device {device}, got {t.device}")
    if slots.dim() != 1 or slots.shape[0] != num_new_tokens:
        raise _err(
            sname,
            f"expected shape [{num_new_tokens}] (one slot per new K/V token), "
            f"got {list(slots.shape)}",
        )
    bs, kv_lens = md.block_size, md.kv_lens_for(kind)
    tab, slot_list = tables.cpu().tolist(), slots.cpu().tolist()
    for i, n in enumerate(kv_lens):
        need = -(-n // bs)
        if need > tables.shape[1]:
            raise _err(
                tname,
                f"sequence {i} holds {n} tokens = {need} blocks of {bs}, "
                f"but its table has only {tables.shape[1]} entries",
            )
        for b in range(need):
            if not 0 <= tab[i][b] < num_blocks:
                raise _err(
                    tname,
                    f"entry [{i}, {b}] = {tab[i][b]} is outside the cache "
                    f"(expected 0 <= block < num_blocks={num_blocks})",
                )
    positions = md.new_kv_positions(kind)
    seen: set[int] = set()
    for t, s in enumerate(slot_list):
        if s == -1:
            if t < len(positions):
                i, p = positions[t]
                raise _err(
                    sname,
                    f"entry {t} is -1 (padding) but is token {p} of sequence {i}, "
                    "which this step attends to: it must be written",
                )
            continue
        if not 0 <= s < num_blocks * bs:
            raise _err(
                sname,
                f"entry {t} = {s} is past the cache (expected -1 or "
                f"0 <= slot < num_blocks*block_size={num_blocks * bs})",
            )
        if t >= len(positions):
            raise _err(sname, f"entry {t} = {s} belongs to a padding token; expected -1")
        i, p = positions[t]
        want = tab[i][p // bs] * bs + p % bs
        if s != want:
            raise _err(
                sname,
                f"entry {t} = {s} is not where sequence {i} keeps position {p}: "
                f"its table puts it in slot {want} (block {tab[i][p // bs]}, "
                f"offset {p % bs}); a slot inside another sequence's block?",
            )
        if s in seen:
            raise _err(sname, f"slot {s} is written twice")
        seen.add(s)


def check_inputs(query, key, value, kv_cache, md: StepMetadata, kind: AttnKind) -> None:
    """Validate one step's tensors and metadata; raise ValueError naming the bad argument.

    query:    [num_tokens, num_heads, head_size]
    key:      [num_kv_tokens, num_kv_heads, head_size] or None (cross-attention decode)
    value:    like key
    kv_cache: (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_size];
              None for ENCODER
    Every backend calls this first, so bad input gives the same error everywhere.
    """
    kind = AttnKind(kind)
    if not isinstance(md, StepMetadata):
        raise _err("metadata", f"expected StepMetadata, got {type(md).__name__}")
    if not isinstance(md.block_size, int) or md.block_size < 1:
        raise _err("block_size", f"expected an int >= 1, got {md.block_size!r}")
    _lens("query_lens", md.query_lens, None, 1 if kind != AttnKind.ENCODER else 0)
    _lens("context_lens", md.context_lens, md.num_seqs, 0)
    if kind != AttnKind.DECODER:
        _lens("encoder_seq_lens", md.encoder_seq_lens, md.num_seqs, 1)
    if md.sliding_window is not None and (
        not isinstance(md.sliding_window, int) or md.sliding_window < 1
    ):
        raise _err("sliding_window", f"expected None or an int >= 1, got {md.sliding_window!r}")
    if md.scale is not None and not (
        isinstance(md.scale, float) and math.isfinite(md.scale) and md.scale > 0
    ):
        raise _err("scale", f"expected None or a finite float > 0, got {md.scale!r}")

    _check_tensor(
        "query",
        query,
        (None, None, None),
        query.device if isinstance(query, torch.Tensor) else None,
        dtypes=SUPPORTED_DTYPES,
    )
    num_tokens, num_heads, head_size = query.shape
    real_tokens = sum(md.query_lens_for(kind))
    if num_tokens < real_tokens:
        lname = "encoder_seq_lens" if kind == AttnKind.ENCODER else "query_lens"
        raise _err("query", f"has {num_tokens} tokens but {lname} sum to {real_tokens}")
    new_kv = sum(md.new_kv_lens_for(kind))
    needs_kv = kind != AttnKind.ENCODER_DECODER or new_kv > 0
    if not needs_kv and (key is not None or value is not None):
        raise _err(
            "key/value",
            "must be None at cross-attention decode (no sequence has "
            "context_len == 0): the cross cache is only read",
        )
    if needs_kv and (key is None or value is None):
        raise _err(
            "key/value",
            f"are required for {kind.value} attention at this step ({new_kv} new K/V tokens)",
        )
    num_kv_heads = None
    if needs_kv:
        _check_tensor("key", key, (None, None, head_size), query.device, dtype=query.dtype)
        num_kv_tokens, num_kv_heads = key.shape[0], key.shape[1]
        _check_tensor("value", value, tuple(key.shape), query.device, dtype=query.dtype)
        if kind == AttnKind.ENCODER and num_kv_tokens != num_tokens:
            raise _err("key", f"encoder key has {num_kv_tokens} tokens, query has {num_tokens}")
        if kind == AttnKind.DECODER and num_kv_tokens != num_tokens:
            raise _err("key", f"decoder key has {num_kv_tokens} tokens, query has {num_tokens}")
        if num_kv_tokens < new_kv:
            raise _err(
                "key",
                f"has {num_kv_tokens} tokens, expected at least {new_kv} "
                "(the new K/V tokens of this step)",
            )
    if kind == AttnKind.ENCODER:
        if kv_cache is not None:
            raise _err("kv_cache", "must be None for encoder attention (no cache)")
    else:
        if not (isinstance(kv_cache, tuple | list) and len(kv_cache) == 2):
            raise _err("kv_cache", "expected a (key_cache, value_cache) pair")
        key_cache, value_cache = kv_cache
        kv_h = num_kv_heads
        _check_tensor(
            "key_cache",
            key_cache,
            (None, md.block_size, kv_h, head_size),
            query.device,
            dtype=query.dtype,
        )
        _check_tensor(
            "value_cache", value_cache, tuple(key_cache.shape), query.device, dtype=query.dtype
        )
        num_kv_heads = key_cache.shape[2]
        num_kv_tokens = key.shape[0] if key is not None else 0
        _check_paging(md, kind, key_cache.shape[0], num_kv_tokens, query.device)
    if num_kv_heads is not None and (num_kv_heads < 1 or num_heads % num_kv_heads):
        raise _err("num_kv_heads", f"{num_kv_heads} does not divide num_heads={num_heads}")
