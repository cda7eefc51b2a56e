"""A catalogue of the bugs paged attention kernels have, planted around any backend: how strong is
a selection of cases (`python -m conformance mutate`)? A selection that lets a planted fault
pass every row would let that bug through too.

`Mutant(backend, fault)` is the backend with one fault. Faults that a kernel's inputs or results
can express are planted around the backend's own call (its metadata changed, its caches touched
after it wrote them, its inputs rolled); faults inside a kernel's loop (a mask off by one, a
dropped key, a wrong table, fp8 scales read wrong) replace its output, on the steps they touch,
with attention computed the spec's way with that fault (the backend still writes its caches).

    causal_end_off_by_one    a decoder query also sees the key one past its position
    window_off_by_one        the sliding window one token wider
    dropped_last_key         each sequence's last key never read
    wrong_kv_head            query heads read the next kv head (the GQA mapping)
    self_table_for_cross     cross-attention reads through the self-attention block table
    stale_cross_cache        the cross cache not written at a sequence's first decoder step
    neighbour_slot_write     each new K/V token written one slot further
    padding_slots_written    padding rows' K/V written into slot 0
    scale_ignored            the softmax scale taken as 1
    fp8_scales_ignored       fp8 caches read and written with scale 1
    fp8_scales_twice         an fp8 value read back times its scale twice
    fp8_scale_by_query_head  per-kv-head fp8 scales indexed by the query head
    nondeterministic         every second call one ulp off
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from optimized.backend import BaseBackend
from reference.attention import textbook_attention
from reference.fp8 import dequantize
from reference.metadata import AttnKind, StepMetadata
from reference.paged_cache import gather_sequence

FAULTS = (
    "causal_end_off_by_one",
    "window_off_by_one",
    "dropped_last_key",
    "wrong_kv_head",
    "self_table_for_cross",
    "stale_cross_cache",
    "neighbour_slot_write",
    "padding_slots_written",
    "scale_ignored",
    "fp8_scales_ignored",
    "fp8_scales_twice",
    "fp8_scale_by_query_head",
    "nondeterministic",
)


def affects(fault: str, step) -> bool:
    """Whether `fault` changes anything at this step (a case none of whose steps it touches is
    not run for it)."""
    md, kind, query, key = step.metadata, AttnKind(step.attn_kind), step.query, step.key
    decoder, cross = kind == AttnKind.DECODER, kind == AttnKind.ENCODER_DECODER
    fp8 = md.fp8 and kind != AttnKind.ENCODER
    kv_heads = (key if key is not None else step.kv_cache[0]).shape[-2]
    return {
        "causal_end_off_by_one": decoder and max(md.query_lens) > 1,
        "window_off_by_one": decoder and md.sliding_window is not None,
        "dropped_last_key": True,
        "wrong_kv_head": kv_heads != 1,
        "self_table_for_cross": cross and md.block_tables is not None,
        "stale_cross_cache": cross and key is not None,
        "neighbour_slot_write": kind != AttnKind.ENCODER and key is not None,
        "padding_slots_written": kind != AttnKind.ENCODER
        and key is not None
        and key.shape[0] > sum(md.new_kv_lens_for(kind)),
        "scale_ignored": md.scale_for(query.shape[-1]) != 1.0,
        "fp8_scales_ignored": fp8,
        "fp8_scales_twice": fp8,
        "fp8_scale_by_query_head": fp8 and md.k_scale.numel() > 1 and query.shape[1] > kv_heads,
        "nondeterministic": True,
    }[fault]


@dataclass(frozen=True)
class _Step:
    attn_kind: AttnKind
    metadata: StepMetadata
    query: torch.Tensor
    key: torch.Tensor | None
    kv_cache: tuple | None


class Mutant(BaseBackend):
    """`backend` with one planted `fault` (FAULTS); everything else is the backend's own."""

    def __init__(self, backend, fault: str):
        if fault not in FAULTS:
            raise ValueError(f"fault: expected one of {FAULTS}, got {fault!r}")
        self.inner, self.fault = backend, fault
        self.name, self.capabilities = f"{backend.name}~{fault}", backend.capabilities
        self.calls = 0

    def unavailable_reason(self):
        return self.inner.unavailable_reason()

    def device(self):
        return self.inner.device()

    def not_supported_reasons(self, *args):
        return self.inner.not_supported_reasons(*args)

    def forward(self, query, key, value, kv_cache, md, kind):
        kind = AttnKind(kind)
        self.calls += 1
        step = _Step(kind, md, query, key, kv_cache)
        if not affects(self.fault, step):
            return self.inner.forward(query, key, value, kv_cache, md, kind)
        f = self.fault
        if f in ("window_off_by_one", "scale_ignored", "fp8_scales_ignored"):
            if f == "window_off_by_one":
                changed = dict(sliding_window=md.sliding_window + 1)
            elif f == "scale_ignored":
                changed = dict(scale=1.0)
            else:
                changed = dict(
                    k_scale=torch.ones_like(md.k_scale), v_scale=torch.ones_like(md.v_scale)
                )
            return self.inner.forward(query, key, value, kv_cache, replace(md, **changed), kind)
        if f == "wrong_kv_head":
            roll = lambda t: None if t is None else t.roll(1, dims=-2)
            caches = None if kv_cache is None else tuple(roll(c) for c in kv_cache)
            out = self.inner.forward(query, roll(key), roll(value), caches, md, kind)
            if kv_cache is not None:  # the caches as the backend wrote them, unrolled
                for c, written in zip(kv_cache, caches):
                    c.copy_(written.roll(-1, dims=-2))
            return out
        before = None if kv_cache is None else tuple(c.clone() for c in kv_cache)
        out = self.inner.forward(query, key, value, kv_cache, md, kind)
        if f == "nondeterministic":
            return out if self.calls % 2 else torch.nextafter(out, torch.full_like(out, 1e9))
        if f in ("stale_cross_cache", "neighbour_slot_write", "padding_slots_written"):
            _touch_caches(f, md, kind, key, value, kv_cache, before)
            return out
        return _spec_with_fault(f, query, key, value, kv_cache, md, kind, out)


