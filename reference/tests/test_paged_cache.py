"""Cache writes and the block arithmetic."""

import math

import torch

from reference import gather_sequence, write_to_cache


def _nan_cache(num_blocks=4, block_size=4):
    return torch.full((num_blocks, block_size, 2, 3), math.nan)


def test_written_slots_hold_the_tokens_and_nothing_else_changes():
    kc, vc = _nan_cache(), _nan_cache()
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    slots = torch.tensor([5, -1, 14])  # block 1 offset 1; padding; block 3 offset 2
    write_to_cache(key, value, kc, vc, slots)
    assert torch.equal(kc[1, 1], key[0]) and torch.equal(vc[1, 1], value[0])
    assert torch.equal(kc[3, 2], key[2]) and torch.equal(vc[3, 2], value[2])
    written = torch.zeros(4, 4, dtype=torch.bool)
    written[1, 1] = written[3, 2] = True
    assert torch.isnan(kc[~written]).all() and torch.isnan(vc[~written]).all()


def test_padding_slot_is_never_written():
    kc, vc = _nan_cache(), _nan_cache()
    write_to_cache(torch.ones(2, 2, 3), torch.ones(2, 2, 3), kc, vc, torch.tensor([-1, -1]))
    assert torch.isnan(kc).all() and torch.isnan(vc).all()


def test_docstring_worked_example():
    # block_size 4, table [7, 2, 9, 0, 0], 10 tokens: position p in slot table[p//4]*4 + p%4.
    cache = torch.full((10, 4, 1, 1), math.nan)
    table = torch.tensor([7, 2, 9, 0, 0])
    expected_slots = [28, 29, 30, 31, 8, 9, 10, 11, 36, 37]
    for p, slot in enumerate(expected_slots):
        cache.view(-1, 1, 1)[slot] = p
    got = gather_sequence(cache, table, 10)
    assert got.flatten().tolist() == list(range(10))
    assert got.shape == (10, 1, 1)


def test_gather_reads_only_needed_blocks():
    cache = torch.full((3, 4, 1, 1), math.nan)
    cache[1] = 1.0
    # 3 tokens need 1 block; the NaN padding entries must not be read
    got = gather_sequence(cache, torch.tensor([1, 0, 2]), 3)
    assert got.flatten().tolist() == [1.0, 1.0, 1.0]
