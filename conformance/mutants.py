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
    bias_direction_reversed  T5's bias of the query's position minus the key's
    bias_step_positions      decoder queries biased at their index in the step, not their
                             absolute position
    bias_table_by_kv_head    the bias table's column read by kv head, not query head
    bias_on_cross            cross-attention adds the decoder's bias too
    bias_table_one_short     the table a row short: the last bucket reads the one before it

`run_catalogue` searches one process serially; `python -m conformance mutate` runs the same
search on the engine (`mutant_tests`, conformance/engine.py): in parallel, crashes and hangs
isolated, each fault's search cut at its first catch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from conformance.schema import Status
from optimized.backend import BaseBackend
from reference.attention import textbook_attention
from reference.fp8 import dequantize
from reference.metadata import AttnKind, StepMetadata
from reference.paged_cache import gather_sequence
from reference.position_bias import relative_position_bucket

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
    "bias_direction_reversed",
    "bias_step_positions",
    "bias_table_by_kv_head",
    "bias_on_cross",
    "bias_table_one_short",
)
BIAS_FAULTS = tuple(f for f in FAULTS if f.startswith("bias_"))


def affects(fault: str, step, seen_bias: bool = False) -> bool:
    """Whether `fault` changes anything at this step (`seen_bias`: an earlier step of its case
    had a position bias)."""
    md, kind, query, key = step.metadata, AttnKind(step.attn_kind), step.query, step.key
    decoder, cross = kind == AttnKind.DECODER, kind == AttnKind.ENCODER_DECODER
    fp8 = md.fp8 and kind != AttnKind.ENCODER
    kv_heads = (key if key is not None else step.kv_cache[0]).shape[-2]
    bias = md.position_bias != "none"
    return {
        "bias_direction_reversed": bias,
        "bias_step_positions": bias and decoder and any(md.context_lens),
        "bias_table_by_kv_head": bias and query.shape[1] > kv_heads,
        "bias_on_cross": cross and seen_bias,
        "bias_table_one_short": bias,
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


def touches(fault: str, shape) -> bool:
    """Whether `fault` changes anything at some step of `shape` (a Shape), from its fields
    alone: a case none of whose steps it touches is not run for it."""
    from conformance.memory import steps

    fp8, bias = shape.kv_cache_dtype != "auto", shape.position_bias != "none"
    gqa, per_head = shape.num_heads > shape.num_kv_heads, len(shape.k_scale or ()) > 1
    scale = shape.scale if shape.scale is not None else shape.head_size**-0.5
    episode = shape.attn_kind == "episode"
    for st in steps(shape):
        decoder, cross = st.attn_kind == "decoder", st.attn_kind == "encoder_decoder"
        cached, new = st.attn_kind != "encoder", st.new_kv_rows > 0
        biased = bias and not cross
        if {
            "causal_end_off_by_one": decoder and max(st.q_lens) > 1,
            "window_off_by_one": decoder and st.window is not None,
            "dropped_last_key": True,
            "wrong_kv_head": shape.num_kv_heads != 1,
            "self_table_for_cross": cross and episode,
            "stale_cross_cache": cross and new,
            "neighbour_slot_write": cached and new,
            "padding_slots_written": cached and new and shape.padding_tokens > 0,
            "scale_ignored": scale != 1.0,
            "fp8_scales_ignored": fp8 and cached,
            "fp8_scales_twice": fp8 and cached,
            "fp8_scale_by_query_head": fp8 and cached and per_head and gqa,
            "nondeterministic": True,
            "bias_direction_reversed": biased,
            "bias_step_positions": biased and decoder and any(st.first),
            "bias_table_by_kv_head": biased and gqa,
            "bias_on_cross": cross and bias and episode,
            "bias_table_one_short": biased,
        }[fault]:
            return True
    return False


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
        if md.position_bias != "none" and kind == AttnKind.DECODER:
            self.decoder_bias = md  # what a kernel that biases cross-attention too would add
        elif kind == AttnKind.ENCODER:
            self.decoder_bias = None  # a new case
        if not affects(self.fault, step, getattr(self, "decoder_bias", None) is not None):
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
            return out if self.calls % 2 else torch.nextafter(out, torch.full_like(out, math.inf))
        if f in ("stale_cross_cache", "neighbour_slot_write", "padding_slots_written"):
            _touch_caches(f, md, kind, key, value, kv_cache, before)
            return out
        return _spec_with_fault(f, query, key, value, kv_cache, md, kind, out,
                                getattr(self, "decoder_bias", None))  # fmt: skip


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


def _spec_with_fault(fault, query, key, value, kv_cache, md, kind, out, decoder_bias=None):
    """The step's output the spec's way (float64, on the backend's written caches) with one of
    the in-kernel faults; padding rows as the backend left them. `decoder_bias`: the metadata
    of the case's last decoder step with a bias (for a bias on cross-attention)."""
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
        if fault in BIAS_FAULTS:
            bias = _bias_with_fault(fault, md, kind, i, q.shape[1], k.shape[1], decoder_bias)
        o = textbook_attention(q, k, v, mask, md.scale_for(q.shape[-1]), bias)
        result[starts[i] : starts[i] + q_lens[i]] = o.to(out.dtype)
    return result


def _bias_with_fault(fault, md, kind, seq, num_heads, num_kv_heads, decoder_bias):
    """[num_heads, q_len, kv_len] float64: T5's bias of sequence `seq` with the fault."""
    source = decoder_bias if fault == "bias_on_cross" else md
    bidirectional = kind == AttnKind.ENCODER
    q_len, kv_len = md.query_lens_for(kind)[seq], md.kv_lens_for(kind)[seq]
    first = md.context_lens[seq] if kind != AttnKind.ENCODER else 0
    if fault == "bias_step_positions":
        first = 0
    relative = torch.arange(kv_len)[None, :] - (first + torch.arange(q_len))[:, None]
    if fault == "bias_direction_reversed":
        relative = -relative
    buckets = source.relative_attention_num_buckets
    bucket = relative_position_bucket(relative, bidirectional, buckets,
                                      source.relative_attention_max_distance)  # fmt: skip
    if fault == "bias_table_one_short":
        bucket = bucket.clamp(max=buckets - 2)
    table = source.relative_attention_bias.double()
    if fault == "bias_table_by_kv_head":  # head h reads column h // group
        table = table[:, torch.arange(num_heads) // (num_heads // num_kv_heads)]
    return table.cpu()[bucket].permute(2, 0, 1)


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

    order = search_order(shapes)
    verdicts = []
    for fault in faults:
        mutant = Mutant(backend, fault)
        failing = run = 0
        first = ""
        for shape in order:
            if not touches(fault, shape):
                continue
            rows = runner.run_case(shape, mutant, module=module)
            run += 1
            bad = sum(r["status"] in (Status.FAIL, Status.ERROR) for r in rows)
            failing += bad
            if bad and not first:
                first = shape.id
                if not every:
                    break
        verdicts.append(Verdict(fault, backend.name, bool(failing), failing, run, first))
        if progress is not None:
            progress(verdicts[-1])
    return verdicts


def search_order(shapes) -> list:
    """The shapes cheapest to run first (a fault's search mostly ends at its first catch): by
    the tiles a step's kernel walks (16 queries × 64 keys a sequence, per kv head) and a cost
    per step, then by id."""
    from conformance.memory import steps

    def cost(s):
        tiles = lambda st: sum(-(-q // 16) * -(-k // 64) for q, k in zip(st.q_lens, st.kv_lens))
        return sum(20 + tiles(st) * s.num_kv_heads for st in steps(s))

    return sorted(shapes, key=lambda s: (cost(s), s.id))


def mutant_tests(shapes, picked, faults=FAULTS, keep=lambda test_id: True) -> tuple:
    """The engine's tests of a catalogue search (`python -m conformance mutate`): the shapes
    cheapest first, each with every backend (`picked`: (backend, module spec)) and every fault
    that touches it (a job: a case's faults of one backend, its reference computed once)."""
    from conformance.engine import Test

    order = search_order(shapes)
    return tuple(
        Test(shape, backend.name, spec, fault)
        for shape in order
        for backend, spec in picked
        if keep(f"{shape.id}::{backend.name}")
        for fault in faults
        if touches(fault, shape)
    )


def verdicts(tests, rows: list[dict], faults, backends) -> list[Verdict]:
    """Per backend × fault, from an engine run of `mutant_tests`' rows: caught (a row failed or
    errored), by how many failing rows in how many tests, the first test (in plan order) that
    caught it."""
    by_test: dict[tuple, list[dict]] = {}
    for r in rows:
        by_test.setdefault((r["case_id"], r["backend"]), []).append(r)
    out = []
    for backend in backends:
        for fault in faults:
            mine = [t for t in tests if t.backend == backend and t.fault == fault]
            ran = [t for t in mine if t.key in by_test]
            bad = {t.key: sum(r["status"] in (Status.FAIL, Status.ERROR) for r in by_test[t.key])
                   for t in ran}  # fmt: skip
            first = next((t.shape.id for t in ran if bad[t.key]), "")
            failing = sum(bad.values())
            out.append(Verdict(fault, backend, failing > 0, failing, len(ran), first))
    return out
