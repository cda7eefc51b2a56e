"""Every bad-input rule gives a ValueError naming the argument and what was expected."""

import math
from dataclasses import replace

import pytest
import torch

from conformance.workloads import build_step
from reference import attention


def _decoder():
    return build_step("decoder", (3, 1), (0, 5), block_size=4, num_heads=4, num_kv_heads=2)


def _cross_decode():
    return build_step("encoder_decoder", (1,), (4,), (6,), block_size=4)


def _poke(t, x):
    t = t.clone()
    t[1, 0, 3] = x
    return t


def _slots_on_table(table, positions, bs):
    return torch.tensor([int(table[p // bs]) * bs + p % bs for p in positions], device=table.device)


def bad_args(step, **changes) -> dict:
    """The step's forward() arguments with `changes` applied (metadata fields by name)."""
    args = dict(zip(["query", "key", "value", "kv_cache", "metadata", "attn_kind"], step.args()))
    md_changes = {k: v for k, v in changes.items() if k not in args}
    args.update({k: v for k, v in changes.items() if k in args})
    args["metadata"] = replace(args["metadata"], **md_changes)
    return args


def _fp8(step, **changes) -> dict:
    """The step's inputs as an fp8_e4m3 step (caches converted, scales per tensor), then
    `changes`."""
    base = dict(
        kv_cache_dtype="fp8_e4m3",
        kv_cache=tuple(c.to(torch.float8_e4m3fn) for c in step.kv_cache),
        k_scale=torch.ones(1),
        v_scale=torch.ones(1),
    )
    return {**base, **changes}


def _call(step, **changes):
    return attention(**bad_args(step, **changes))


CASES = [
    (
        "lengths that do not sum",
        lambda s: dict(query_lens=(4, 1)),
        r"query: has 4 tokens but query_lens sum to 5",
    ),
    ("negative context", lambda s: dict(context_lens=(0, -1)), r"context_lens: entry 1"),
    ("lengths disagree", lambda s: dict(context_lens=(0,)), r"context_lens: has 1 entries"),
    (
        "table entry outside",
        lambda s: dict(block_tables=s.metadata.block_tables + 100),
        r"block_tables: entry \[0, 0\] = 10\d is outside the cache",
    ),
    (
        "slot past the cache",
        lambda s: dict(slot_mapping=torch.tensor([0, 1, 2, 10_000])),
        r"slot_mapping: entry 3 = 10000 is past the cache",
    ),
    (
        "slot in another sequence's block",
        lambda s: dict(slot_mapping=s.metadata.slot_mapping.flip(0)),
        r"slot_mapping: entry 0 = \d+ is not where sequence 0 keeps position 0",
    ),
    (
        "real token padded",
        lambda s: dict(slot_mapping=torch.tensor([0, 1, -1, 9])),
        r"slot_mapping: entry 2 is -1 \(padding\) but is token 2 of sequence 0",
    ),
    (
        "too long for table",
        lambda s: dict(block_tables=s.metadata.block_tables[:, :1]),
        r"block_tables: sequence 1 holds 6 tokens = 2 blocks of 4, but its table has only 1",
    ),
    (
        "heads do not divide",
        lambda s: dict(query=torch.randn(4, 3, 64)),
        r"num_kv_heads: 2 does not divide num_heads=3",
    ),
    ("wrong dtype", lambda s: dict(query=s.query.half()), r"key: expected dtype torch.float16"),
    ("integer query", lambda s: dict(query=s.query.int()), r"query: expected dtype in"),
    (
        "wrong head size",
        lambda s: dict(key=s.key[..., :32]),
        r"key: expected shape \[\*, \*, 64\]",
    ),
    (
        "wrong cache shape",
        lambda s: dict(kv_cache=(s.kv_cache[0][:, :2], s.kv_cache[1])),
        r"key_cache: expected shape \[\*, 4, 2, 64\]",
    ),
    ("missing key", lambda s: dict(key=None), r"key/value: are required for decoder"),
    (
        "bad window",
        lambda s: dict(sliding_window=0),
        r"sliding_window: expected None or an int",
    ),
    ("bad scale", lambda s: dict(scale=-1.0), r"scale: expected None or a finite float > 0"),
    ("bad block size", lambda s: dict(block_size=0), r"block_size: expected an int >= 1"),
    ("missing table", lambda s: dict(block_tables=None), r"block_tables: is required"),
    (
        "float table",
        lambda s: dict(block_tables=s.metadata.block_tables.float()),
        r"block_tables: expected dtype int32 or int64",
    ),
    (
        "slots length",
        lambda s: dict(slot_mapping=s.metadata.slot_mapping[:3]),
        r"slot_mapping: expected shape \[4\]",
    ),
    (
        "slot written twice",
        lambda s: dict(
            context_lens=(0, 0),
            query_lens=(3, 1),
            slot_mapping=torch.tensor([0, 1, 2, 0]),
            block_tables=torch.tensor([[0, 0], [0, 0]], dtype=torch.int32),
        ),
        r"slot 0 is written twice",
    ),
    (
        "slot in another sequence's cached context",
        # sequence 0 is given sequence 1's table, its slots consistent with that table: its
        # new tokens would land on sequence 1's cached positions 0..2
        lambda s: dict(
            block_tables=s.metadata.block_tables[[1, 1]],
            slot_mapping=torch.cat(
                [
                    _slots_on_table(s.metadata.block_tables[1], (0, 1, 2), 4),
                    s.metadata.slot_mapping[3:],
                ]
            ),
        ),
        r"slot_mapping: entry 0 = \d+ overwrites cached data: block \d+ offset 0 holds "
        r"position 0 of sequence 1's context",
    ),
    ("zero heads", lambda s: dict(query=s.query[:, :0]), r"query: expected num_heads >= 1"),
    (
        "zero head size",
        lambda s: dict(query=s.query[..., :0]),
        r"query: expected num_heads >= 1 and head_size >= 1, got shape \[4, 4, 0\]",
    ),
    (
        "table as a list",
        lambda s: dict(block_tables=s.metadata.block_tables.tolist()),
        r"block_tables: expected None or an int32/int64 tensor, got list",
    ),
    (
        "slots as a list",
        lambda s: dict(slot_mapping=s.metadata.slot_mapping.tolist()),
        r"slot_mapping: expected None or an int32/int64 tensor, got list",
    ),
    (
        "lengths as a tensor",
        lambda s: dict(context_lens=torch.tensor([0, 5])),
        r"context_lens: expected a tuple of ints, got Tensor",
    ),
    (
        "empty batch",
        lambda s: dict(query_lens=(), context_lens=()),
        r"query_lens: empty batch \(num_seqs = 0\)",
    ),
    (
        "unknown attention kind",
        lambda s: dict(attn_kind="cross"),
        r"attn_kind: expected one of \['encoder', 'decoder', 'encoder_decoder'\], got 'cross'",
    ),
    ("NaN in the query", lambda s: dict(query=_poke(s.query, math.nan)), r"query: 1 non-finite"),
    # fp8 caches (reference/fp8.py)
    (
        "unknown cache dtype",
        lambda s: dict(kv_cache_dtype="fp8"),
        r"kv_cache_dtype: expected one of \['auto', 'fp8_e4m3', 'fp8_e5m2'\], got 'fp8'",
    ),
    (
        "cache dtype not the declared one",
        lambda s: _fp8(s, kv_cache=s.kv_cache),
        r"key_cache: expected dtype torch.float8_e4m3fn \(kv_cache_dtype fp8_e4m3\)",
    ),
    (
        "fp8 cache without scales",
        lambda s: _fp8(s, k_scale=None, v_scale=None),
        r"k_scale: is required with kv_cache_dtype fp8_e4m3",
    ),
    (
        "scales without fp8",
        lambda s: dict(k_scale=torch.ones(1), v_scale=torch.ones(1)),
        r"k_scale: is for an fp8 cache only \(kv_cache_dtype is auto\)",
    ),
    ("scale zero", lambda s: _fp8(s, k_scale=torch.zeros(1)), r"k_scale: entry 0 is 0.0, expected"),
    (
        "scale negative",
        lambda s: _fp8(s, v_scale=torch.tensor([1.0, -2.0])),
        r"v_scale: entry 1 is -2.0, expected finite and > 0",
    ),
    ("scale NaN", lambda s: _fp8(s, k_scale=torch.tensor([math.nan])), r"k_scale: entry 0 is nan"),
    ("scale Inf", lambda s: _fp8(s, k_scale=torch.tensor([math.inf])), r"k_scale: entry 0 is inf"),
    (
        "per-head scale of the wrong length",
        lambda s: _fp8(s, k_scale=torch.ones(3), v_scale=torch.ones(3)),
        r"k_scale: expected shape \[1\] \(per tensor\) or \[num_kv_heads=2\]",
    ),
    (
        "scale not float32",
        lambda s: _fp8(s, k_scale=torch.ones(1, dtype=torch.float64)),
        r"k_scale: expected a float32 tensor, got torch.float64",
    ),
    (
        "scales of two schemes",
        lambda s: _fp8(s, v_scale=torch.ones(2)),
        r"k_scale/v_scale: expected both per tensor or both per kv head",
    ),
    ("Inf in the key", lambda s: dict(key=_poke(s.key, math.inf)), r"key: 1 non-finite"),
    ("Inf in the value", lambda s: dict(value=_poke(s.value, -math.inf)), r"value: 1 non-fin"),
]


@pytest.mark.parametrize("name,changes,message", CASES, ids=[c[0] for c in CASES])
def test_decoder_bad_input(name, changes, message):
    step = _decoder()
    with pytest.raises(ValueError, match=message):
        _call(step, **changes(step))


def test_key_given_at_cross_decode():
    s = _cross_decode()
    with pytest.raises(ValueError, match=r"key/value: must be None at cross-attention decode"):
        _call(s, key=torch.randn(6, 4, 64), value=torch.randn(6, 4, 64))


def test_key_missing_at_cross_prefill():
    s = build_step("encoder_decoder", (2,), (0,), (6,), block_size=4)
    with pytest.raises(ValueError, match=r"key/value: are required for encoder_decoder"):
        _call(s, key=None, value=None)


def test_missing_encoder_lens():
    s = _cross_decode()
    with pytest.raises(ValueError, match=r"encoder_seq_lens: is required"):
        _call(s, encoder_seq_lens=None)


def test_cross_table_outside_cache():
    s = _cross_decode()
    with pytest.raises(ValueError, match=r"cross_block_tables: entry \[0, 0\] = -3 is outside"):
        _call(s, cross_block_tables=torch.full_like(s.metadata.cross_block_tables, -3))


def test_encoder_with_cache():
    s = build_step("encoder", (), None, (3,))
    with pytest.raises(ValueError, match=r"kv_cache: must be None for encoder attention"):
        _call(s, kv_cache=(torch.zeros(1), torch.zeros(1)))


def test_wrong_device_metadata():
    s = _decoder()
    with pytest.raises(ValueError, match=r"block_tables: expected device cpu, got meta"):
        _call(s, block_tables=s.metadata.block_tables.to("meta"))
