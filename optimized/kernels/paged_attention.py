"""Paged attention for any query length per sequence, with an optional split-K (flash-decoding).

One kernel family covers every attention step of the testbed:
- decode (1 query token), chunked prefill (a chunk on top of cached context) and full prefill;
- causal self-attention with optional sliding window, non-causal cross-attention, and
  non-paged (contiguous packed K/V, the encoder) by a constexpr;
- GQA/MQA: the query heads of one kv head are packed into the rows of one tile, so each K/V
  tile is loaded once per kv head;
- any block size (1..256) and head sizes that are not powers of two (80, 96), by masking.

Shapes:
    query:                   [num_tokens, num_heads, head_size]
    key_cache, value_cache:  [num_blocks, block_size, num_kv_heads, head_size]   (PAGED)
                             or packed [num_kv_tokens, num_kv_heads, head_size]  (not PAGED)
    block_tables:            [num_seqs, max_blocks_per_seq]
    out:                     [num_tokens, num_heads, head_size], the query's strides

A program handles BLOCK_Q query tokens × all `group` query heads of HEADS adjacent kv heads
(HEADS > 1 only at decode) of one sequence: BLOCK_M = HEADS * BLOCK_Q * GROUP_PAD rows,
row = (kv head in program * BLOCK_Q + token) * GROUP_PAD + head-in-group; its K/V rows are the
HEADS heads side by side. It walks that
sequence's visible K/V in tiles of TILE_N tokens, translating each position through the block
table, so it never reads a slot its sequence does not own. Online softmax in fp32 (exp2), fp32
accumulation. With split-K (num_splits > 1) each program handles a contiguous range of kv tiles
and writes (m, l, acc) partials; with `fused_reduce` (a runtime flag: one compiled kernel) the
last split of each (tile, kv head) to finish merges them (an arrival counter per (tile, kv head),
reset by that last program); otherwise `_split_k_reduce_kernel` merges them in a second launch.

fp8 caches (KV_FP8): K/V are loaded as stored, one byte an element, widened to the query's dtype
(exact: every e4m3/e5m2 value is a bf16, fp16 and fp32 value), and scaled back through the
scores (k_scale per row's kv head) and the accumulator (v_scale, once, after the K/V walk).

T5's position bias (BIAS): `bias_ptr` is the step's lookup table [num_heads, 2 * reach + 1]
(reference/position_bias.py `lookup_table`, times log2(e): the scores are in the exp2 domain);
each score adds its head's entry for the key's position minus the query's, clamped to ±reach.

Compiles vs speed: what shapes the inner loop is a constexpr (dtype, BLOCK_M, GROUP_PAD, padded
head size, power-of-two head size, TILE_N, paged, power-of-two block size, causal, window, fp8).
Block size, split count, group, head size and window length are runtime arguments, so one
compiled kernel serves every block size and split count; the reduce takes the group and row
count at runtime too (making causal/window/group padding runtime flags compiled fewer variants
but cost prefill and GQA decode: reports/results/h100/tune.txt.gz, "Behind the code").

The launch choice (tiles, splits, occupancy) is `optimized/ops/plan.py`; the launcher
`optimized/ops/paged_attention.py`.
"""

import triton
import triton.language as tl

# `tl.max` / `tl.sum` of an fp32 tile are `tl.reduce` with the standard library's combine
# functions (the same IR). Called directly: the interpreter re-patches the whole language on
# every call of a @jit helper (tl.max, tl.sum, tl.zeros, tl.cdiv), a fifth of a CPU tier's time.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


