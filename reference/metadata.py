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
Validation of a step (every rule a ValueError naming the argument) is `reference/validation.py`.

Worked example (checked by reference/tests/test_worked_example.py), block_size = 4. Sequence 0
takes its first decoder step: a prompt of 3 tokens, 5 encoder tokens. Sequence 1 decodes: 6
tokens cached, 1 new, 2 encoder tokens (its cross K/V were written at its own first step).

    query_lens = (3, 1)   context_lens = (0, 6)   encoder_seq_lens = (5, 2)
    query rows: 0, 1, 2 = sequence 0 at positions 0, 1, 2; row 3 = sequence 1 at position 6;
                query_start_loc = (0, 3, 4); a 5th row would be padding (slot -1, output 0)

    DECODER: seq_lens = (3, 7); block_tables = [[2, 0], [5, 1]] (sequence 1 needs
      ceil(7 / 4) = 2 blocks: 5 holds positions 0-3, 1 holds 4-7; the 0 of row 0 is padding)
      slot_mapping = [8, 9, 10, 6]: 2*4+0, 2*4+1, 2*4+2, and position 6 = block 1 offset 2
      row 1 (sequence 0, position 1) sees positions 0..1; row 3 sees 0..6 (window 4: 3..6)
    ENCODER_DECODER: only sequence 0 has context_len == 0, so cross_write_lens = (5, 0): `key`
      and `value` hold its 5 encoder tokens; cross_block_tables = [[3, 4], [7, 0]] and
      cross_slot_mapping = [12, 13, 14, 15, 16] (block 3 offsets 0-3, block 4 offset 0);
      sequence 1's 2 cross tokens in block 7 are only read. Rows 0-2 see 5 encoder tokens,
      row 3 sees 2. Writing either cache into a slot that holds another sequence's cached
      context (e.g. slot 20-23 of block 5) is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from itertools import accumulate

import torch


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
    kv_cache_dtype:      how the caches store K/V: auto (the model dtype), fp8_e4m3, fp8_e5m2
                         (reference/fp8.py: the write and read rules)
    k_scale, v_scale:    fp8 only: float32 [1] (per tensor) or [num_kv_heads] (per kv head);
                         stored = fp8(clamp(x / scale)), read = stored * scale
    position_bias:       none, or t5: T5's relative position bias on encoder and decoder
                         self-attention (reference/position_bias.py), with
    relative_attention_bias:          its table [num_buckets, num_heads], the model dtype
    relative_attention_num_buckets,
    relative_attention_max_distance:  the model config's values (32 and 128 in T5)
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
    kv_cache_dtype: str = "auto"
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    position_bias: str = "none"
    relative_attention_bias: torch.Tensor | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

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

    @property
    def fp8(self) -> bool:
        """The caches store K/V in fp8 (with k_scale / v_scale)."""
        return self.kv_cache_dtype != "auto"

    def position_bias_for(self, kind: AttnKind, seq: int) -> torch.Tensor | None:
        """[num_heads, query_len, kv_len] float64 added to sequence `seq`'s scaled scores, or
        None: T5's bias (bidirectional for the encoder, unidirectional for decoder
        self-attention) over the queries' and keys' positions."""
        if self.position_bias == "none":
            return None
        from reference.position_bias import bias

        q_len, kv_len = self.query_lens_for(kind)[seq], self.kv_lens_for(kind)[seq]
        first = self.context_lens[seq] if kind == AttnKind.DECODER else 0
        return bias(self.relative_attention_bias, first + torch.arange(q_len),
                    torch.arange(kv_len), kind == AttnKind.ENCODER,
                    self.relative_attention_num_buckets,
                    self.relative_attention_max_distance)  # fmt: skip

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
