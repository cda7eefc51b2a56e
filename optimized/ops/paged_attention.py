"""The paged-attention op: validate the layouts, plan the launch (`optimized/ops/plan.py`:
tiles, launch, splits, heads per program), launch `_paged_attention_kernel` (with split-K the
last split merges the partials, or `_split_k_reduce_kernel` runs after it).

    plan = plan_attention(query, key_cache, value_cache, schedule, causal=...)   # once per step
    launch(plan, query, key_cache, value_cache, block_tables, schedule, ...)      # per layer
    paged_attention(...)                                                           # both at once

Shapes as in `optimized/kernels/paged_attention.py`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

from optimized.kernels import interpreting, next_power_of_2
from optimized.kernels.paged_attention import _paged_attention_kernel, _split_k_reduce_kernel
from optimized.ops.plan import (
    Card,
    Compiled,
    Geometry,
    Launch,
    Plan,
    Schedule,
    card_of,
    make_plan,
    program_shape,
)
from optimized.ops.reshape_and_cache import FP8_FORMATS, check_scales

LOG2E = 1.4426950408889634


@functools.cache
def _unused_fp32(device: torch.device) -> torch.Tensor:
    """A stand-in for the partials and scales where there are none (never read or written):
    one per device, not an allocation per call."""
    return torch.empty(1, dtype=torch.float32, device=device)


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, n: int) -> torch.Tensor:
    """The fused reduce's arrival counters, one int32 per (tile, kv head), zero between launches
    (the last program of each resets its own): allocated once per device and grown in powers of
    two, never inside a CUDA-graph capture. Launches on one device share them, so they must not
    run concurrently on two streams."""
    have = _ARRIVALS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"paged_attention: {n} split-K arrival counters needed inside a CUDA-graph "
                "capture; run the shape once before capturing it"
            )
        have = torch.zeros(max(4096, next_power_of_2(n)), dtype=torch.int32, device=device)
        _ARRIVALS[device] = have
    return have


def _check(query, key_cache, value_cache, block_tables, paged: bool, k_scale, v_scale) -> None:
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError(
            f"query: expected a [num_tokens, num_heads, head_size] tensor with a "
            f"contiguous last dim, got shape {list(query.shape)}"
        )
    want_dims = 4 if paged else 3
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dim() != want_dims or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected {want_dims} dims with a contiguous last dim, "
                f"got shape {list(t.shape)}"
            )
        fp8 = t.dtype in FP8_FORMATS and paged
        if t.device != query.device or (t.dtype != query.dtype and not fp8):
            raise ValueError(
                f"{name}: expected {query.dtype} (or an fp8 dtype, paged) on {query.device}, "
                f"got {t.dtype} on {t.device}"
            )
        if t.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"{name}: head_size {t.shape[-1]} != query head_size {query.shape[-1]}"
            )
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"value_cache: expected {key_cache.dtype} like key_cache")
    if key_cache.dtype in FP8_FORMATS:
        check_scales(k_scale, v_scale, key_cache.shape[-2], query.device)
    if paged and (block_tables is None or block_tables.device != query.device):
        raise ValueError(
            "block_tables: expected a [num_seqs, max_blocks] tensor on the query's device"
        )
    if query.shape[1] % key_cache.shape[-2]:
        raise ValueError(
            f"num_kv_heads: {key_cache.shape[-2]} does not divide num_heads={query.shape[1]}"
        )


def _constexprs(query, key_cache, plan_heads, block_m, causal, window, paged, bias=None) -> dict:
    head_size = query.shape[-1]
    group = query.shape[1] // key_cache.shape[-2]
    head_pad = max(16, next_power_of_2(head_size))
    block_size = key_cache.shape[1] if paged else 1
    fp32 = query.dtype == torch.float32
    return dict(
        BLOCK_M=block_m,
        GROUP_PAD=next_power_of_2(group),
        HEAD_PAD=head_pad,
        EVEN_D=head_size == head_pad,
        PAGED=paged,
        POW2_BLOCK=block_size & (block_size - 1) == 0,
        CAUSAL=causal,
        WINDOW=window > 0,
        # The interpreter computes bf16 tl.dot on raw bits (triton issue 11584): upcast there.
        UPCAST_DOT=interpreting() and query.dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products (no TF32): the fp32 tolerance assumes it.
        DOT_PRECISION="ieee" if fp32 else "tf32",
        HEADS=plan_heads,
        KV_FP8=key_cache.dtype in FP8_FORMATS,
        BIAS=bias is not None,
    )


def _kernel_args(
    plan_args: tuple,
    query,
    key_cache,
    value_cache,
    block_tables,
    schedule,
    out,
    scales,
    scale,
    bias=None,
) -> tuple:
    """The main kernel's positional arguments (`plan_args`: splits, tiles per split, partials
    m/l/acc, arrivals, fused flag; `scales`: k, v, stride; `bias`: (lookup table, reach))."""
    splits, tiles_per_split, part_m, part_l, part_acc, arrivals, fuse, window, paged = plan_args
    block_size = key_cache.shape[1] if paged else 1
    bt = block_tables if paged else schedule.kv_lens  # any int tensor when unused
    k_scale, v_scale, scale_stride = scales
    lut, reach = bias if bias is not None else (_unused_fp32(query.device), 0)
    return (
        out, query, key_cache, value_cache, bt,
        schedule.tile_seq, schedule.tile_q_first, schedule.query_start_loc,
        schedule.query_lens, schedule.kv_lens, schedule.context_lens, schedule.kv_start_loc,
        part_m, part_l, part_acc, arrivals, k_scale, v_scale, lut,
        scale * LOG2E, window, block_size, block_size.bit_length() - 1, splits, tiles_per_split,
        query.stride(0), query.stride(1),
        key_cache.stride(0) if paged else 0, key_cache.stride(-3), key_cache.stride(-2),
        value_cache.stride(0) if paged else 0, value_cache.stride(-3), value_cache.stride(-2),
        bt.stride(0), query.shape[1] // key_cache.shape[-2], query.shape[-1], int(fuse),
        scale_stride, reach, lut.stride(0),
    )  # fmt: skip


# What each compiled variant costs an SM, by (device, dtypes, constexprs, launch): in memory, in
# a table shipped per card (`_shipped`, compiled without the card), and on disk beside Triton's
# cache (`_probe_file`), so a machine compiles no candidate it does not launch.
_COMPILED: dict[tuple, Compiled] = {}


def _scales(query, key_cache, k_scale, v_scale) -> tuple:
    if key_cache.dtype not in FP8_FORMATS:
        unused = _unused_fp32(query.device)
        return unused, unused, 0
    return k_scale.contiguous(), v_scale.contiguous(), 0 if k_scale.numel() == 1 else 1


def _specialization(args: tuple) -> tuple:
    """How Triton specializes these arguments (a pointer's and a specialized integer's 16-byte
    divisibility, an integer equal to 1): part of what a compiled variant is."""
    skip = set(_paged_attention_kernel.do_not_specialize)
    names = _paged_attention_kernel.arg_names
    return tuple(
        (a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0)
        for name, a in zip(names, args)
        if isinstance(a, torch.Tensor) or (isinstance(a, int) and name not in skip)
    )


def _probe_name(key: tuple) -> str:
    """A compiled variant's name: its key, Triton's version and the kernel's source, hashed."""
    import hashlib

    import triton

    text = repr((triton.__version__, _paged_attention_kernel.cache_key, key))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _probe_file(key: tuple) -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "encdec-attn-probe" / f"{_probe_name(key)}.json"


