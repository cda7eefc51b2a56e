"""PyTorch FlexAttention reading the paged caches directly: a peer, not our kernel.

Cache writes use our `reshape_and_cache`. Attention is one `flex_attention` call per step:

    query:  [num_seqs, num_heads, max_query_len, head_size]   (packed rows gathered per sequence)
    key:    [1, num_kv_heads, num_blocks * block_size, head_size]  the physical pool, a view
    mask:   mask_mod(seq, head, j, slot) translates a physical slot back to the sequence's
            logical position through the inverse block table (`logical_block[seq, block]`,
            -1 where the sequence does not own the block) and applies the step's rules
            (position < kv_len, causal and window for decoder self-attention)
    blocks: per sequence the KV tiles (128 slots in the matrix, one page in the bench) that
            hold any of its slots, computed from the block table (BlockMask.from_kv_blocks), so
            the kernel visits only those tiles; tiles every query row sees whole are listed
            as full blocks, where the kernel skips mask_mod

An fp8 cache is written quantized by our kernel, and FlexAttention reads a dequantized copy of
the whole pool in the model dtype (it has no fp8 K/V): correct, and timed with that copy.

The encoder (no cache) reads the packed K/V as one sequence per batch entry the same way, its
"table" being the packed offsets. On CUDA `flex_attention` is compiled (Triton, by inductor,
dynamic shapes); on the CPU it runs FlexAttention's eager path, which evaluates the same
mask_mod densely and ignores the tile lists (their coverage is unit-tested on the CPU, and the
compiled kernel that uses them runs in the GPU matrix).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from optimized.triton_backend import TritonBackend, triton_unavailable_reason
from reference.metadata import AttnKind, StepMetadata

TILE = 128  # FlexAttention's KV block (and query block) size


def flex_unavailable_reason() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    return triton_unavailable_reason()  # cache writes are our Triton kernel


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Each new mask_mod closure (block size, causal, window) and shape class recompiles. Past
    # dynamo's recompile limit (8) it would silently run FlexAttention's eager path instead,
    # which materializes [seqs, heads, queries, pool] scores (686 GiB for a Whisper encoder
    # step on the H100): raise the limit, and make hitting it an error, never a quiet fallback.
    cfg = torch._dynamo.config
    for name, value in (
        ("recompile_limit", 4096),
        ("cache_size_limit", 4096),
        ("accumulated_recompile_limit", 1 << 16),
        ("accumulated_cache_size_limit", 1 << 16),
        ("fail_on_recompile_limit_hit", True),
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    return torch.compile(flex_attention, dynamic=True)


def _flex(device: torch.device):
    if device.type == "cuda":
        return _compiled_flex()
    return _eager_flex


def _eager_flex(*args, **kwargs):
    """FlexAttention's eager path (its unfused reference implementation), called directly:
    without the flag, each call first traces it with dynamo (3.5x the time on the CPU tier's
    cases, same numbers). The compiled CUDA path never reads the flag."""
    import torch.nn.attention.flex_attention as fa

    saved, fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG, True
    try:
        return fa.flex_attention(*args, **kwargs)
    finally:
        fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved


def _token_index(lens: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """([num_seqs, max_len] packed row of each sequence's j-th token (clamped), [same] valid)."""
    lens_t = torch.tensor(lens, device=device)
    starts = torch.cumsum(lens_t, 0) - lens_t
    j = torch.arange(max(max(lens), 1), device=device)
    valid = j[None, :] < lens_t[:, None]
    return torch.where(valid, starts[:, None] + j[None, :], 0), valid


def kv_tiles(slots, valid, always, pool: int, tile: int = TILE):
    """Per sequence the KV tiles (slot // tile) FlexAttention must visit, as BlockMask lists.

    slots: [num_seqs, max_kv_len] physical slot of each logical position; valid: [same] the
    position is below the sequence's kv length; always: [same] every real query row sees it
    (`valid` for cross/encoder, position <= context for causal decoder steps, nothing under a
    window). A tile whose `tile` slots are all `always` slots of one sequence is *full*: the
    kernel skips mask_mod there. Tiles holding any other valid slot are *partial*.
    Returns (partial_counts [num_seqs], partial_indices [num_seqs, pool_tiles], full_counts,
    full_indices): each row's tiles ascending first, then filler (BlockMask reads only the
    first `count`, but wants room for every tile of the pool)."""
    n_tiles = -(-pool // tile)
    b = slots.shape[0]
    tile_of = torch.where(valid, slots // tile, 0).long()
    seen = torch.zeros(b, n_tiles, dtype=torch.int32, device=slots.device)
    seen.scatter_add_(1, tile_of, valid.to(torch.int32))
    # Full means `tile` distinct slots: count each (sequence, slot) once, even if a table were
    # to name one block twice.
    span = n_tiles * tile
    rows = torch.arange(b, device=slots.device)[:, None].expand_as(slots)
    keys = torch.unique((rows * span + slots.long())[valid & always])
    full = torch.zeros_like(seen).flatten()
    full.scatter_add_(
        0, keys // span * n_tiles + keys % span // tile, torch.ones_like(keys, dtype=torch.int32)
    )
    is_full = full.view(b, n_tiles) == tile
    is_partial = (seen > 0) & ~is_full

    def listed(m):  # stable sort on "not listed" puts each row's listed tiles first, ascending
        order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices
        return m.sum(1).to(torch.int32), order.to(torch.int32)

    return (*listed(is_partial), *listed(is_full))


def _block_mask(mask_mod, kv_slots, kv_valid, kv_always, num_q: int, num_kv: int, kv_tile: int):
    from torch.nn.attention.flex_attention import BlockMask

    counts, idx, full_counts, full_idx = kv_tiles(kv_slots, kv_valid, kv_always, num_kv, kv_tile)
    q_tiles = -(-num_q // TILE)
    b, width = idx.shape

    def per_q_tile(c, i):  # the same lists for every query tile: [num_seqs, 1, q_tiles, ...]
        return (
            c[:, None, None].expand(b, 1, q_tiles).contiguous(),
            i[:, None, None, :].expand(b, 1, q_tiles, width).contiguous(),
        )

    return BlockMask.from_kv_blocks(
        *per_q_tile(counts, idx),
        *per_q_tile(full_counts, full_idx),
        BLOCK_SIZE=(TILE, kv_tile),
        mask_mod=mask_mod,
        seq_lengths=(num_q, num_kv),
    )


def kv_tile_for(block_size: int) -> int:
    """A KV tile of one page (16..128 slots): a tile then belongs to one sequence, so the kernel
    reads only that sequence's pages. What FlexAttention's decode kernel takes; its main kernel
    needs tiles that its BLOCK_N (64/128) divides, so the matrix keeps TILE."""
    return max(16, min(TILE, 1 << (max(block_size, 1).bit_length() - 1)))


# fp32 steps of one sequence: FlexAttention's kernel choice with default blocks left ptxas
# compiling for > 230 s (H100, torch 2.11: cross-prefill-single-...-d80-fp32 and
# encoder-prefill-single-...-d256-fp32; the stack sat in triton's make_cubin), where the main
# kernel with 32 x 32 blocks and one stage compiled in 14-21 s.
FP32_ONE_SEQUENCE = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 32, "BLOCK_N": 32}
FP32_ONE_SEQUENCE |= {"num_stages": 1, "num_warps": 4}


def kernel_options(
    max_q: int, num_heads: int, num_kv_heads: int, num_seqs: int = 2, fp32: bool = False
) -> dict:
    """FlexAttention picks its decode kernel for short queries of a static batch (here: one
    sequence, the one batch size a dynamic-shape compile specializes) and sizes its row block as
    next_pow2(queries × group) from the first shape it compiles; past the 128-row query tile no
    configuration is left (inductor: NoValidChoicesError). Force the main kernel there
    (measured on the H100: single-sequence prefill steps of 19-37 tokens with GQA 4:1/8:1), and
    give one-sequence fp32 steps the main kernel with small blocks (`FP32_ONE_SEQUENCE`)."""
    if fp32 and num_seqs == 1:
        return dict(FP32_ONE_SEQUENCE)
    group = num_heads // num_kv_heads
    rows = max_q * (1 << (group - 1).bit_length())
    return {"FORCE_USE_FLEX_ATTENTION": True} if rows > TILE else {}


def flex_plan(
    query, key, value, kv_cache, md: StepMetadata, kind: AttnKind, kv_tile: int = TILE
) -> dict:
    """Everything the FlexAttention call takes, made on the host once (nothing is written):
    q [num_seqs, heads, max_q, d], k/v views of the pool as stored (an fp8 pool is dequantized
    by `flex_step`'s call), mask_mod, the block mask (KV tiles of `kv_tile` slots), kernel
    options, and where the rows go back."""
    device = query.device
    q_lens = md.query_lens_for(kind)
    q_index, q_valid = _token_index(q_lens, device)
    q_lens_t = torch.tensor(q_lens, device=device)
    kv_lens_t = torch.tensor(md.kv_lens_for(kind), device=device)
    q = query[q_index].permute(0, 2, 1, 3)  # [num_seqs, num_heads, max_q, head_size]
    if kind == AttnKind.ENCODER:
        # Only the real rows: FlexAttention weights masked keys of a visited tile by zero, and a
        # padding row may hold NaN (0 * NaN poisons the row).
        n_real = sum(md.encoder_seq_lens)
        k = key[:n_real].permute(1, 0, 2).unsqueeze(0)  # [1, num_kv_heads, pool, d], a view
        v = value[:n_real].permute(1, 0, 2).unsqueeze(0)
        rules = _packed_rules(md, q_lens_t, kv_lens_t, device)
    else:  # as stored: the step's call takes them again after its write (`flex_step`)
        k, v = pool_view(kv_cache[0]), pool_view(kv_cache[1])
        rules = _paged_rules(md, kind, kv_cache[0].shape[:2], q_lens_t, kv_lens_t, device)
    mask_mod, key_position, query_position, kv_slots, kv_valid, kv_always = rules
    mask = _block_mask(mask_mod, kv_slots, kv_valid, kv_always, q.shape[2], k.shape[2], kv_tile)
    options = kernel_options(
        q.shape[2], q.shape[1], k.shape[1], q.shape[0], q.dtype == torch.float32
    )
    return dict(
        q=q,
        k=k,
        v=v,
        mask_mod=mask_mod,
        score_mod=_bias_mod(md, kind, key_position, query_position),
        block_mask=mask,
        kernel_options=options,
        q_index=q_index,
        q_valid=q_valid,
    )


def _packed_rules(md: StepMetadata, q_lens_t, kv_lens_t, device):
    """The encoder's packed K/V as the "pool": sequence b owns rows start_b .. start_b + len_b.
    (mask_mod, key position, query position, slots, valid, always seen) as `flex_plan` uses."""
    kv_index, kv_valid = _token_index(md.encoder_seq_lens, device)
    starts = kv_index[:, 0]

    def mask_mod(b, h, j, slot):
        pos = slot - starts[b]
        return (j < q_lens_t[b]) & (pos >= 0) & (pos < kv_lens_t[b])

    key_position = lambda b, slot: slot - starts[b]
    return mask_mod, key_position, lambda b, j: j, kv_index, kv_valid, kv_valid


def _paged_rules(md: StepMetadata, kind: AttnKind, pool_shape, q_lens_t, kv_lens_t, device):
    """The paged pool through the inverse block table: (mask_mod, key position, query position,
    slots, valid, always seen) as `flex_plan` uses."""
    num_blocks, bs = pool_shape
    tables = md.tables_for(kind)[0]
    n_seqs = md.num_seqs
    used = -(-kv_lens_t // bs)  # blocks each sequence reads
    width = tables.shape[1]
    col = torch.arange(width, device=device)
    own = col[None, :] < used[:, None]
    logical_block = torch.full((n_seqs, num_blocks), -1, dtype=torch.int32, device=device)
    rows = torch.arange(n_seqs, device=device)[:, None].expand(n_seqs, width)
    t = tables.long().to(device)
    logical_block[rows[own], t[own]] = col.expand(n_seqs, width)[own].to(torch.int32)
    causal = kind == AttnKind.DECODER
    ctx = torch.tensor(md.context_lens, device=device)
    window = md.sliding_window if causal else None

    def mask_mod(b, h, j, slot):
        lb = logical_block[b, slot // bs]
        pos = lb * bs + slot % bs
        ok = (j < q_lens_t[b]) & (lb >= 0) & (pos < kv_lens_t[b])
        if causal:
            ok = ok & (pos <= ctx[b] + j)
            if window is not None:
                ok = ok & (pos > ctx[b] + j - window)
        return ok

    key_position = lambda b, slot: logical_block[b, slot // bs] * bs + slot % bs
    p = torch.arange(int(kv_lens_t.max()), device=device)
    kv_valid = p[None, :] < kv_lens_t[:, None]
    blk = torch.gather(t, 1, (p[None, :] // bs).clamp(max=width - 1).expand(n_seqs, -1))
    # Seen by every query row of its sequence: all of it across, up to the context (row 0's
    # last position) when causal, nothing guaranteed under a window.
    always = kv_valid if not causal else (p[None, :] <= ctx[:, None]) & kv_valid
    if window is not None:
        always = torch.zeros_like(kv_valid)
    slots = blk * bs + p[None, :] % bs
    return mask_mod, key_position, lambda b, j: ctx[b] + j, slots, kv_valid, always


def _bias_mod(md: StepMetadata, kind: AttnKind, key_position, query_position):
    """T5's bias as a score_mod (the spec's lookup table, by key minus query position), or
    None without one."""
    if md.position_bias == "none":
        return None
    from reference.position_bias import lookup_table

    lut, reach = lookup_table(md.relative_attention_bias, kind == AttnKind.ENCODER,
                              md.relative_attention_num_buckets,
                              md.relative_attention_max_distance)  # fmt: skip

    def score_mod(score, b, h, j, slot):
        rel = key_position(b, slot) - query_position(b, j)
        return score + lut[h, rel.clamp(-reach, reach) + reach]

    return score_mod


def flex_attend(p: dict, scale: float) -> torch.Tensor:
    """The FlexAttention call a `flex_plan` describes: [num_seqs, num_heads, max_q, head_size]."""
    q, k = p["q"], p["k"]
    return _flex(q.device)(
        q,
        k,
        p["v"],
        score_mod=p.get("score_mod"),
        block_mask=p["block_mask"],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=p["kernel_options"] or None,
    )


def pool_view(
    cache: torch.Tensor, scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A cache [num_blocks, block_size, num_kv_heads, head_size] as the pool FlexAttention
    takes: [1, num_kv_heads, num_blocks * block_size, head_size] (a view of a contiguous cache,
    a copy of a strided one); with `scale`, an fp8 cache dequantized to `dtype`."""
    num_blocks, bs, heads, d = cache.shape
    pool = cache.reshape(num_blocks * bs, heads, d)
    if scale is not None:
        pool = dequantized(pool, scale, dtype)
    return pool.permute(1, 0, 2).unsqueeze(0)


def dequantized(pool: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 pool [slots, num_kv_heads, head_size] as `dtype`: stored * scale (a pass over the
    whole pool, which the bench times with the call)."""
    return (pool.float() * scale.reshape(-1)[:, None].float()).to(dtype)


def flex_step(query, key, value, kv_cache, md: StepMetadata, kind: AttnKind):
    """The step as a call: `flex_plan` once (host work), then per call the device work: the
    cache write (ours), the fp8 pool's dequantized copy (FlexAttention reads the model dtype),
    the query gather, one FlexAttention call over the physical pool and the scatter of its
    rows, whose indices are made here (the call never waits on the host: capturable)."""
    from optimized.ops.reshape_and_cache import reshape_and_cache

    plan = flex_plan(query, key, value, kv_cache, md, kind)
    scale = md.scale_for(query.shape[-1])
    rows = plan["q_index"][plan["q_valid"]]
    picked = plan["q_valid"].flatten().nonzero().flatten()
    paged = kind != AttnKind.ENCODER

    def call() -> torch.Tensor:
        step = dict(plan)
        if paged:
            key_cache, value_cache = kv_cache
            if key is not None:
                slots = md.tables_for(kind)[1]
                reshape_and_cache(key, value, key_cache, value_cache, slots, md.k_scale,
                                  md.v_scale)  # fmt: skip
            # after the write: a strided cache's pool is a copy, an fp8 one a dequantized copy
            step["k"] = pool_view(key_cache, md.k_scale if md.fp8 else None, query.dtype)
            step["v"] = pool_view(value_cache, md.v_scale if md.fp8 else None, query.dtype)
        step["q"] = query[plan["q_index"]].permute(0, 2, 1, 3)
        o = flex_attend(step, scale).permute(0, 2, 1, 3).reshape(-1, *query.shape[1:])
        out = torch.zeros_like(query)
        out[rows] = o[picked].to(query.dtype)
        return out

    return call


class FlexBackend(TritonBackend):
    """torch FlexAttention over the paged caches (compiled on CUDA, eager on the CPU); the
    validation, cache-layout rules and cache writes are the triton backend's."""

    name = "flex"
    # FlexAttention's kernel multiplies the zero weights of masked slots in a visited tile by
    # their values: a NaN there poisons the row (0 * NaN). Real pools hold finite stale data;
    # the matrix gives this backend finite poison instead of NaN (a nonzero-weight read still
    # fails). It also sums tiles in physical order, so a block permutation is checked against
    # the reference's tolerance, not bit for bit.
    capabilities = replace(
        TritonBackend.capabilities,  # fp8: over a dequantized copy of the pool
        finite_unowned_slots=True,
        bitwise_under_permutation=False,
    )

    def unavailable_reason(self) -> str | None:
        return flex_unavailable_reason()

    def attend(self, query, key, value, kv_cache, metadata, kind) -> torch.Tensor:
        return flex_step(query, key, value, kv_cache, metadata, kind)()

    def prepare(self, query, key, value, kv_cache, metadata, attn_kind):
        """Validation and `flex_step`'s plan once; the call is the step's device work."""
        from optimized.backend import contiguous

        kind = self.validate(query, key, value, kv_cache, metadata, attn_kind)
        query, key, value = contiguous(query, key, value)
        return flex_step(query, key, value, kv_cache, metadata, kind)
