"""Any backend's speed on the matrix's own workloads, beside every peer and the limit.

    python -m bench --backend-module path/to/mine.py:Mine [--backend NAME ...]
                    [--model NAME|all] [--cases FILE] [--out reports/out/bench.csv]

Workloads come from the matrix's vocabulary (conformance/): a model preset's decode steps (self
and cross), cross-attention prefill (4 decoder tokens over the encoder) and encoder steps at its
real lengths, batches 1, 16, 64 and 256 (`--model`; `--batches` chooses others); the explicit
shapes of a cases file (`--cases`); else the grid's decode shapes of Whisper large-v3. Every
workload runs against the backends named and, on a GPU, every registered peer (the reference
excepted):

1. judged first as the matrix judges it (one call; the matrix's tolerance, caches and inputs
   checks): a backend that is not `pass` gets its status and reason in the row and no time;
2. timed through the backend's `prepare(...)` (validation and the host work it can do once,
   outside the timed call; by default its `attend` on the validated inputs), whose first call
   is judged the same way (a prepared call that is not what `forward` does is `fail` or
   `error`, untimed): on CUDA the kernel
   time of a CUDA-graph replay where the call can be captured (else `timed` says why) beside
   do_bench; without CUDA wall-clock medians, labelled `cpu` and never set against GPU figures.

GB/s count the K/V bytes the step must read (fp8: one a value) and TFLOP/s its visible score
and P·V products; a `copy` (or `matmul`) row per workload is the measured limit.
"""

from __future__ import annotations

import math
import time

import torch

from conformance import runner
from conformance.compare import compare_output
from conformance.models import MODELS, model_names
from conformance.schema import BenchRow, Status
from conformance.shapes import Shape

BATCHES = (1, 16, 64, 256)
PROMPT_TOKENS = 4  # decoder tokens of a cross-attention prefill