@functools.cache
def _shipped(cc: tuple[int, int]) -> dict[str, list[int]]:
    """The facts shipped for compute capability `cc` (optimized/ops/probes/sm<cc>.json, compiled
    without a card by tuning/probe.py), by name; {} where there are none."""
    try:
        path = Path(__file__).with_name("probes") / f"sm{cc[0]}{cc[1]}.json"
        return json.loads(path.read_text())["facts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _known(variant: tuple, launches: tuple[Launch, ...], device) -> list[tuple[tuple, Launch]]:
    """The launches whose compiled facts are nowhere yet: not in memory, not in the table
    shipped for the card, not on disk (those found are read into memory)."""
    todo = []
    cc = torch.cuda.get_device_capability(device)
    for c in launches:
        key = (*variant, cc, c)
        if key in _COMPILED:
            continue
        shipped = _shipped(tuple(cc)).get(_probe_name(key))
        if shipped is not None:
            _COMPILED[key] = Compiled(*shipped)
            continue
        try:
            _COMPILED[key] = Compiled(*json.loads(_probe_file(key).read_text()))
        except (OSError, ValueError, TypeError):
            todo.append((key, c))
    return todo


@contextlib.contextmanager
def _compiling(variant: tuple):
    """One process at a time compiles a variant's launches (an advisory lock beside the probe
    files): the others wait, then read its results and Triton's cache instead of compiling the
    same kernels at once (a cold run's workers meet the same variants together)."""
    try:
        import fcntl

        path = _probe_file(variant).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 (held while the body runs)
    except (ImportError, OSError):  # no lock here: each process compiles for itself
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _compile_all(variant: tuple, launches: tuple[Launch, ...], args: tuple, meta: dict) -> None:
    """Compile the launches not yet known, together (Triton's asynchronous compile mode), and
    record each one's registers and shared memory, in memory and on disk."""
    if not _known(variant, launches, args[1].device):
        return
    with _compiling(variant):
        todo = _known(variant, launches, args[1].device)  # another process may have done it
        if todo:
            _compile(todo, args, meta)


def _compile(todo: list[tuple[tuple, Launch]], args: tuple, meta: dict) -> None:
    from triton import AsyncCompileMode

    with AsyncCompileMode(_compile_pool()):
        pending = [
            (key, _paged_attention_kernel.warmup(*args, grid=(1,), **meta, TILE_N=c.tile_n,
                                                 num_warps=c.num_warps, num_stages=c.num_stages))
            for key, c in todo
        ]  # fmt: skip
    from triton.runtime.errors import OutOfResources

    for key, kernel in pending:
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        try:
            kernel._init_handles()  # loads the binary: registers are known from here on
            _COMPILED[key] = Compiled(kernel.n_regs, kernel.metadata.shared)
        except OutOfResources:  # more shared memory than a program may take: never launched
            _COMPILED[key] = Compiled(0, kernel.metadata.shared)
        path = _probe_file(key)
        with contextlib.suppress(OSError):  # a read-only cache only costs the next process
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(list(_COMPILED[key])))
            os.replace(tmp, path)