def _touch_caches(fault, md, kind, key, value, kv_cache, before) -> None:
    """The caches after the backend's write, with the fault's write instead."""
    slots = md.tables_for(kind)[1]
    real = slots[slots >= 0].long()
    flat = [c.view(-1, *c.shape[2:]) for c in kv_cache]
    old = [b.view(-1, *b.shape[2:]) for b in before]
    if fault == "stale_cross_cache":  # as it was before this step: never written
        for c, b in zip(flat, old):
            c[real] = b[real]
    elif fault == "neighbour_slot_write":
        for c, b in zip(flat, old):
            moved = c[real].clone()
            c[real] = b[real]
            nxt = (real + 1) % c.shape[0]
            c[nxt] = moved
    else:  # padding rows (past the step's new tokens) into slot 0
        n = sum(md.new_kv_lens_for(kind))
        for c, t in zip(flat, (key, value)):
            c[0] = t[n].to(c.dtype)


def _spec_with_fault(fault, query, key, value, kv_cache, md, kind, out) -> torch.Tensor:
    """The step's output the spec's way (float64, on the backend's written caches) with one of
    the in-kernel faults; padding rows as the backend left them."""
    result = out.clone()
    q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
    starts = md.encoder_start_loc if kind == AttnKind.ENCODER else md.query_start_loc
    tables = md.tables_for(kind)[0]
    if fault == "self_table_for_cross":
        tables = md.block_tables
    scales = (md.k_scale, md.v_scale) if md.fp8 and kind != AttnKind.ENCODER else (None, None)
    for i in range(md.num_seqs):
        q = query[starts[i] : starts[i] + q_lens[i]]
        if kind == AttnKind.ENCODER:
            k, v = (t[starts[i] : starts[i] + q_lens[i]] for t in (key, value))
        else:
            k, v = (_read(c, tables[i], kv_lens[i], s, fault, query.shape[1], md)
                    for c, s in zip(kv_cache, scales))  # fmt: skip
        mask = md.sequence_mask(kind, i).to(q.device)
        if fault == "causal_end_off_by_one":  # the key one past each query's own position too
            past = torch.roll(mask, 1, dims=1)
            past[:, 0] = False
            mask = mask | past
        if fault == "dropped_last_key":  # where the row has another key to see
            mask[:, -1] &= ~mask[:, :-1].any(1)
        bias = md.position_bias_for(kind, i)
        o = textbook_attention(q, k, v, mask, md.scale_for(q.shape[-1]), bias)
        result[starts[i] : starts[i] + q_lens[i]] = o.to(out.dtype)
    return result


def _read(cache, table, n, scale, fault, num_heads, md):
    """A sequence's K or V from the cache, read back with the fault's fp8 scale rule; with the
    scales indexed by query head, one K/V head per query head (each its own wrong scale)."""
    need = -(-n // cache.shape[1])
    if table.shape[0] < need:  # another sequence's table (the self one for cross reads)
        table = table.repeat(-(-need // table.shape[0]))
    stored = gather_sequence(cache, table, n)
    if scale is None:
        return stored
    if fault == "fp8_scales_twice":
        return dequantize(stored, scale * scale)
    if fault == "fp8_scale_by_query_head":
        group = num_heads // stored.shape[1]
        per_query = stored.repeat_interleave(group, 1)  # query head h: its kv head's values
        wrong = scale.reshape(-1)[torch.arange(num_heads) % scale.numel()]
        return dequantize(per_query, wrong)
    return dequantize(stored, scale)


@dataclass(frozen=True)
class Verdict:
    """One fault against a selection with one backend: caught or not, by how many failing rows
    (of the tests run for it), the first test that caught it."""

    fault: str
    backend: str
    caught: bool
    failing_rows: int
    tests_run: int
    first: str = ""


def run_catalogue(shapes, backend, module: str = "", faults=FAULTS, every: bool = False,
                  progress=None) -> list[Verdict]:  # fmt: skip
    """Each fault planted around `backend` against the shapes (cheapest first), the tests it
    does not touch left out; a fault is caught when a row fails or errors. Unless `every`, the
    search for a fault stops at its first catch."""
    from conformance import runner
    from conformance.workloads import Episode

    order = sorted(shapes, key=lambda s: (s.footprint(), s.id))
    built = {}
    verdicts = []
    for fault in faults:
        mutant = Mutant(backend, fault)
        failing = run = 0
        first = ""
        for shape in order:
            if shape.id not in built:
                b = shape.build("cpu")
                built[shape.id] = b.steps if isinstance(b, Episode) else (b,)
            if not any(affects(fault, step) for step in built[shape.id]):
                continue
            rows = runner.run_case(shape, mutant, module=module)
            run += 1
            bad = sum(r["status"] in ("fail", "error") for r in rows)
            failing += bad
            if bad and not first:
                first = shape.id
                if not every:
                    break
        verdicts.append(Verdict(fault, backend.name, bool(failing), failing, run, first))
        if progress is not None:
            progress(verdicts[-1])
    return verdicts