# Per-call integers that only steer loops and addresses are not specialized (Triton would compile
# a variant for each value that is 1 or a multiple of 16); strides of K/V/Q stay specialized,
# their alignment is what lets loads vectorize.
@triton.jit(
    do_not_specialize=[
        "sliding_window",
        "block_size",
        "block_shift",
        "num_splits",
        "kv_tiles_per_split",
        "stride_bt_seq",
        "group",
        "head_size",
        "fused_reduce",
        "scale_stride",
        "bias_reach",
        "bias_stride",
    ]
)
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    tile_seq_ptr,
    tile_q_first_ptr,
    query_start_loc_ptr,
    query_lens_ptr,
    kv_lens_ptr,
    context_lens_ptr,
    kv_start_loc_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    arrivals_ptr,
    k_scale_ptr,
    v_scale_ptr,
    bias_ptr,
    scale_log2,
    sliding_window,
    block_size,
    block_shift,
    num_splits,
    kv_tiles_per_split,
    stride_q_tok,
    stride_q_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_bt_seq,
    group,
    head_size,
    fused_reduce,
    scale_stride,
    bias_reach,
    bias_stride,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGED: tl.constexpr,
    POW2_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS: tl.constexpr = 1,
    KV_FP8: tl.constexpr = False,
    BIAS: tl.constexpr = False,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // (GROUP_PAD * HEADS)
    WIDE: tl.constexpr = HEADS * HEAD_PAD  # columns of a K/V row: HEADS adjacent kv heads
    tile = tl.program_id(0)
    head_block = tl.program_id(1)  # kv heads head_block * HEADS ...
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q_first = tl.load(tile_q_first_ptr + tile)
    q_len = tl.load(query_lens_ptr + seq)
    kv_len = tl.load(kv_lens_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    # row = (head of the program * BLOCK_Q + token) * GROUP_PAD + head-in-group
    in_head = rows % (BLOCK_Q * GROUP_PAD)
    q_idx = q_first + in_head // GROUP_PAD
    g = in_head % GROUP_PAD
    row_valid = (q_idx < q_len) & (g < group)
    if HEADS == 1:
        kv_head = head_block
        head = kv_head * group + g
        d = tl.arange(0, HEAD_PAD)
        k_cols = kv_head * stride_kc_head + d
        v_cols = kv_head * stride_vc_head + d
        own = row_valid[:, None]
    else:
        # Several kv heads per program: a K/V row is HEADS heads side by side (one contiguous
        # run when the heads are adjacent in memory). Row r's query sits in its own head's
        # columns and is zero elsewhere, so q·k and p·v of that row only mix its own head's
        # columns into the ones it stores (`own`); the others are never written.
        row_head = head_block * HEADS + rows // (BLOCK_Q * GROUP_PAD)
        head = row_head * group + g
        c = tl.arange(0, WIDE)
        d = c % HEAD_PAD
        col_head = head_block * HEADS + c // HEAD_PAD
        k_cols = col_head * stride_kc_head + d
        v_cols = col_head * stride_vc_head + d
        own = row_valid[:, None] & (col_head[None, :] == row_head[:, None])
    # A power-of-two head size needs no mask along d (loads vectorize): the masks are the rows'
    # alone, broadcast along d.
    if EVEN_D:
        own_d = own
    else:
        own_d = own & (d < head_size)[None, :]
    k_cols, v_cols = k_cols[None, :], v_cols[None, :]  # loop-invariant
    q_offs = (q_start + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=own_d, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    pos = context + q_idx  # absolute position of each row's query token (causal only)
    qk_scale = scale_log2
    if KV_FP8:
        # fp8 K/V are read as stored (one byte each) and widened to the query's dtype, exactly;
        # each row's kv-head scales fold into the score scale and, once after the K/V walk,
        # into the accumulator: x = stored * scale (reference/fp8.py).
        kv_head_of_row = head_block * HEADS + rows // (BLOCK_Q * GROUP_PAD)
        qk_scale = scale_log2 * tl.load(k_scale_ptr + kv_head_of_row * scale_stride)[:, None]

    # The K/V range this tile can see: causal stops at its last query, a window starts late.
    kv_end = kv_len
    kv_begin = 0
    if CAUSAL:
        kv_end = tl.minimum(context + tl.minimum(q_first + BLOCK_Q, q_len), kv_len)
        if WINDOW:
            kv_begin = tl.maximum(context + q_first - sliding_window + 1, 0)
    # Split s walks tiles [s * per_split, (s + 1) * per_split) of the range (one split: all).
    t_begin = kv_begin // TILE_N + split * kv_tiles_per_split
    t_end = tl.minimum(t_begin + kv_tiles_per_split, (kv_end + TILE_N - 1) // TILE_N)

    if PAGED:
        kv_start = 0
    else:
        kv_start = tl.load(kv_start_loc_ptr + seq).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, WIDE], 0.0, tl.float32)
    for t in range(t_begin, t_end):
        n = t * TILE_N + tl.arange(0, TILE_N)
        n_valid = n < kv_end
        if PAGED:
            if POW2_BLOCK:  # shifts, not integer divisions, for every position of the tile
                logical, offset = n >> block_shift, n & (block_size - 1)
            else:
                logical, offset = n // block_size, n % block_size
            block = tl.load(
                block_tables_ptr + seq * stride_bt_seq + logical, mask=n_valid, other=0
            ).to(tl.int64)
            k_row = block * stride_kc_block + offset * stride_kc_tok
            v_row = block * stride_vc_block + offset * stride_vc_tok
        else:
            k_row = (kv_start + n) * stride_kc_tok
            v_row = (kv_start + n) * stride_vc_tok
        if EVEN_D:
            kv_mask = n_valid[:, None]
        else:
            kv_mask = n_valid[:, None] & (d < head_size)[None, :]
        k = tl.load(key_cache_ptr + k_row[:, None] + k_cols, mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + v_row[:, None] + v_cols, mask=kv_mask, other=0.0)
        if KV_FP8 or UPCAST_DOT:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if BIAS:  # key position minus query position, clamped into the table
            rel = tl.minimum(tl.maximum(n[None, :] - pos[:, None], -bias_reach), bias_reach)
            at = head[:, None] * bias_stride + rel + bias_reach
            s += tl.load(bias_ptr + at, mask=row_valid[:, None] & n_valid[None, :], other=0.0)
        # Masks as constexprs: as runtime flags the compares on every score cost prefill dearly.
        visible = n_valid[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= pos[:, None])
            if WINDOW:
                visible = visible & (n[None, :] > pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr + kv_head_of_row * scale_stride)[:, None]

    if num_splits == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=own_d)
    else:
        cols = tl.arange(0, WIDE)
        first = ((tile * tl.num_programs(1) + head_block) * num_splits).to(tl.int64) * BLOCK_M
        part = first + split * BLOCK_M
        tl.store(part_m_ptr + part + rows, m_i)
        tl.store(part_l_ptr + part + rows, l_i)
        tl.store(part_acc_ptr + (part + rows)[:, None] * WIDE + cols[None, :], acc)
        if fused_reduce != 0:
            # The last split of this (tile, kv heads) to finish merges all partials, so no
            # second kernel: every thread's stores are issued (barrier) before the arrival is
            # counted with release semantics; the last arrival acquires, reads the partials
            # from L2 (.cg: never a stale L1 line) and resets the counter for the next launch.
            tl.debug_barrier()
            arrivals = arrivals_ptr + tile * tl.num_programs(1) + head_block
            arrived = tl.atomic_add(arrivals, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                tl.atomic_xchg(arrivals, 0, sem="relaxed")
                m_o = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_o = tl.full([BLOCK_M], 0.0, tl.float32)
                acc_o = tl.full([BLOCK_M, WIDE], 0.0, tl.float32)
                for sp in range(0, num_splits):  # a fixed order: the result is deterministic
                    at = first + sp * BLOCK_M + rows
                    m_s = tl.load(part_m_ptr + at, cache_modifier=".cg")
                    l_s = tl.load(part_l_ptr + at, cache_modifier=".cg")
                    acc_s = tl.load(
                        part_acc_ptr + at[:, None] * WIDE + cols[None, :], cache_modifier=".cg"
                    )
                    m_new = tl.maximum(m_o, m_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far
                    a_o = tl.exp2(m_o - m_safe)
                    a_s = tl.exp2(m_s - m_safe)
                    l_o = l_o * a_o + l_s * a_s
                    acc_o = acc_o * a_o[:, None] + acc_s * a_s[:, None]
                    m_o = m_new
                out = acc_o / tl.where(l_o == 0.0, 1.0, l_o)[:, None]
                tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=own_d)


@triton.jit(do_not_specialize=["num_splits", "group", "group_pad", "part_rows", "head_size"])
def _split_k_reduce_kernel(
    out_ptr,
    tile_seq_ptr,
    tile_q_first_ptr,
    query_start_loc_ptr,
    query_lens_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    group,
    group_pad,
    part_rows,
    head_size,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Merge the partials of ROWS output rows: out = Σ_s 2^(m_s - m) acc_s / Σ_s 2^(m_s - m) l_s.

    Every split of the ROWS rows is loaded at once (walking the splits one after another was a
    third of a decode step): on the GPU ROWS × SPLITS_PAD × HEAD_PAD stays ~8k elements; the
    interpreter takes a whole tile per program (it pays per program, not per element)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    q_idx = tl.load(tile_q_first_ptr + tile) + r // group_pad
    g = r % group_pad
    row_valid = (q_idx < tl.load(query_lens_ptr + seq)) & (g < group)  # padding rows: no output
    s = tl.arange(0, SPLITS_PAD)
    part = ((tile * tl.num_programs(1) + kv_head) * num_splits + s).to(tl.int64)
    off = part[None, :] * part_rows + r[:, None]  # [ROWS, SPLITS_PAD]; part_rows = main BLOCK_M
    mask = row_valid[:, None] & (s < num_splits)[None, :]
    m_s = tl.load(part_m_ptr + off, mask=mask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + off, mask=mask, other=0.0)
    d = tl.arange(0, HEAD_PAD)
    acc_s = tl.load(
        part_acc_ptr + off[:, :, None] * HEAD_PAD + d[None, None, :],
        mask=mask[:, :, None],
        other=0.0,
    )
    m = tl.reduce(m_s, 1, _MAX)
    w = tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # empty splits weigh 0
    l_sum = tl.reduce(w * l_s, 1, _SUM)
    out = tl.reduce(w[:, :, None] * acc_s, 1, _SUM) / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    head = kv_head * group + g
    o_offs = (q_start + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
    tl.store(
        out_ptr + o_offs,
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (d < head_size)[None, :],
    )