@functools.cache
def _compile_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def plan_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    schedule: Schedule,
    *,
    causal: bool,
    sliding_window: int | None = None,
    paged: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    bias: tuple[torch.Tensor, int] | None = None,
    card: Card | None = None,
    **overrides,
) -> Plan:
    """The plan of a call (`optimized.ops.plan.make_plan`) for `card` (default: the query's
    device's), its probe compiling the candidate launches for these tensors (registers and
    shared memory as compiled; nothing runs). `overrides`: num_splits, launch, heads,
    fused_reduce, reduce_rows, maxnreg (tuning, tests)."""
    window = (sliding_window or 0) if causal else 0
    num_kv_heads = key_cache.shape[-2]
    group = query.shape[1] // num_kv_heads
    card = card or card_of(query.device)
    # Heads a program and tile rows first: the constexprs they make are what the probe
    # compiles and what the launch choice is memoized under.
    heads, block_m, _ = program_shape(
        schedule, num_kv_heads, group, query.shape[-1], card, overrides.pop("heads", None)
    )
    meta = _constexprs(query, key_cache, heads, block_m, causal, window, paged, bias)
    variant = (query.dtype, key_cache.dtype, tuple(meta.items()))

    def probe(launches: tuple[Launch, ...]) -> list[Compiled]:
        unused = _unused_fp32(query.device)
        args = _kernel_args(
            (1, 1, unused, unused, unused, _arrivals(query.device, 1), False, window, paged),
            query, key_cache, value_cache, block_tables, schedule, query,
            _scales(query, key_cache, k_scale, v_scale), 1.0, bias,
        )  # fmt: skip
        full = (*variant, _specialization(args))
        _compile_all(full, launches, args, meta)
        cc = torch.cuda.get_device_capability(query.device)
        return [_COMPILED[(*full, cc, c)] for c in launches]

    geometry = Geometry(num_kv_heads, group, query.shape[-1], query.element_size(),
                        key_cache.element_size(), paged, bias is not None)  # fmt: skip
    return make_plan(schedule, geometry, card, probe, (query.device, *variant), heads=heads,
                     **overrides)  # fmt: skip


