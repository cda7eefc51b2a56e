"""GPU benchmarks: our Triton kernels against peers and the measured hardware limit.

Every row: median time (triton.testing.do_bench), achieved GB/s (bytes of K/V actually read or
written) or TFLOP/s (prefill), and the fraction of the limit: a device-to-device copy of the
same bytes for memory-bound work, the bf16 matmul rate for prefill.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.testing

from conformance.schema import BenchRow as Row
from conformance.shapes import DTYPES
from optimized.ops.paged_attention import paged_attention
from optimized.ops.plan import Schedule, make_schedule
from optimized.ops.reshape_and_cache import reshape_and_cache
from reference.fp8 import cache_dtype

DT = DTYPES
# The model presets (conformance/models.py) whose decode, cross-prefill and encoder shapes the
# grid times at their real lengths.
BENCH_MODELS = ("whisper-large-v3", "bart-large", "flan-t5-xl")


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


_FLUSH: list[torch.Tensor] = []


def graph_ms(fn, reps: int = 50, why: list[str] | None = None, flush: str = "zero") -> float:
    """Median time of one call of `fn` replayed from a CUDA graph, L2 flushed before each replay
    like do_bench does: kernel time without the host's launch overhead, which do_bench includes
    whenever the host takes longer than the flush (xFormers' split-K call measured ~200-250 µs
    per call with do_bench on every small decode shape, its kernels far less). NaN when `fn`
    cannot be captured, and when its graph came out empty (work off the capture stream, or on
    the host: replaying nothing would time nothing); `why`, a list, gets the reason.

    `flush`: "zero" (do_bench's: 256 MB written, which leaves L2 full of dirty lines that the
    timed call then writes back) or "read" (256 MB read: a clean L2; `bench tune --only
    paging` measures the difference)."""
    if flush not in ("zero", "read"):
        raise ValueError(f"flush: expected 'zero' or 'read', got {flush!r}")
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    flush_l2 = _FLUSH[0].zero_ if flush == "zero" else lambda: _FLUSH[0].view(torch.int32).max()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with torch.cuda.graph(graph):
                fn()
        if any("Graph is empty" in str(w.message) for w in said):
            raise RuntimeError("the captured CUDA graph is empty (no kernel on the capture stream)")
    except Exception as e:
        torch.cuda.synchronize()
        if why is not None:
            why.append(f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        return math.nan
    graph.replay()
    times = []
    for _ in range(reps):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2]


def timed(fn) -> tuple[float, float]:
    """(do_bench median, CUDA-graph replay median) of `fn`, in ms."""
    return median_ms(fn), graph_ms(fn)


class Limits:
    """Measured once per run: copy bandwidth (read + write bytes / s) and bf16 matmul rate."""

    def __init__(self):
        self._copy: dict[int, float] = {}
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = median_ms(lambda: a @ a)
        self.matmul_tflops = 2 * 8192**3 / ms / 1e9
        self.device = torch.cuda.get_device_name(0)

    def copy_gbps(self, nbytes: int) -> float:
        """Bandwidth of copying `nbytes` (at least 256 MiB, so that caches do not help)."""
        n = max(nbytes, 256 << 20)
        key = 1 << math.ceil(math.log2(n))
        if key not in self._copy:
            src = torch.empty(key // 2, dtype=torch.bfloat16, device="cuda")
            dst = torch.empty_like(src)
            self._copy[key] = 2 * key / median_ms(lambda: dst.copy_(src)) / 1e6
        return self._copy[key]


def matmul_bound_row(
    limits: Limits,
    backend: str,
    ms: float,
    tflops: float,
    base: dict,
    gbps: float = math.nan,
    **graph: float,
) -> Row:
    """A compute-bound result: TFLOP/s as a fraction of the measured bf16 matmul rate."""
    return Row(
        backend=backend,
        median_ms=ms,
        gbps=gbps,
        tflops=tflops,
        frac_of_limit=tflops / limits.matmul_tflops,
        limit=f"bf16 matmul {limits.matmul_tflops:.0f} TFLOP/s",
        **graph,
        **base,
    )


def _paged_kv(batch, kv_len, num_kv_heads, head_size, block_size, dtype, gen_seed=0, kv="auto"):
    """A shuffled paged cache holding `batch` sequences of `kv_len` tokens, and their tables
    (`kv` an fp8 kv_cache_dtype: the cache stores fp8 values)."""
    per_seq = triton.cdiv(kv_len, block_size)
    num_blocks = batch * per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    stored = cache_dtype(kv, dtype)
    key_cache = torch.randn(shape, device="cuda", dtype=dtype).to(stored)
    value_cache = torch.randn(shape, device="cuda", dtype=dtype).to(stored)
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    tables = torch.randperm(num_blocks, device="cuda", generator=g).view(batch, per_seq)
    return key_cache, value_cache, tables.to(torch.int32)


@dataclass(frozen=True, eq=False)
class OursCall:
    """Our paged attention on one benchmark shape, ready to call (the grid times it, `bench
    limits` profiles it).

    q:                      [num_tokens, num_heads, head_size]
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], shuffled pages
    tables:                 [num_seqs, max_blocks_per_seq]
    """

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    tables: torch.Tensor
    schedule: Schedule
    out: torch.Tensor
    causal: bool
    scale: float
    k_scale: torch.Tensor | None = None  # fp8 caches: per-tensor scales
    v_scale: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        return paged_attention(
            self.q,
            self.key_cache,
            self.value_cache,
            self.tables,
            self.schedule,
            causal=self.causal,
            scale=self.scale,
            out=self.out,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )


def prefill_call(
    q_lens: list[int],
    kv_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: str,
    causal: bool,
    kv: str = "auto",
) -> OursCall:
    """Our kernel over `len(q_lens)` sequences of a shuffled paged cache (decode: q_lens all 1;
    `kv` fp8: the cache in fp8 with per-tensor scales)."""
    dt = DT[dtype]
    batch = len(q_lens)
    kc, vc, tables = _paged_kv(batch, max(kv_lens), num_kv_heads, head_size, block_size, dt, kv=kv)
    q = torch.randn(sum(q_lens), num_heads, head_size, device="cuda", dtype=dt)
    group = num_heads // num_kv_heads
    sched = make_schedule(tuple(q_lens), tuple(kv_lens), tuple(context_lens), group, "cuda")
    out = torch.empty_like(q)
    scales = {}
    if kv != "auto":
        scales = dict(k_scale=torch.full((1,), 0.5, device="cuda"),
                      v_scale=torch.full((1,), 0.25, device="cuda"))  # fmt: skip
    return OursCall(q, kc, vc, tables, sched, out, causal, head_size**-0.5, **scales)


def decode_rows(
    limits: Limits,
    workload: str,
    batch: int,
    kv_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: str,
    causal: bool,
    peers: bool = True,
    kv: str = "auto",
) -> list[Row]:
    """One decode token per sequence over `kv_len` cached tokens: ours, xFormers split-K,
    SDPA on contiguous K/V, FlexAttention on the same paged cache, and the copy limit. With an
    fp8 cache (`kv`): ours reading fp8 in-kernel, FlexAttention over the pool dequantized in the
    same timed call (it reads the model dtype), and the copy limit of the fp8 bytes; GB/s count
    the bytes each reads (fp8: one per element)."""
    dt = DT[dtype]
    ours = prefill_call(
        [1] * batch,
        [kv_len] * batch,
        [kv_len - 1] * batch if causal else [0] * batch,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        dtype,
        causal,
        kv,
    )
    q, kc, vc, tables, scale = ours.q, ours.key_cache, ours.value_cache, ours.tables, ours.scale
    kv_bytes = 2 * batch * kv_len * num_kv_heads * head_size * kc.element_size()
    limit = limits.copy_gbps(kv_bytes)
    base = dict(
        workload=workload,
        batch=batch,
        context_len=kv_len,
        query_len=1,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        device=limits.device,
        kv_cache_dtype=kv,
    )

    def row(backend, fn):
        ms, gms = timed(fn)
        gbps = kv_bytes / ms / 1e6
        return Row(
            backend=backend,
            median_ms=ms,
            gbps=gbps,
            frac_of_limit=gbps / limit,
            limit=f"copy {limit:.0f} GB/s",
            graph_ms=gms,
            graph_gbps=kv_bytes / gms / 1e6,
            timed="graph" if gms == gms else "do_bench (not captured)",
            **base,
        )

    rows = [row("triton", ours)]
    if not peers:
        return rows
    if kv != "auto":
        rows.append(_copy_row(kv_bytes, limit, base))
        fx = _flex_decode(q, kc, vc, tables, kv_len, causal, scale, ours().clone(),
                          ours.k_scale, ours.v_scale)  # fmt: skip
        if fx is not None:
            rows.append(row("flex", fx))
        return rows
    rows.append(_copy_row(kv_bytes, limit, base))
    # SDPA on the same K/V laid out contiguously (no paging): the dense peer.
    k_dense = torch.randn(batch, num_kv_heads, kv_len, head_size, device="cuda", dtype=dt)
    v_dense = torch.randn_like(k_dense)
    q4 = q.view(batch, num_heads, 1, head_size)
    rows.append(
        row(
            "sdpa-contiguous",
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, k_dense, v_dense, scale=scale, enable_gqa=True
            ),
        )
    )
    xf = _xformers_splitk(q, kc, vc, tables, kv_len, block_size, scale)
    if xf is not None:
        rows.append(row("xformers-splitk", xf))
    fx = _flex_decode(q, kc, vc, tables, kv_len, causal, scale, ours().clone())
    if fx is not None:
        rows.append(row("flex", fx))
    return rows


def _copy_row(kv_bytes: int, limit: float, base: dict) -> Row:
    """The measured limit's own row: copying the bytes the kernel reads."""
    return Row(backend="copy", median_ms=2 * kv_bytes / limit / 1e6, gbps=limit,
               frac_of_limit=1.0, limit="measured", **base)  # fmt: skip


