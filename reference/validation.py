"""Validation of one step: `check_inputs` raises a ValueError naming the bad argument and what was
expected, before anything is written. Every backend calls it first, so bad input gives the same
error everywhere (the reference included).

What is accepted (and so defined by `reference.attention`):
- `attn_kind`: an `AttnKind` or its value (`encoder`, `decoder`, `encoder_decoder`).
- At least one sequence (`num_seqs >= 1`); lengths are tuples or lists of Python ints.
- `query` `[num_tokens, num_heads >= 1, head_size >= 1]` in float64/32/16 or bfloat16; `key` and
  `value` in the same dtype and on the same device; `num_kv_heads` divides `num_heads`.
- Real (non-padding) rows of `query`, `key` and `value` hold finite numbers: the spec is
  textbook attention over real numbers, and NaN/Inf there have no agreed meaning (one kernel
  propagates NaN, another gives zeros). Padding rows may hold anything; their output is zero.
- Caches may be strided views (any strides) of `[num_blocks, block_size, num_kv_heads,
  head_size]`; unwritten slots may hold anything (the matrix fills them with NaN). Their dtype
  is the query's (`kv_cache_dtype` auto) or the fp8 dtype `kv_cache_dtype` names.
- fp8 (`kv_cache_dtype` fp8_e4m3 / fp8_e5m2, reference/fp8.py): `k_scale` and `v_scale` are
  float32 tensors of shape [1] or [num_kv_heads] on the query's device, finite and > 0, both of
  one scheme; with `auto` they are None.
- `position_bias` t5 (reference/position_bias.py): on encoder and decoder steps only; its
  table `relative_attention_bias` [num_buckets, num_heads] finite, in the query's dtype and on
  its device; a bucket configuration Hugging Face's function computes (`config_problem`: an
  exact bucket a direction and max_distance beyond them). With `none` the table is None.
- Paging (`_check_paging`): block tables and slot mappings are int32/int64 tensors; every table
  entry a sequence reads is a block of the cache; every new token's slot is where its own table
  puts it; no slot is written twice; and no slot written overwrites data that a sequence reads
  as cached context (decoder context positions, or a cross cache written at an earlier step).
"""

from __future__ import annotations

import math

import torch

from reference.fp8 import KV_CACHE_DTYPES, cache_dtype
from reference.metadata import AttnKind, StepMetadata
from reference.position_bias import POSITION_BIASES, config_problem

# float64 is accepted (the reference computes in it); backends list what they support.
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TABLE_FIELDS = ("block_tables", "slot_mapping", "cross_block_tables", "cross_slot_mapping")


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"{name}: {msg}")


def _attn_kind(kind) -> AttnKind:
    try:
        return AttnKind(kind)
    except ValueError:
        raise _err(
            "attn_kind", f"expected one of {[k.value for k in AttnKind]}, got {kind!r}"
        ) from None


def _lens(name: str, lens, num_seqs: int | None, minimum: int) -> None:
    if lens is None:
        raise _err(name, "is required for this attention kind")
    if not isinstance(lens, tuple | list):
        raise _err(name, f"expected a tuple of ints, got {type(lens).__name__}")
    if num_seqs is not None and len(lens) != num_seqs:
        raise _err(name, f"has {len(lens)} entries, expected num_seqs={num_seqs}")
    for i, n in enumerate(lens):
        if not isinstance(n, int) or isinstance(n, bool) or n < minimum:
            raise _err(name, f"entry {i} is {n!r}, expected an int >= {minimum}")