def model_workloads(spec: str, batches=BATCHES, divide: int = 1) -> list[tuple[str, Shape]]:
    """(workload name, shape) of each preset: `self-decode:NAME`, `cross-decode:NAME`,
    `cross-prefill:NAME`, `encoder:NAME`, at its lengths ÷ `divide`."""
    out = []
    for name in model_names(spec):
        m = MODELS[name]
        enc, dec = max(2, m.encoder_len // divide), max(2, m.decoder_max // divide)
        geo = dict(num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_size=m.head_size,
                   dtype=m.dtype, scale=m.scale, layout="shuffled")  # fmt: skip
        for b in batches:
            out += [
                (f"self-decode:{name}", Shape("decoder", query_lens=(1,) * b,
                                              context_lens=(dec - 1,) * b, **geo)),
                (f"cross-decode:{name}", Shape("encoder_decoder", query_lens=(1,) * b,
                                               context_lens=(1,) * b, encoder_seq_lens=(enc,) * b,
                                               **geo)),
                (f"cross-prefill:{name}", Shape("encoder_decoder", query_lens=(PROMPT_TOKENS,) * b,
                                                encoder_seq_lens=(enc,) * b, **geo)),
                (f"encoder:{name}", Shape("encoder", encoder_seq_lens=(enc,) * b, **geo)),
            ]  # fmt: skip
    return out


def cases_workloads(path: str) -> list[tuple[str, Shape]]:
    from conformance.cases import lower, read_cases_file

    shapes = [c if isinstance(c, Shape) else lower(c) for c in read_cases_file(path)]
    runner.check_fits(shapes, f"--cases {path}")
    episodes = [s.id for s in shapes if s.attn_kind == "episode"]
    if episodes:
        raise ValueError(f"--cases: an episode has no one step to time ({episodes[0]})")
    return [(f"shape:{s.id}", s) for s in shapes]


def _work(step) -> tuple[int, float, bool]:
    """(K/V bytes the step reads, its visible FLOPs, memory-bound?) from its metadata."""
    md, kind = step.metadata, step.attn_kind
    q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
    cache = step.kv_cache[0] if step.kv_cache is not None else step.key
    num_kv_heads, head_size = cache.shape[-2], cache.shape[-1]
    kv_bytes = 2 * sum(kv_lens) * num_kv_heads * head_size * cache.element_size()
    mask = lambda i: md.sequence_mask(kind, i)
    visible = sum(int(mask(i).sum()) for i in range(md.num_seqs))
    flops = 4.0 * visible * step.query.shape[1] * head_size
    return kv_bytes, flops, max(q_lens) <= 16


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
    from bench.gpu import median_ms

    ms = median_ms(call)
    gms, why = _graph_ms(call)
    return ms, gms, "graph" if why is None else f"do_bench only (not captured: {why})"


def _graph_ms(call) -> tuple[float, str | None]:
    from bench.gpu import graph_ms

    why: list[str] = []
    try:
        torch.cuda.synchronize()
        g = graph_ms(call, why=why)
    except Exception as e:  # said in the row, never a silent fallback
        return math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return g, None if g == g else (why[0] if why else "capture failed")


def backend_rows(
    workloads: list[tuple[str, Shape]],
    picked: list[tuple[object, str]],
    limits=None,
    progress=None,
) -> list[dict]:
    """One row per workload × backend (see the module docstring), plus the limit's row;
    `progress(rows)` after each workload (the CLI rewrites its CSV: a run cut short keeps it)."""
    rows = []
    for workload, shape in workloads:
        for backend, spec in picked:
            rows.append(_one(workload, shape, backend, spec, limits))
        base = rows[-1]
        if limits is not None:
            rows.append(_limit_row(base, shape, limits))
        print(f"# {workload} {shape.id}: {len(picked)} backends", flush=True)
        if progress is not None:
            progress(rows)
    return rows


def _columns(workload: str, shape: Shape, step, backend: str, spec: str, device: str) -> dict:
    md = step.metadata
    q_lens, kv_lens = md.query_lens_for(step.attn_kind), md.kv_lens_for(step.attn_kind)
    return dict(
        workload=workload, backend=backend, batch=md.num_seqs, context_len=max(kv_lens),
        query_len=max(q_lens), num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size, block_size=shape.block_size if step.kv_cache else 0,
        dtype=shape.dtype, kv_cache_dtype=shape.kv_cache_dtype, device=device,
        backend_module=spec,
    )  # fmt: skip


def _one(workload: str, shape: Shape, backend, spec: str, limits) -> dict:
    name = str(getattr(backend, "name", spec))
    reads = bool(getattr(backend, "fp8_prefill_reads_inputs", False))
    inputs, (exp,) = runner.expected_for(shape, reads)
    device = torch.device(backend.device())
    label = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    cols = _columns(workload, shape, inputs, name, spec, label)
    row = BenchRow(**cols, median_ms=math.nan).__dict__
    # 1. the matrix's verdict on this step (one call)
    (status, reason), = [
        (r["status"], r["reason"])
        for r in runner.run_case(shape, backend, metamorphic=False, rerun=False, module=spec)
        if r["step"].startswith("0:")
    ]  # fmt: skip
    row["status"] = status
    if status != Status.PASS:
        row["timed"] = f"not timed: {reason}"[:300]
        return row
    # 2. its time, on a fresh copy of the same inputs
    mine = inputs.to(device, copy=True)
    if getattr(backend, "finite_unowned_slots", False):
        runner.poison_finite(mine)
    prepare = getattr(backend, "prepare", None)
    call = prepare(*mine.args()) if prepare else (lambda: backend.forward(*mine.args()))
    # 3. what is timed is what was judged: the prepared call's own output, as in step 1
    judged, problem = runner.guarded(
        lambda: compare_output(mine, call(), exp.output, exp.baseline_err, backend=backend),
        what="the prepared call",
    )
    if problem or judged.status != Status.PASS:
        why = problem or f"{judged.status}: {judged.reason}"
        row["status"] = Status.ERROR if problem else judged.status
        row["timed"] = f"not timed: prepare()'s call is not what forward() does ({why})"[:300]
        return row
    ms, gms, how = _times(call, device)
    kv_bytes, flops, memory = _work(inputs)
    best = gms if gms == gms else ms
    row.update(median_ms=ms, graph_ms=gms, timed=how, gbps=kv_bytes / ms / 1e6,
               tflops=flops / ms / 1e9, graph_gbps=kv_bytes / gms / 1e6)  # fmt: skip
    if limits is not None:
        lim = limits.copy_gbps(kv_bytes) if memory else limits.matmul_tflops
        got = kv_bytes / best / 1e6 if memory else flops / best / 1e9
        text = f"copy {lim:.0f} GB/s" if memory else f"bf16 matmul {lim:.0f} TFLOP/s"
        row.update(frac_of_limit=got / lim, limit=text)
    runner._recover(device)
    return row


def _limit_row(base: dict, shape: Shape, limits) -> dict:
    inputs, _ = runner.expected_for(shape)
    kv_bytes, flops, memory = _work(inputs)
    row = {k: base[k] for k in ("workload", "batch", "context_len", "query_len", "num_heads",
                                "num_kv_heads", "head_size", "block_size", "dtype",
                                "kv_cache_dtype", "device")}  # fmt: skip
    if memory:
        lim = limits.copy_gbps(kv_bytes)
        return BenchRow(**row, backend="copy", median_ms=2 * kv_bytes / lim / 1e6, gbps=lim,
                        frac_of_limit=1.0, limit="measured").__dict__  # fmt: skip
    lim = limits.matmul_tflops
    return BenchRow(**row, backend="matmul", median_ms=flops / lim / 1e9, tflops=lim,
                    frac_of_limit=1.0, limit="measured").__dict__  # fmt: skip


def peers() -> list[tuple[object, str]]:
    """Every registered backend that can run here, the reference excepted."""
    from optimized.backend import backend_names, get_backend

    out = []
    for name in backend_names():
        if name == "reference":
            continue
        b = get_backend(name)
        if not b.unavailable_reason():
            out.append((b, ""))
    return out
