"""What the reference expects of one case, computed once, on the device its backends run on.

    case = CaseRun.build(shape, device)   inputs built on the CPU (bit for bit what `dump` and
                                          `shrink` see), moved to the device once
    case.expected_for(reads_inputs)       the reference's answer per step (`Expected`)
    case.fresh()                          a backend's own copy of the inputs, cloned there

`reference.attention` is the spec: readable, one sequence at a time. Here the same math runs a
step at a time as one padded, masked computation (`batched_attention`): the step's sequences
padded to the longest of a group of similar ones, the causal and window masks and T5's bias
built for the whole group, float64 throughout, chunked so the scores of a chunk stay under
`CHUNK_BYTES`. It equals the readable reference to float64 rounding on every smoke case and on
random steps (conformance/tests/test_expected.py). Beside the output it computes, from the same
padded K/V, the tolerance's baseline (conformance/tolerance.py): the same attention in the
step's dtype, rounded after every op. A step's few scalars (baseline error, the output's scale,
its non-finite count) are read once.

One reference per case whatever the backends read: only at an fp8 prefill step with new K/V
does a backend that attends over the K/V as given (`fp8_prefill_reads_inputs`) get a second
answer for that step, computed beside the first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from conformance.workloads import Episode, Step
from reference.fp8 import per_head
from reference.metadata import AttnKind
from reference.paged_cache import write_to_cache
from reference.position_bias import relative_position_bucket
from reference.validation import check_inputs

CHUNK_BYTES = 256 << 20  # float64 scores of one chunk (conformance/memory.py counts on it)
# Sequences share a padded group while the padded (query, key) pairs stay within this factor of
# the real ones, or the group is tiny anyway (a launch costs more than its padding).
PAD_WASTE = 4
SMALL_PAIRS = 1 << 16
TEMPORARIES = 4  # float64 scores, masked scores, probabilities, the bias


@dataclass(frozen=True)
class Expected:
    """The reference's view of one step: output (float64, on the case's device), the cache rows
    it wrote, the baseline's max error, the output's max |value|, how many output values are not
    finite (a reference that failed), and its time.

    writes: (slots [n], key rows [n, num_kv_heads, head_size], value rows) the step wrote, or
            None (no cache): only the writes, not whole caches after every step."""

    output: torch.Tensor
    writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    baseline_err: float
    ref_scale: float
    ref_ms: float
    nonfinite: int = 0


def steps_of(inputs: Step | Episode) -> tuple[Step, ...]:
    return inputs.steps if isinstance(inputs, Episode) else (inputs,)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the padded computation --------------------------------------------------------------
def _groups(q_lens, kv_lens, pair_bytes: int) -> list[list[int]]:
    """Sequences in padded groups: sorted by (query, key) length, a group grows while its padded
    pairs stay within PAD_WASTE of its real ones (or small) and under CHUNK_BYTES' worth."""
    order = sorted(range(len(q_lens)), key=lambda i: (q_lens[i], kv_lens[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1] + [i]
            padded = len(g) * max(q_lens[j] for j in g) * max(kv_lens[j] for j in g)
            real = sum(q_lens[j] * kv_lens[j] for j in g)
            if (padded <= PAD_WASTE * real or padded <= SMALL_PAIRS) and (
                padded * pair_bytes <= CHUNK_BYTES
            ):
                groups[-1] = g
                continue
        groups.append([i])
    return groups


def _padded(starts: torch.Tensor, lens: torch.Tensor, width: int):
    """([seqs, width] packed row of each sequence's j-th token (0 past its end), valid)."""
    j = torch.arange(width, device=lens.device)
    valid = j[None, :] < lens[:, None]
    return torch.where(valid, starts[:, None] + j[None, :], 0), valid


def _gather(cache: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor, scale):
    """[seqs, width, num_kv_heads, head_size] float64 from the pages (fp8: times its scale)."""
    bs = cache.shape[1]
    pos = torch.arange(valid.shape[1], device=valid.device)
    blocks = torch.where(valid, tables[:, (pos // bs).clamp(max=tables.shape[1] - 1)].long(), 0)
    kv = cache[blocks, (pos % bs)[None, :].expand_as(blocks)].double()
    if scale is not None:
        kv = kv * per_head(scale, kv.shape[-2]).double()[:, None]
    return torch.where(valid[..., None, None], kv, 0.0)


def _attend(q, k, v, visible, scale: float, bias, dtype: torch.dtype | None):
    """Attention of padded q [s, lq, kv, g, d] over k/v [s, lk, kv, d] where `visible`
    [s, lq, lk]; `bias` [s, kv, g, lq, lk] or None; float64. With `dtype`, the tolerance's
    baseline (conformance/tolerance.py): q, k, v and every op's result rounded to `dtype`."""
    r = (lambda t: t) if dtype is None else (lambda t: t.to(dtype).double())
    q, k, v = r(q), r(k), r(v)
    scores = r(r(torch.einsum("sqngd,sknd->sngqk", q, k)) * scale)
    if bias is not None:
        scores = r(scores + r(bias))
    probs = r(torch.softmax(scores.masked_fill(~visible[:, None, None], -math.inf), dim=-1))
    return r(torch.einsum("sngqk,sknd->sqngd", probs, v))


def _bias(md, kind: AttnKind, first, reach: int, lq: int, lk: int, group: int, device):
    """T5's bias of a group [s, kv, g, lq, lk] float64: the spec's bucket of key position minus
    query position (queries at `first` + j, keys at their own; `reach` bounds how far a key
    can lie before its query), looked up in the table. The buckets are computed on the CPU, as
    the spec computes them (its float32 log), once per distance."""
    qpos = first[:, None] + torch.arange(lq, device=device)[None, :]
    distances = torch.arange(-reach, lk)
    bucket_of = relative_position_bucket(distances, kind == AttnKind.ENCODER,
                                         md.relative_attention_num_buckets,
                                         md.relative_attention_max_distance)  # fmt: skip
    relative = torch.arange(lk, device=device)[None, None, :] - qpos[:, :, None]
    buckets = bucket_of.to(device)[relative + reach]
    table = md.relative_attention_bias.double().to(device)
    b = table[buckets]  # [s, lq, lk, heads]
    return b.permute(0, 3, 1, 2).reshape(b.shape[0], -1, group, lq, lk)


def batched_attention(step: Step, reads_inputs: tuple[bool, ...] = (False,)):
    """The reference's step as padded, masked computations: writes the step's new K/V to its
    caches (in place, as `reference.attention` does), then per entry of `reads_inputs` (see
    `reference.attention`'s `prefill_reads_inputs`) the (float64 output, baseline output in the
    step's dtype) pair, each [num_tokens, num_heads, head_size] with padding rows zero."""
    query, key, value, kv_cache, md, kind = step.args()
    kind = check_inputs(query, key, value, kv_cache, md, kind)
    if kv_cache is not None and key is not None:
        slots = md.tables_for(kind)[1]
        write_to_cache(key, value, kv_cache[0], kv_cache[1], slots, md.k_scale, md.v_scale)
    return [_answer(step, kind, kind == AttnKind.ENCODER or (raw and md.is_prefill_only()))
            for raw in reads_inputs]  # fmt: skip


def _answer(step: Step, kind: AttnKind, from_inputs: bool):
    query, key, value, kv_cache, md, _ = step.args()
    dev, dtype = query.device, query.dtype
    num_heads, head_size = query.shape[1:]
    num_kv_heads = (key if from_inputs else kv_cache[0]).shape[-2]
    group = num_heads // num_kv_heads
    scale = md.scale_for(head_size)
    q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
    q_start = md.encoder_start_loc if kind == AttnKind.ENCODER else md.query_start_loc
    kv_start = md.query_start_loc if kind == AttnKind.DECODER else q_start
    if kind == AttnKind.ENCODER_DECODER:
        kv_start = md.cross_kv_start_loc
    first = md.context_lens if kind == AttnKind.DECODER else (0,) * md.num_seqs
    tables = md.tables_for(kind)[0]
    scales = (md.k_scale, md.v_scale) if md.fp8 and not from_inputs else (None, None)
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)
    q_lens_t, kv_lens_t, first_t = t(q_lens), t(kv_lens), t(first)
    q_start_t, kv_start_t = t(q_start[:-1]), t(kv_start[:-1])
    out = torch.zeros(query.shape, dtype=torch.float64, device=dev)
    base = torch.zeros(query.shape, dtype=torch.float64, device=dev)
    for g in _groups(q_lens, kv_lens, 8 * TEMPORARIES * num_heads):
        gi = t(g)
        lq, lk = max(q_lens[i] for i in g), max(kv_lens[i] for i in g)
        q_rows, q_valid = _padded(q_start_t[gi], q_lens_t[gi], lq)
        kv_idx, kv_valid = _padded(kv_start_t[gi], kv_lens_t[gi], lk)
        q = query[q_rows].double().reshape(len(g), lq, num_kv_heads, group, head_size)
        if from_inputs:
            k, v = (torch.where(kv_valid[..., None, None], x[kv_idx].double(), 0.0)
                    for x in (key, value))  # fmt: skip
        else:
            k = _gather(kv_cache[0], tables[gi], kv_valid, scales[0])
            v = _gather(kv_cache[1], tables[gi], kv_valid, scales[1])
        qpos = first_t[gi][:, None] + torch.arange(lq, device=dev)[None, :]
        kpos = torch.arange(lk, device=dev)[None, None, :]
        visible = kv_valid[:, None, :] & q_valid[:, :, None]
        if kind == AttnKind.DECODER:
            visible &= kpos <= qpos[:, :, None]
            if md.sliding_window is not None:
                visible &= kpos > qpos[:, :, None] - md.sliding_window
        visible |= ~q_valid[:, :, None]  # padding rows see everything (no NaN), then dropped
        bias = None
        if md.position_bias != "none":
            reach = max(first[i] for i in g) + lq
            bias = _bias(md, kind, first_t[gi], reach, lq, lk, group, dev)
        for h, r in _chunks(len(g), num_kv_heads, group, lq, lk):
            valid = q_valid[:, r]
            dest = q_rows[:, r][valid]
            cols = slice(h.start * group, h.stop * group)
            args = (q[:, r, h], k[:, :, h], v[:, :, h], visible[:, r], scale,
                    None if bias is None else bias[:, h, :, r])  # fmt: skip
            for into, rounded in ((out, None), (base, dtype)):
                o = _attend(*args, rounded)  # [seqs, rows, kv heads, group, head_size]
                into[dest, cols] = o[valid].reshape(len(dest), -1, head_size)
    return out, base


def _chunks(seqs: int, kv_heads: int, group: int, lq: int, lk: int):
    """(kv heads, query rows) slices of a group whose float64 scores, with their temporaries,
    fit CHUNK_BYTES: fewer kv heads first, then fewer query rows."""
    row = TEMPORARIES * 8 * seqs * group * lk  # one query row of one kv head
    heads = max(1, min(kv_heads, CHUNK_BYTES // max(1, row * lq)))
    rows = lq if row * lq <= CHUNK_BYTES else max(1, CHUNK_BYTES // row)
    for h0 in range(0, kv_heads, heads):
        for r0 in range(0, lq, rows):
            yield slice(h0, min(h0 + heads, kv_heads)), slice(r0, r0 + rows)


# ---- a case's answers ------------------------------------------------------------------------
def _reads_differ(step: Step) -> bool:
    """Whether a backend attending over the new K/V as given gets other numbers at this step:
    an fp8 cache's prefill step with new K/V (elsewhere the two conventions agree)."""
    md = step.metadata
    return md.fp8 and md.is_prefill_only() and step.key is not None


def expect_step(step: Step, reads_inputs: bool = False) -> Expected:
    """The reference's view of `step` (its caches are written): output, writes, baseline."""
    return _expect(step, (reads_inputs,))[0]


def _expect(step: Step, reads: tuple[bool, ...]) -> list[Expected]:
    """The step's answer per entry of `reads` (`batched_attention`), its scalars read once."""
    dev = step.query.device
    synchronize(dev)
    t0 = time.perf_counter()
    outputs = batched_attention(step, reads)
    writes = None
    if step.kv_cache is not None:
        slots = step.metadata.tables_for(step.attn_kind)[1]
        slots = slots[slots >= 0].long()
        bs = step.kv_cache[0].shape[1]
        writes = (slots, *(c[slots // bs, slots % bs].clone() for c in step.kv_cache))
    scalars = []
    for out, base in outputs:
        if out.numel():
            scalars += [(base - out).abs().max(), out.abs().max(), (~torch.isfinite(out)).sum()]
        else:
            scalars += [out.new_zeros(())] * 3
    values = torch.stack([x.double() for x in scalars]).tolist()
    ms = (time.perf_counter() - t0) * 1e3
    return [Expected(out, writes, *values[3 * i : 3 * i + 2], ms, int(values[3 * i + 2]))
            for i, (out, _) in enumerate(outputs)]  # fmt: skip


class CaseRun:
    """One case on its device: the inputs built on `build_device` (the CPU: the numbers `dump`
    and `shrink` see) and moved to `device` once (`pristine`, never handed to a backend), and
    the reference's answer for every step. A backend's copy is `fresh()`: cloned on the device.
    `clock`: a `runner.Clock`-like object whose `phase(name)` times the parts."""

    def __init__(self, shape, device, build_device="cpu", clock=None):
        from contextlib import nullcontext

        phase = clock.phase if clock is not None else (lambda name: nullcontext())
        self.shape, self.device = shape, torch.device(device)
        with phase("inputs"):
            self.pristine = shape.build(build_device).to(self.device)
        with phase("reference"):
            mine = self.pristine.with_fresh_cache()  # the reference writes its own caches
            self.steps = steps_of(self.pristine)
            answers, raw = [], {}
            for i, (step, ref_step) in enumerate(zip(self.steps, steps_of(mine))):
                both = _reads_differ(step)
                found = _expect(ref_step, (False, True) if both else (False,))
                answers.append(found[0])
                if both:
                    raw[i] = found[1]
            del mine
        self.answers, self.raw = tuple(answers), raw

    def expected_for(self, reads_inputs: bool = False) -> tuple[Expected, ...]:
        """Each step's answer for a backend that reads an fp8 prefill's K/V as stored (the
        default) or as given (`reads_inputs`)."""
        if not reads_inputs:
            return self.answers
        return tuple(self.raw.get(i, a) for i, a in enumerate(self.answers))

    def fresh(self, device=None) -> Step | Episode:
        """A backend's own copy of the inputs (caches as built), on `device` (the case's)."""
        return self.pristine.to(device or self.device, copy=True)


class ExpectedCaches:
    """The caches the reference expects after each step of one case: a copy of the caches of
    `inputs` (pristine, or a backend's poisoned copy) with every step's writes applied in
    order, on the device of `inputs`."""

    def __init__(self, inputs: Step | Episode):
        cache = inputs.kv_cache
        self.caches = None if cache is None else tuple(c.clone() for c in cache)

    def advance(self, exp: Expected) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The caches after the step `exp` describes (updated in place and returned)."""
        if self.caches is not None and exp.writes is not None:
            slots, k, v = exp.writes
            for c, rows in zip(self.caches, (k, v)):
                at = slots.to(c.device)  # (block, offset): any strides
                c[at // c.shape[1], at % c.shape[1]] = rows.to(c.device)
        return self.caches