def _check_tensor(name, t, shape, device, dtype=None, dtypes=None) -> None:
    """Shape (None = any size in that dim), device and dtype of one tensor, with a clear error."""
    if not isinstance(t, torch.Tensor):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise _err(name, f"expected a tensor of shape [{want}], got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise _err(name, f"expected shape [{want}], got {list(t.shape)}")
    if t.device != device:
        raise _err(name, f"expected device {device}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise _err(name, f"expected dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise _err(name, f"expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_finite(name: str, t: torch.Tensor, rows: int) -> None:
    real = t[:rows]
    if not bool(torch.isfinite(real).all()):
        n = int((~torch.isfinite(real)).sum())
        raise _err(
            name,
            f"{n} non-finite value(s) (NaN/Inf) in its {rows} real rows: the spec is defined "
            "for finite inputs only",
        )


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _read_only_limits(md: StepMetadata, num_blocks: int) -> list[tuple]:
    """Per table kind: (name, tab, lim, limit[num_blocks]): entry [j, k] of `tab` holds data in
    its offsets `< lim[j, k]`; offsets `< limit[b]` of block b hold data a
    sequence reads as cached context (decoder positions < context_lens; the cross K/V of a
    sequence past its first decoder step). A step may not write there."""
    bs, out = md.block_size, []
    sources = [("block_tables", md.block_tables, list(md.context_lens))]
    if md.encoder_seq_lens is not None:
        cached = [e if c > 0 else 0 for e, c in zip(md.encoder_seq_lens, md.context_lens)]
        sources.append(("cross_block_tables", md.cross_block_tables, cached))
    for name, tables, lens in sources:
        if tables is None or not any(lens):
            continue
        tab = tables.cpu().long()
        k = torch.arange(tab.shape[1])
        lim = (torch.tensor(lens)[:, None] - k[None, :] * bs).clamp(0, bs)
        keep = (lim > 0) & (tab >= 0) & (tab < num_blocks)
        limit = torch.zeros(num_blocks, dtype=torch.long)
        limit.scatter_reduce_(0, tab[keep], lim[keep], reduce="amax")
        out.append((name, tab, lim.where(keep, 0), limit))
    return out


def _check_paging(md: StepMetadata, kind: AttnKind, num_blocks: int, num_new: int, device) -> None:
    """Tables and slots of `kind` against the cache size, the lengths and each other."""
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
    for name, t in ((tname, tables), (sname, slots)):
        if t.dtype not in (torch.int32, torch.int64):
            raise _err(name, f"expected dtype int32 or int64, got {t.dtype}")
        if t.device != device:
            raise _err(name, f"expected device {device}, got {t.device}")
    if slots.dim() != 1 or slots.shape[0] != num_new:
        raise _err(
            sname,
            f"expected shape [{num_new}] (one slot per new K/V token), got {list(slots.shape)}",
        )
    bs, kv_lens = md.block_size, md.kv_lens_for(kind)
    tab = tables.cpu().long()
    need = [-(-n // bs) for n in kv_lens]
    for i, n in enumerate(need):
        if n > tab.shape[1]:
            raise _err(
                tname,
                f"sequence {i} holds {kv_lens[i]} tokens = {n} blocks of {bs}, "
                f"but its table has only {tab.shape[1]} entries",
            )
    read = torch.arange(tab.shape[1])[None, :] < torch.tensor(need)[:, None]  # entries read
    outside = read & ((tab < 0) | (tab >= num_blocks))
    if outside.any():
        i, b = _first(outside)
        raise _err(
            tname,
            f"entry [{i}, {b}] = {int(tab[i, b])} is outside the cache "
            f"(expected 0 <= block < num_blocks={num_blocks})",
        )

    # The new tokens in packed order: sequence and absolute position of each.
    new_lens = torch.tensor(md.new_kv_lens_for(kind))
    seq_of = torch.repeat_interleave(torch.arange(md.num_seqs), new_lens)
    first = torch.tensor(md.context_lens if kind == AttnKind.DECODER else (0,) * md.num_seqs)
    starts = torch.cumsum(new_lens, 0) - new_lens
    pos_of = first[seq_of] + torch.arange(len(seq_of)) - starts[seq_of]
    n_real = len(seq_of)
    s = slots.cpu().long()
    real, pad = s[:n_real], s[n_real:]
    if (pad != -1).any():
        t = n_real + _first(pad != -1)[0]
        raise _err(sname, f"entry {t} = {int(s[t])} belongs to a padding token; expected -1")
    if (real == -1).any():
        t = _first(real == -1)[0]
        raise _err(
            sname,
            f"entry {t} is -1 (padding) but is token {int(pos_of[t])} of sequence "
            f"{int(seq_of[t])}, which this step attends to: it must be written",
        )
    past = (real < 0) | (real >= num_blocks * bs)
    if past.any():
        t = _first(past)[0]
        raise _err(
            sname,
            f"entry {t} = {int(real[t])} is past the cache (expected -1 or "
            f"0 <= slot < num_blocks*block_size={num_blocks * bs})",
        )
    block = tab[seq_of, pos_of // bs]
    want = block * bs + pos_of % bs
    if (real != want).any():
        t = _first(real != want)[0]
        i, p = int(seq_of[t]), int(pos_of[t])
        raise _err(
            sname,
            f"entry {t} = {int(real[t])} is not where sequence {i} keeps position {p}: "
            f"its table puts it in slot {int(want[t])} (block {int(block[t])}, "
            f"offset {p % bs}); a slot inside another sequence's block?",
        )
    values, counts = torch.unique(real, return_counts=True)
    if (counts > 1).any():
        raise _err(sname, f"slot {int(values[counts > 1][0])} is written twice")
    for name, other, lim, limit in _read_only_limits(md, num_blocks):
        b, o = real // bs, real % bs
        clash = o < limit[b]
        if clash.any():
            t = _first(clash)[0]
            blk, off = int(b[t]), int(o[t])
            j, k = _first((other == blk) & (lim > off))
            raise _err(
                sname,
                f"entry {t} = {int(real[t])} overwrites cached data: block {blk} offset {off} "
                f"holds position {k * bs + off} of sequence {j}'s "
                f"{'context' if name == 'block_tables' else 'cross K/V'} ({name}[{j}, {k}])",
            )


def _check_scales(md: StepMetadata, num_kv_heads: int, device) -> None:
    """kv_cache_dtype and the fp8 scales (see the module docstring)."""
    if md.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise _err(
            "kv_cache_dtype", f"expected one of {list(KV_CACHE_DTYPES)}, got {md.kv_cache_dtype!r}"
        )
    for name in ("k_scale", "v_scale"):
        s = getattr(md, name)
        if not md.fp8:
            if s is not None:
                raise _err(name, "is for an fp8 cache only (kv_cache_dtype is auto): expected None")
            continue
        if s is None:
            raise _err(name, f"is required with kv_cache_dtype {md.kv_cache_dtype}")
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise _err(name, f"expected a float32 tensor, got {got}")
        if s.dim() > 1 or s.numel() not in (1, num_kv_heads):
            raise _err(
                name,
                f"expected shape [1] (per tensor) or [num_kv_heads={num_kv_heads}] (per kv "
                f"head), got {list(s.shape)}",
            )
        if s.device != device:
            raise _err(name, f"expected device {device}, got {s.device}")
        bad = ~(torch.isfinite(s) & (s > 0))
        if bad.any():
            i = int(bad.nonzero()[0][0])
            raise _err(name, f"entry {i} is {float(s.reshape(-1)[i])!r}, expected finite and > 0")
    if md.fp8 and md.k_scale.numel() != md.v_scale.numel():
        raise _err("k_scale/v_scale", "expected both per tensor or both per kv head")


def check_inputs(query, key, value, kv_cache, md: StepMetadata, kind) -> AttnKind:
    """Validate one step's tensors and metadata; raise ValueError naming the bad argument.
    Returns `kind` as an AttnKind.

    query:    [num_tokens, num_heads, head_size]
    key:      [num_kv_tokens, num_kv_heads, head_size] or None (cross-attention decode)
    value:    like key
    kv_cache: (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_size];
              None for ENCODER
    Nothing is written here, and a caller writes nothing before this returns.
    """
    kind = _attn_kind(kind)
    if not isinstance(md, StepMetadata):
        raise _err("metadata", f"expected StepMetadata, got {type(md).__name__}")
    if not isinstance(md.block_size, int) or md.block_size < 1:
        raise _err("block_size", f"expected an int >= 1, got {md.block_size!r}")
    _lens("query_lens", md.query_lens, None, 1 if kind != AttnKind.ENCODER else 0)
    if md.num_seqs == 0:
        raise _err("query_lens", "empty batch (num_seqs = 0): expected at least one sequence")
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
    for name in TABLE_FIELDS:
        t = getattr(md, name)
        if t is not None and not isinstance(t, torch.Tensor):
            raise _err(name, f"expected None or an int32/int64 tensor, got {type(t).__name__}")

    device = query.device if isinstance(query, torch.Tensor) else None
    _check_tensor("query", query, (None, None, None), device, dtypes=SUPPORTED_DTYPES)
    num_tokens, num_heads, head_size = query.shape
    if num_heads < 1 or head_size < 1:
        raise _err(
            "query",
            f"expected num_heads >= 1 and head_size >= 1, got shape {list(query.shape)}",
        )
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
        _check_tensor("key", key, (None, None, head_size), device, dtype=query.dtype)
        num_kv_tokens, num_kv_heads = key.shape[0], key.shape[1]
        _check_tensor("value", value, tuple(key.shape), device, dtype=query.dtype)
        if kind != AttnKind.ENCODER_DECODER and num_kv_tokens != num_tokens:
            raise _err(
                "key", f"{kind.value} key has {num_kv_tokens} tokens, query has {num_tokens}"
            )
        if num_kv_tokens < new_kv:
            raise _err(
                "key",
                f"has {num_kv_tokens} tokens, expected at least {new_kv} "
                "(the new K/V tokens of this step)",
            )
        if num_kv_heads < 1:
            raise _err("key", f"expected num_kv_heads >= 1, got shape {list(key.shape)}")
    _check_finite("query", query, real_tokens)
    if needs_kv:
        _check_finite("key", key, new_kv)
        _check_finite("value", value, new_kv)
    if kind == AttnKind.ENCODER:
        if kv_cache is not None:
            raise _err("kv_cache", "must be None for encoder attention (no cache)")
    else:
        if not (isinstance(kv_cache, tuple | list) and len(kv_cache) == 2):
            raise _err("kv_cache", "expected a (key_cache, value_cache) pair")
        key_cache, value_cache = kv_cache
        if md.kv_cache_dtype not in KV_CACHE_DTYPES:
            _check_scales(md, 1, device)  # names kv_cache_dtype
        want = (None, md.block_size, num_kv_heads, head_size)
        stored = cache_dtype(md.kv_cache_dtype, query.dtype)
        for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
            if isinstance(c, torch.Tensor) and c.dtype != stored:
                raise _err(
                    name,
                    f"expected dtype {stored} (kv_cache_dtype {md.kv_cache_dtype}), got {c.dtype}",
                )
        _check_tensor("key_cache", key_cache, want, device)
        _check_tensor("value_cache", value_cache, tuple(key_cache.shape), device)
        num_kv_heads = key_cache.shape[2]
        if num_kv_heads < 1 or key_cache.shape[0] < 1:
            raise _err(
                "key_cache",
                f"expected num_blocks >= 1 and num_kv_heads >= 1, got {list(key_cache.shape)}",
            )
        num_kv_tokens = key.shape[0] if key is not None else 0
        _check_paging(md, kind, key_cache.shape[0], num_kv_tokens, device)
    if num_kv_heads is not None and num_heads % num_kv_heads:
        raise _err("num_kv_heads", f"{num_kv_heads} does not divide num_heads={num_heads}")
    _check_scales(md, num_kv_heads or 1, device)
    _check_position_bias(md, kind, num_heads, query.dtype, device)
    return kind


def _check_position_bias(md: StepMetadata, kind: AttnKind, num_heads: int, dtype, device) -> None:
    """position_bias and T5's table and config (reference/position_bias.py)."""
    if md.position_bias not in POSITION_BIASES:
        raise _err(
            "position_bias", f"expected one of {list(POSITION_BIASES)}, got {md.position_bias!r}"
        )
    table = md.relative_attention_bias
    if md.position_bias == "none":
        if table is not None:
            raise _err("relative_attention_bias", "is for position_bias t5 only: expected None")
        return
    if kind == AttnKind.ENCODER_DECODER:
        raise _err("position_bias", "t5 applies to encoder and decoder self-attention, not to "
                   "cross-attention: expected none on an encoder_decoder step")  # fmt: skip
    buckets, distance = md.relative_attention_num_buckets, md.relative_attention_max_distance
    for name, value in (("relative_attention_num_buckets", buckets),
                        ("relative_attention_max_distance", distance)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise _err(name, f"expected an int >= 2, got {value!r}")
    problem = config_problem(buckets, distance, kind == AttnKind.ENCODER)
    if problem:
        raise ValueError(problem)
    _check_tensor("relative_attention_bias", table, (buckets, num_heads), device, dtype=dtype)
    if not bool(torch.isfinite(table).all()):
        raise _err("relative_attention_bias", "holds non-finite values: expected finite numbers")