def _flex_decode(q, kc, vc, tables, kv_len, causal, scale, expected, k_scale=None, v_scale=None):
    """A callable running compiled FlexAttention on the same paged cache (the flex backend's
    mask and pool views; KV tiles of one page, full pages skip the mask; batch and heads
    static, as a serving engine capturing one CUDA graph per batch size has them, so
    FlexAttention's decode kernel serves it; the query gather/scatter around it is left out, as
    for SDPA), or None where FlexAttention cannot run or disagrees with `expected` (ours)."""
    try:
        from torch import _dynamo

        from optimized.flex_backend import flex_attend, flex_plan, kv_tile_for, pool_view
        from reference.metadata import AttnKind, StepMetadata
    except ImportError:
        return None
    batch = q.shape[0]
    bs = kc.shape[1]
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    fp8 = {}
    if k_scale is not None:
        kv = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}[kc.dtype]
        fp8 = dict(kv_cache_dtype=kv, k_scale=k_scale, v_scale=v_scale)
    if causal:
        kind = AttnKind.DECODER
        md = StepMetadata(
            query_lens=(1,) * batch,
            context_lens=(kv_len - 1,) * batch,
            block_size=bs,
            block_tables=tables,
            slot_mapping=empty,
            **fp8,
        )
    else:
        kind = AttnKind.ENCODER_DECODER
        md = StepMetadata(
            query_lens=(1,) * batch,
            context_lens=(1,) * batch,
            encoder_seq_lens=(kv_len,) * batch,
            block_size=bs,
            cross_block_tables=tables,
            cross_slot_mapping=empty,
            **fp8,
        )
    try:
        p = flex_plan(q, None, None, (kc, vc), md, kind, kv_tile=kv_tile_for(bs))
        _dynamo.mark_static(p["q"], 0)  # the decode kernel needs a static batch/heads
        _dynamo.mark_static(p["q"], 1)
        if fp8:  # the pool's dequantized copy is made in every timed call, as the backend does
            plan = dict(p)

            def call():
                plan["k"] = pool_view(kc, k_scale, q.dtype)
                plan["v"] = pool_view(vc, v_scale, q.dtype)
                return flex_attend(plan, scale)
        else:
            call = lambda: flex_attend(p, scale)
        got = call()[:, :, 0].to(torch.float32)  # [batch, heads, head_size]
    except Exception as e:  # a shape FlexAttention refuses: no row, said on stdout
        print(f"# flex: no row ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    err = (got - expected.to(torch.float32)).abs().max().item()
    if not err <= 2e-2:  # a peer that computes something else is not timed
        print(f"# flex: no row (max abs difference {err:.3g} from ours)")
        return None
    return call


def _xformers_splitk(q, kc, vc, tables, kv_len, block_size, scale):
    """A callable running xFormers' paged split-K decode, or None where its rules refuse."""
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha.common import Inputs
    except ImportError:
        return None
    batch, num_heads, head_size = q.shape
    num_blocks, bs, num_kv_heads, _ = kc.shape
    group = num_heads // num_kv_heads
    bias = fmha.attn_bias.PagedBlockDiagonalPaddedKeysMask.from_seqlens(
        q_seqlen=[1] * batch,
        kv_seqlen=[kv_len] * batch,
        block_tables=tables,
        page_size=bs,
        device=q.device,
    )

    def view(c):
        return c.view(1, num_blocks * bs, num_kv_heads, 1, head_size).expand(-1, -1, -1, group, -1)

    xq = q.view(1, batch, num_kv_heads, group, head_size)
    k5, v5 = view(kc), view(vc)
    if fmha.triton_splitk.FwOp.not_supported_reasons(Inputs(xq, k5, v5, bias)):
        return None
    return lambda: fmha.memory_efficient_attention_forward(
        xq, k5, v5, attn_bias=bias, scale=scale, op=fmha.triton_splitk.FwOp
    )


def prefill_rows(
    limits: Limits,
    workload: str,
    q_lens: list[int],
    kv_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: str,
    causal: bool,
) -> list[Row]:
    """Prefill-like work (many queries per sequence): ours paged, xFormers' fmha ops and SDPA
    on the same tokens unpaged. TFLOP/s counts the visible score and P·V products only."""
    dt = DT[dtype]
    batch = len(q_lens)
    ours = prefill_call(
        q_lens,
        kv_lens,
        context_lens,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        dtype,
        causal,
    )
    q, scale = ours.q, ours.scale
    nq = sum(q_lens)
    group = num_heads // num_kv_heads
    visible = 0
    for ql, kl, c in zip(q_lens, kv_lens, context_lens):
        visible += sum(min(c + j + 1, kl) for j in range(ql)) if causal else ql * kl
    flops = 4 * visible * num_heads * head_size
    kv_bytes = 2 * sum(kv_lens) * num_kv_heads * head_size * q.element_size()
    base = dict(
        workload=workload,
        batch=batch,
        context_len=max(kv_lens),
        query_len=max(q_lens),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        device=limits.device,
    )
    mem_bound = max(q_lens) <= 16  # a few queries against a long K/V: bandwidth is the limit

    def row(backend, fn):
        ms, gms = timed(fn)
        tflops = flops / ms / 1e9
        gbps = kv_bytes / ms / 1e6
        graph = dict(graph_ms=gms, graph_gbps=kv_bytes / gms / 1e6)
        if mem_bound:
            lim = limits.copy_gbps(kv_bytes)
            return Row(
                backend=backend,
                median_ms=ms,
                gbps=gbps,
                tflops=tflops,
                frac_of_limit=gbps / lim,
                limit=f"copy {lim:.0f} GB/s",
                **graph,
                **base,
            )
        return matmul_bound_row(limits, backend, ms, tflops, base, gbps=gbps, **graph)

    rows = [row("triton", ours)]
    # Peers on the same tokens without paging: contiguous packed K/V.
    k_packed = torch.randn(sum(kv_lens), num_kv_heads, head_size, device="cuda", dtype=dt)
    v_packed = torch.randn_like(k_packed)
    try:
        from xformers.ops import fmha

        if causal:
            bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
                q_lens, kv_lens
            )
        else:
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_lens, kv_lens)
        xq = q.view(1, nq, num_kv_heads, group, head_size)
        xk = k_packed.view(1, -1, num_kv_heads, 1, head_size).expand(-1, -1, -1, group, -1)
        xv = v_packed.view(1, -1, num_kv_heads, 1, head_size).expand(-1, -1, -1, group, -1)
        for name, op in (
            ("xformers-fa2", fmha.flash.FwOp),
            ("xformers-cutlass", fmha.cutlass.FwOp),
        ):
            try:
                fmha.memory_efficient_attention_forward(
                    xq, xk, xv, attn_bias=bias, scale=scale, op=op
                )
            except Exception:
                continue
            rows.append(
                row(
                    name,
                    lambda op=op: fmha.memory_efficient_attention_forward(
                        xq, xk, xv, attn_bias=bias, scale=scale, op=op
                    ),
                )
            )
    except ImportError:
        pass
    if (
        len(set(q_lens)) == 1
        and len(set(kv_lens)) == 1
        and not (causal and q_lens[0] != kv_lens[0])
    ):
        q4 = q.view(batch, q_lens[0], num_heads, head_size).transpose(1, 2)
        k4 = k_packed.view(batch, kv_lens[0], num_kv_heads, head_size).transpose(1, 2)
        v4 = v_packed.view(batch, kv_lens[0], num_kv_heads, head_size).transpose(1, 2)
        rows.append(
            row(
                "sdpa-contiguous",
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q4, k4, v4, is_causal=causal, scale=scale, enable_gqa=True
                ),
            )
        )
    return rows


