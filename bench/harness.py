"""One path for every bench row: judged as the matrix judges it, then the call its backend
prepares is judged the same way and timed (a wrong-but-fast backend gets `fail`, not a speed);
then each workload's measured limit (`copy` where a few queries a sequence read K/V, `matmul`
otherwise). CUDA: CUDA-graph kernel time (L2 flushed before each replay) beside do_bench, or
why a call could not be captured; CPU: wall medians, labelled so. GB/s count the K/V bytes a
step reads (fp8: one a value), TFLOP/s its visible score and P·V products.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import torch

from conformance import runner
from conformance.compare import compare_output
from conformance.memory import steps
from conformance.schema import BENCH_SHAPE, BenchRow, Status
from conformance.shapes import DTYPES
from optimized.backend import BaseBackend, Capabilities
from optimized.ops.plan import Card, card_of
from reference.metadata import AttnKind

MEASURED = "measured"  # the status of a limit's row: measured on the card, not a backend


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


_FLUSH: list[torch.Tensor] = []


def graph_ms(fn, reps: int = 50, why: list[str] | None = None, flush: str = "zero") -> float:
    """Median time of `fn` replayed from a CUDA graph, after an L2 flush (`zero`: do_bench's,
    256 MB written; `read`: 256 MB read, a clean L2). NaN when `fn` cannot be captured or its
    graph is empty (work off the capture stream would time nothing); `why` gets the reason."""
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
    return sorted(s.elapsed_time(e) for s, e in times)[reps // 2]


def measured_card(device: torch.device) -> Card:
    """The device's card with what the bench measures on it: a 1 GiB device-to-device copy
    (bytes read + written a second) and the bf16 matmul rate."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / median_ms(lambda: a @ a) / 1e9
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    gbps = 2 * (1 << 30) / median_ms(lambda: dst.copy_(src)) / 1e6
    return replace(card_of(device), copy_gbps=gbps, matmul_tflops=tflops)


class SdpaContiguous(BaseBackend):
    """A bench peer, not a matrix backend: the K/V of every sequence gathered contiguous in
    `prepare` (untimed), then one SDPA call: what a paged kernel can hope to match. Uniform
    lengths, no mask (decode, cross, encoder, a whole prefill), the model dtype's cache."""

    name = "sdpa-contiguous"
    capabilities = Capabilities(dtypes=(torch.float16, torch.bfloat16))

    def not_supported_reasons(self, query, key, value, kv_cache, metadata, attn_kind):
        reasons = super().not_supported_reasons(query, key, value, kv_cache, metadata, attn_kind)
        kind, md = AttnKind(attn_kind), metadata
        if len(set(md.query_lens_for(kind))) > 1 or len(set(md.kv_lens_for(kind))) > 1:
            reasons.append("uniform sequence lengths only (one dense batch)")
        if kind == AttnKind.DECODER and max(md.query_lens) > 1 and any(md.context_lens):
            reasons.append("a chunk on cached context needs a bottom-right causal mask")
        return reasons

    def prepare(self, query, key, value, kv_cache, metadata, attn_kind):
        from optimized.torch_backend import TorchBackend, gathered

        kind = self.validate(query, key, value, kv_cache, metadata, attn_kind)
        TorchBackend().attend(query, key, value, kv_cache, metadata, kind)  # the cache write
        k, v = gathered(key, value, kv_cache, metadata, kind)  # [seqs, kv heads, len, d]
        n = metadata.num_seqs
        q = query[: n * metadata.query_lens_for(kind)[0]].view(n, -1, *query.shape[1:])
        q = q.transpose(1, 2)
        causal = kind == AttnKind.DECODER and q.shape[2] > 1
        scale = metadata.scale_for(query.shape[-1])
        out = torch.zeros_like(query)

        def call():
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=True
            )
            out[: o.shape[0] * o.shape[2]] = o.transpose(1, 2).reshape(-1, *query.shape[1:])
            return out

        return call

    def attend(self, query, key, value, kv_cache, metadata, kind):
        return self.prepare(query, key, value, kv_cache, metadata, kind)()


def peers() -> list[tuple[object, str]]:
    """Every registered backend that can run here (the reference excepted), and on CUDA the
    contiguous-SDPA peer."""
    from optimized.backend import backend_names, get_backend

    out = [(b, "") for b in map(get_backend, backend_names()) if b.name != "reference"]
    out = [(b, s) for b, s in out if not b.unavailable_reason()]
    return out + ([(SdpaContiguous(), "")] if torch.cuda.is_available() else [])


def bench_rows(workloads, picked, card: Card | None = None, progress=None) -> list[dict]:
    """One row per workload × backend (`picked`: (backend, module spec)), then the workload's
    limit row where `card` has measured figures; `progress(rows)` after each workload."""
    rows = []
    for workload, shape in workloads:
        for backend, spec in picked:
            rows.append(_one(workload, shape, backend, spec, card))
        if card is not None and card.copy_gbps:
            rows.append(_limit_row(rows[-1], shape, card))
        runner._recover(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"# {workload} {shape.id}: {len(picked)} backends", flush=True)
        if progress is not None:
            progress(rows)
    return rows