def launch(
    plan: Plan,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    schedule: Schedule,
    out: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    paged: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    bias: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Run `plan` (its kernels only: no decisions here). Returns `out`, which has the query's
    shape, dtype and strides (the kernel writes each row where the query's is)."""
    if out.shape != query.shape or out.stride() != query.stride() or out.dtype != query.dtype:
        raise ValueError(
            f"out: expected the query's layout ({query.dtype} {list(query.shape)}, strides "
            f"{query.stride()}), got {out.dtype} {list(out.shape)}, strides {out.stride()}"
        )
    num_tiles = schedule.tile_seq.shape[0]
    if num_tiles == 0:
        return out
    window = (sliding_window or 0) if causal else 0
    num_kv_heads = key_cache.shape[-2]
    num_programs = num_tiles * (num_kv_heads // plan.heads)
    part_m = part_l = part_acc = _unused_fp32(query.device)  # fp32 like the real partials, so
    if plan.num_splits > 1:  # both cases share one compiled kernel
        rows = num_programs * plan.num_splits * plan.block_m
        part_m = torch.empty(rows, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(rows, plan.wide, dtype=torch.float32, device=query.device)
    arrivals = _arrivals(query.device, num_programs if plan.fused_reduce else 1)
    m = _constexprs(query, key_cache, plan.heads, plan.block_m, causal, window, paged, bias)
    _paged_attention_kernel[(num_tiles, num_kv_heads // plan.heads, plan.num_splits)](
        *_kernel_args(
            (plan.num_splits, plan.tiles_per_split, part_m, part_l, part_acc, arrivals,
             plan.fused_reduce, window, paged),
            query, key_cache, value_cache, block_tables, schedule, out,
            _scales(query, key_cache, k_scale, v_scale), scale, bias,
        ),
        **m,
        TILE_N=plan.launch.tile_n,
        num_warps=plan.launch.num_warps,
        num_stages=plan.launch.num_stages,
        **({} if plan.maxnreg is None else dict(maxnreg=plan.maxnreg)),
    )  # fmt: skip
    if plan.reduce_rows:
        _split_k_reduce_kernel[(num_tiles, num_kv_heads, plan.block_m // plan.reduce_rows)](
            out, schedule.tile_seq, schedule.tile_q_first, schedule.query_start_loc,
            schedule.query_lens, part_m, part_l, part_acc, plan.num_splits, out.stride(0),
            out.stride(1), query.shape[1] // num_kv_heads, m["GROUP_PAD"], plan.block_m,
            query.shape[-1], HEAD_PAD=m["HEAD_PAD"], SPLITS_PAD=plan.splits_pad,
            ROWS=plan.reduce_rows,
        )  # fmt: skip
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    schedule: Schedule,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    paged: bool = True,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    bias: tuple[torch.Tensor, int] | None = None,
    plan: Plan | None = None,
    **overrides,
) -> torch.Tensor:
    """Attention of packed `query` over paged (or packed, `paged=False`) K/V; returns `out`.

    query: [num_tokens, num_heads, head_size]; K/V caches as in the module docstring, in the
    query's dtype or (paged) fp8 with `k_scale`/`v_scale` (float32 [1] or [num_kv_heads]).
    `bias`: T5's (lookup table times log2(e) [num_heads, 2 * reach + 1] float32, reach).
    Rows of `out` that belong to no sequence (padding) are left as they were (zeros by default).
    `plan`: a `plan_attention` result to launch as is; else one is made here (`overrides`:
    num_splits, launch, heads, fused_reduce, reduce_rows, maxnreg).
    """
    _check(query, key_cache, value_cache, block_tables, paged, k_scale, v_scale)
    if out is None:  # in the query's layout, as the kernel writes it
        out = torch.empty_strided(query.shape, query.stride(), dtype=query.dtype,
                                  device=query.device).zero_()  # fmt: skip
    if schedule.tile_seq.shape[0] == 0:
        return out
    common = dict(causal=causal, sliding_window=sliding_window, paged=paged, k_scale=k_scale,
                  v_scale=v_scale, bias=bias)  # fmt: skip
    if plan is None:
        plan = plan_attention(query, key_cache, value_cache, block_tables, schedule, **common,
                              **overrides)  # fmt: skip
    return launch(
        plan, query, key_cache, value_cache, block_tables, schedule, out, scale=scale, **common
    )
