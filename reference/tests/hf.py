"""Hugging Face's T5 bucket function, written again in NumPy from its definition (not from the
spec's code), and what it computes: the tests' independent witness for reference/position_bias.py.

HF: bidirectional tables give half their buckets (rounded down) to keys after the query;
distances below max_exact (half a direction's buckets) get a bucket each, farther ones
max_exact + trunc(log(d / max_exact) / log(max_distance / max_exact) * (buckets - max_exact))
in float32, capped at the direction's last bucket."""

import math

import numpy as np


def hf_bucket(relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int):
    """The bucket of each key-minus-query position; raises ZeroDivisionError where HF does."""
    relative = np.asarray(relative, dtype=np.int64)
    out = np.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        out += (relative > 0).astype(np.int64) * n
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    exact = n // 2
    ratio = math.log(max_distance / exact)  # HF divides by this (ZeroDivisionError at exact 0)
    with np.errstate(all="ignore"):
        scaled = np.log(distance.astype(np.float32) / np.float32(exact)) / np.float32(ratio)
        far = exact + (scaled * np.float32(n - exact)).astype(np.int64)
    far = np.minimum(far, n - 1)
    return out + np.where(distance < exact, distance, far)


def hf_computes(num_buckets: int, max_distance: int, bidirectional: bool) -> bool:
    """HF gives every position a row of the table: no error, every bucket in [0, buckets), for
    any sequence length (positions up to 10^6 apart)."""
    far = np.unique(np.logspace(0, 6, 200).astype(np.int64))  # the far buckets are monotone
    positions = np.concatenate([np.arange(-300, 301), far, -far])
    try:
        b = hf_bucket(positions, bidirectional, num_buckets, max_distance)
    except ZeroDivisionError:
        return False
    return bool(((b >= 0) & (b < num_buckets)).all())