def encoder_rows(
    limits: Limits, workload: str, lens: list[int], num_heads: int, head_size: int, dtype: str
) -> list[Row]:
    """Encoder prefill (non-causal, unpaged): ours (packed K/V) against xFormers and SDPA."""
    dt = DT[dtype]
    n = sum(lens)
    q, k, v = (torch.randn(n, num_heads, head_size, device="cuda", dtype=dt) for _ in range(3))
    sched = make_schedule(tuple(lens), tuple(lens), (0,) * len(lens), 1, "cuda")
    scale = head_size**-0.5
    out = torch.empty_like(q)
    flops = 4 * sum(x * x for x in lens) * num_heads * head_size
    base = dict(
        workload=workload,
        batch=len(lens),
        context_len=max(lens),
        query_len=max(lens),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_size=head_size,
        block_size=0,
        dtype=dtype,
        device=limits.device,
    )

    def row(backend, fn):
        ms, gms = timed(fn)
        return matmul_bound_row(limits, backend, ms, flops / ms / 1e9, base, graph_ms=gms)

    rows = [
        row(
            "triton",
            lambda: paged_attention(
                q, k, v, None, sched, causal=False, scale=scale, paged=False, out=out
            ),
        )
    ]
    try:
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
        for name, op in (
            ("xformers-fa2", fmha.flash.FwOp),
            ("xformers-cutlass", fmha.cutlass.FwOp),
        ):
            rows.append(
                row(
                    name,
                    lambda op=op: fmha.memory_efficient_attention_forward(
                        q[None], k[None], v[None], attn_bias=bias, scale=scale, op=op
                    ),
                )
            )
    except ImportError:
        pass
    if len(set(lens)) == 1:
        shape = (len(lens), lens[0], num_heads, head_size)
        q4, k4, v4 = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        rows.append(
            row(
                "sdpa-contiguous",
                lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, scale=scale),
            )
        )
    return rows


def cache_write_rows(
    limits: Limits, num_tokens: int, num_kv_heads: int, head_size: int, block_size: int, dtype: str
) -> list[Row]:
    dt = DT[dtype]
    key = torch.randn(num_tokens, num_kv_heads, head_size, device="cuda", dtype=dt)
    value = torch.randn_like(key)
    num_blocks = triton.cdiv(num_tokens, block_size) * 2
    kc = torch.empty(num_blocks, block_size, num_kv_heads, head_size, device="cuda", dtype=dt)
    vc = torch.empty_like(kc)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read once and written once
    lim = limits.copy_gbps(moved // 2)
    ms, gms = timed(lambda: reshape_and_cache(key, value, kc, vc, slots))
    gbps = moved / ms / 1e6
    return [
        Row(
            workload="cache-write",
            backend="triton",
            batch=1,
            context_len=num_tokens,
            query_len=num_tokens,
            num_heads=num_kv_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            block_size=block_size,
            dtype=dtype,
            median_ms=ms,
            gbps=gbps,
            frac_of_limit=gbps / lim,
            limit=f"copy {lim:.0f} GB/s",
            device=limits.device,
            graph_ms=gms,
            graph_gbps=moved / gms / 1e6,
        )
    ]
