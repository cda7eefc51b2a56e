"""T5's relative position bias (`position_bias = "t5"`): the spec.

T5 (and Flan-T5, mT5, UL2) adds a learned bias to every score of encoder and decoder
self-attention; cross-attention takes none. With a table `[num_buckets, num_heads]` (the model's
`relative_attention_bias.weight`, in the model dtype), query position i and key position j:

    score(i, j, h) = q_i · k_j * scale + table[bucket(j - i), h]

before the mask and the softmax (a sliding window still applies). Positions: an encoder
sequence's tokens are 0..n-1; a decoder query sits at its absolute position (context_len + its
index in the step), a cached key at its own. `bucket` is Hugging Face's
`T5Attention._relative_position_bucket`, computed as it computes it (a float32 log), so that
every boundary lands where the model's does:

- bidirectional (the encoder): half the buckets for keys after the query, half for keys at or
  before it; unidirectional (the decoder): keys after the query all get bucket 0 (they are
  masked anyway), keys before it by distance.
- distances below `max_exact` (half the buckets of a direction) get a bucket each; farther ones
  share log-spaced buckets up to `max_distance`; everything beyond is the last bucket.
- any configuration Hugging Face's function computes is accepted (an odd bidirectional table
  included: its last row is never read); `config_problem` says why one is not.

Worked example, 32 buckets, max_distance 128 (checked by reference/tests/test_position_bias.py):

    bidirectional:   j - i = 0 → 0, -1 → 1, +1 → 17, -7 → 7, +7 → 23, -8 → 8, +8 → 24,
                     -12 → 9 (8 + trunc(8·log(12/8)/log(16)) = 8 + 1), -100 → 15, +1000 → 31
    unidirectional:  j - i = 0 → 0, +3 → 0, -1 → 1, -15 → 15, -16 → 16, -20 → 17,
                     -64 → 26 (16 + trunc(16·log(4)/log(8)) = 16 + 10), -1000 → 31
"""

from __future__ import annotations

import math

import torch

POSITION_BIASES = ("none", "t5")


def config_problem(num_buckets: int, max_distance: int, bidirectional: bool) -> str:
    """'' when Hugging Face's bucket function computes this configuration, else why it cannot.
    Per direction (half the buckets when bidirectional, rounded down: an odd table leaves its
    last row unused) it needs an exact bucket (`max_exact` = that half of them, at least 1) and
    a `max_distance` beyond it: the far buckets divide by log(max_distance / max_exact), which
    must be positive (zero divides by zero; negative gives negative buckets)."""
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    way = "bidirectional: half of them a direction, " if bidirectional else ""
    if max_exact < 1:
        least = 4 if bidirectional else 2
        return (f"relative_attention_num_buckets: {num_buckets} leaves no exact bucket ({way}half "
                f"of those exact); expected at least {least}")  # fmt: skip
    if max_distance <= max_exact:
        return (f"relative_attention_max_distance: {max_distance} is not beyond the {max_exact} "
                f"exact buckets of {num_buckets} ({way}half of those exact): log(max_distance / "
                f"max_exact) must be positive")  # fmt: skip
    return ""


def relative_position_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    log_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The bucket of each `relative_position` (key position - query position), int64.
    `log_dtype`: the model's float32; another shows what a kernel computing it so would get."""
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    # float32, as the model computes it: log(distance / max_exact) / log(max_distance / max_exact)
    log_ratio = torch.log(distance.to(log_dtype) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    far = torch.clamp(far, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


def bias(
    table: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> torch.Tensor:
    """[num_heads, queries, keys] float64: table[bucket(key - query), head]."""
    relative = key_positions[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    return table.double()[buckets.to(table.device)].permute(2, 0, 1)


def lookup_table(
    table: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[torch.Tensor, int]:
    """For kernels: (lut [num_heads, 2 * reach + 1] float32, reach) with lut[h, d + reach] the
    bias of distance d, for d clamped to [-reach, reach]: every distance beyond max_distance + 1
    has the last bucket of its direction, so the clamp is exact."""
    reach = max_distance + 1
    relative = torch.arange(-reach, reach + 1)
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    return table.float()[buckets.to(table.device)].t().contiguous(), reach
