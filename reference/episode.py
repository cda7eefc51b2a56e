"""A whole encoder/decoder episode: encoder prefill → decoder prefill → N decode steps.

The steps share one paged-cache pool: self-attention and cross-attention blocks are allocated from
it together (so a wrong table reads the other layer's real data), and every step's `kv_cache` is
that pool. `with_fresh_cache()` gives a backend its own pool, carried across the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from reference.metadata import AttnKind, StepMetadata
from reference.workload import Layout, Step, _table_tensor, allocate_blocks


@dataclass(frozen=True, eq=False)
class Episode:
    """steps: encoder, then per decoder step a (DECODER, ENCODER_DECODER) pair, in order.
    kv_cache: the pool every cached step reads and writes, (key_cache, value_cache)."""

    steps: tuple[Step, ...]
    kv_cache: tuple[torch.Tensor, torch.Tensor]

    def with_fresh_cache(self) -> Episode:
        pool = tuple(c.clone() for c in self.kv_cache)
        steps = tuple(s if s.kv_cache is None else replace(s, kv_cache=pool) for s in self.steps)
        return Episode(steps, pool)

    def to(self, device, copy: bool = False) -> Episode:
        """On `device`, the steps still sharing one pool; `copy=True` copies every tensor."""
        pool = tuple(c.to(device, copy=copy) for c in self.kv_cache)
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
) -> Episode:
    num_kv_heads = num_kv_heads or num_heads
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
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
    pool = (
        torch.full(shape, float("nan"), dtype=dtype),
        torch.full(shape, float("nan"), dtype=dtype),
    )

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
                tuple(k[:n] for k, n in zip(self_k, seq_lens)),
                tuple(v[:n] for v, n in zip(self_v, seq_lens)),
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
                tuple(cross_k),
                tuple(cross_v),
            )
        )
        context, query_lens = seq_lens, (1,) * num_seqs
    return Episode(tuple(steps), pool).to(device)