def _columns(workload: str, shape, backend: str, spec: str, device: str) -> dict:
    (st,) = steps(shape)
    return dict(
        workload=workload, backend=backend, batch=len(st.q_lens), context_len=max(st.kv_lens),
        query_len=max(st.q_lens), num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size, block_size=shape.block_size if st.cached else 0,
        dtype=shape.dtype, kv_cache_dtype=shape.kv_cache_dtype, device=device,
        backend_module=spec,
    )  # fmt: skip


def _work(shape) -> tuple[int, float, bool]:
    """(K/V bytes the step reads, its visible FLOPs, memory-bound?), from the shape's step
    (conformance/memory.py): an fp8 cache's bytes one a value."""
    (st,) = steps(shape)
    elem = 1 if shape.kv_cache_dtype != "auto" and st.cached else DTYPES[shape.dtype].itemsize
    kv_bytes = st.kv_bytes(shape.num_kv_heads * shape.head_size * elem)
    return kv_bytes, st.flops(shape.num_heads, shape.head_size), max(st.q_lens) <= 16


def _one(workload: str, shape, backend, spec: str, card: Card | None) -> dict:
    caps = backend.capabilities
    device = torch.device(backend.device())
    build = "cuda" if device.type == "cuda" else "cpu"  # large workloads: built on the GPU
    label = card.name if card is not None else "cpu"
    row = BenchRow(**_columns(workload, shape, backend.name, spec, label),
                   median_ms=math.nan).__dict__  # fmt: skip
    # 1. the matrix's verdict on this step (one call)
    (status, reason), = [
        (r["status"], r["reason"])
        for r in runner.run_case(shape, backend, metamorphic=False, rerun=False, module=spec,
                                 build_device=build)
        if r["step"].startswith("0:")
    ]  # fmt: skip
    row["status"] = status
    if status != Status.PASS:
        row["timed"] = f"not timed: {reason}"[:300]
        return row
    # 2. the prepared call, on a fresh copy of the same inputs, judged like forward
    run = runner.case_run(shape, build)
    (exp,) = run.expected_for(caps.fp8_prefill_reads_inputs)
    mine = run.fresh(device)
    if caps.finite_unowned_slots:
        runner.poison_finite(mine)
    call, problem = runner.guarded(lambda: backend.prepare(*mine.args()), what="prepare()")
    if not problem:
        judged, problem = runner.guarded(
            lambda: compare_output(
                mine, call(), exp.output, exp.baseline_err, backend, exp.ref_scale
            ),
            what="the prepared call",
        )
    if problem or judged.status != Status.PASS:
        why = problem or f"{judged.status}: {judged.reason}"
        row["status"] = Status.ERROR if problem else judged.status
        row["timed"] = f"not timed: prepare()'s call is not what forward() does ({why})"[:300]
        return row
    # 3. its time
    ms, gms, how = _times(call, device)
    kv_bytes, flops, memory = _work(shape)
    row.update(median_ms=ms, graph_ms=gms, timed=how, gbps=kv_bytes / ms / 1e6,
               tflops=flops / ms / 1e9, graph_gbps=kv_bytes / gms / 1e6)  # fmt: skip
    if card is not None and card.copy_gbps:
        best = gms if gms == gms else ms
        got, lim = (kv_bytes / best / 1e6, card.copy_gbps) if memory else (
            flops / best / 1e9, card.matmul_tflops)  # fmt: skip
        unit = f"copy {lim:.0f} GB/s" if memory else f"bf16 matmul {lim:.0f} TFLOP/s"
        row.update(frac_of_limit=got / lim, limit=unit)
    return row


def _times(call, device: torch.device) -> tuple[float, float, str]:
    """(median ms, CUDA-graph ms or NaN, how it was timed)."""
    if device.type != "cuda":
        call()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
        return sorted(samples)[2], math.nan, "cpu wall (not comparable with GPU figures)"
    ms = median_ms(call)
    why: list[str] = []
    torch.cuda.synchronize()
    gms = graph_ms(call, why=why)
    return ms, gms, "graph" if gms == gms else f"do_bench only (not captured: {why[0]})"


def _limit_row(base: dict, shape, card: Card) -> dict:
    kv_bytes, flops, memory = _work(shape)
    row = {k: base[k] for k in [*BENCH_SHAPE, "device"]}
    if memory:
        return BenchRow(**row, backend="copy", median_ms=2 * kv_bytes / card.copy_gbps / 1e6,
                        gbps=card.copy_gbps, frac_of_limit=1.0, limit="measured",
                        status=MEASURED).__dict__  # fmt: skip
    return BenchRow(**row, backend="matmul", median_ms=flops / card.matmul_tflops / 1e9,
                    tflops=card.matmul_tflops, frac_of_limit=1.0, limit="measured",
                    status=MEASURED).__dict__  # fmt: skip
