"""Fault-injecting backends: each breaks one promise, and the harness must catch it (a row that
is `error` or `fail`, never `pass` or `skip`). Loadable with --backend-module
conformance.tests.faulty:ClassName, and used directly by the runner tests.

All of them compute through the torch backend unless their fault says otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from optimized.backend import BaseBackend
from optimized.torch_backend import TorchBackend, _gather_pages, _padded_index
from reference.attention import textbook_attention
from reference.fp8 import FP8_MAX, per_head, quantize
from reference.metadata import AttnKind
from reference.paged_cache import gather_sequence, write_to_cache
from reference.position_bias import relative_position_bucket
from reference.validation import check_inputs


class Raises(TorchBackend):
    name = "fault-raises"

    def forward(self, *args):
        raise RuntimeError("simulated kernel failure")


class Exits(TorchBackend):
    """Calls sys.exit in forward: SystemExit must become an error row, not end the run."""

    name = "fault-exits"

    def forward(self, *args):
        raise SystemExit(3)


class ExitsInReasons(TorchBackend):
    name = "fault-exits-in-reasons"

    def not_supported_reasons(self, *args):
        raise SystemExit(4)


class RaisesInReasons(TorchBackend):
    """not_supported_reasons raising must be an error, not a skip."""

    name = "fault-raises-in-reasons"

    def not_supported_reasons(self, *args):
        raise RuntimeError("cannot tell")


class RaisesInUnavailable(TorchBackend):
    name = "fault-raises-in-unavailable"

    def unavailable_reason(self):
        raise RuntimeError("probe failed")


class RaisesInDevice(TorchBackend):
    name = "fault-raises-in-device"

    def device(self):
        raise RuntimeError("no device today")


class ReturnsNone(TorchBackend):
    name = "fault-returns-none"

    def forward(self, *args):
        super().forward(*args)
        return None


class NaNOutput(TorchBackend):
    name = "fault-nan"

    def forward(self, *args):
        out = super().forward(*args)
        out.view(-1)[0] = float("nan")
        return out


class Hangs(TorchBackend):
    name = "fault-hangs"

    def forward(self, *args):
        time.sleep(float(os.environ.get("FAULT_SLEEP_S", "30")))
        return super().forward(*args)


class SwallowsTimeout(TorchBackend):
    """Wraps a slow call in `except Exception` (a common pattern): the timeout must still win."""

    name = "fault-swallows-timeout"

    def forward(self, *args):
        try:  # noqa: SIM105 - written the way such code usually is
            time.sleep(float(os.environ.get("FAULT_SLEEP_S", "30")))
        except Exception:
            pass
        return super().forward(*args)


class SwallowsEverything(TorchBackend):
    """Catches BaseException around a slow call and returns late: judged from outside."""

    name = "fault-swallows-everything"

    def forward(self, *args):
        t_end = time.time() + float(os.environ.get("FAULT_SLEEP_S", "30"))
        while time.time() < t_end:
            try:  # noqa: SIM105 - the fault under test
                time.sleep(max(0.0, t_end - time.time()))
            except BaseException:
                pass
        return super().forward(*args)


class MutatesInputs(TorchBackend):
    """Computes correctly, then scales its input query in place."""

    name = "fault-mutates-inputs"

    def forward(self, query, *rest):
        out = super().forward(query, *rest)
        query.mul_(2)
        return out


class StrayCacheWrite(TorchBackend):
    """Computes correctly, then writes one slot nobody asked for."""

    name = "fault-stray-write"

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        out = super().forward(query, key, value, kv_cache, metadata, attn_kind)
        if kv_cache is not None:
            kv_cache[0].view(-1)[-1] = 0.0  # the last element of the pool
        return out


class ReadsUnwrittenSlots(TorchBackend):
    """Declares `finite_unowned_slots` (as flex does), then lets a slot nobody wrote leak into
    its output with a small weight: the finite poison must still fail it."""

    name = "fault-reads-unwritten"
    capabilities = replace(TorchBackend.capabilities, finite_unowned_slots=True)

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        out = super().forward(query, key, value, kv_cache, metadata, attn_kind)
        if kv_cache is not None:
            out = out + 1e-3 * kv_cache[1].view(-1)[-1].to(out.dtype)  # the pool's last slot
        return out


class LowPrecisionAccumulator(TorchBackend):
    """A tiled online-softmax kernel (FlashAttention's loop) that keeps its running output and
    softmax sum in the step's dtype, rounding them after every K/V tile of TILE keys. Its max
    error stays within the max-abs tolerance; the precision criterion (rms_ratio) must catch it
    on long K/V walks."""

    name = "fault-low-precision"
    TILE = 32

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        kind = check_inputs(query, key, value, kv_cache, metadata, attn_kind)
        md, dev, dtype = metadata, query.device, query.dtype
        out = super().forward(query, key, value, kv_cache, metadata, attn_kind)  # cache writes
        q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
        if kind == AttnKind.ENCODER:
            kv_idx, kv_valid = _padded_index(kv_lens, dev)
            k, v = key[kv_idx], value[kv_idx]
        else:
            tables, _ = md.tables_for(kind)
            k, kv_valid = _gather_pages(kv_cache[0], tables, kv_lens, dev)
            v, _ = _gather_pages(kv_cache[1], tables, kv_lens, dev)
        q_idx, q_valid = _padded_index(q_lens, dev)
        q = query[q_idx].float()  # [S, Q, H, D]
        group = q.shape[2] // k.shape[2]
        k = k.float().repeat_interleave(group, 2)
        v = v.float().repeat_interleave(group, 2)
        mask = q_valid[:, :, None] & kv_valid[:, None, :]
        if kind == AttnKind.DECODER:
            ctx = torch.tensor(md.context_lens, device=dev)
            qpos = ctx[:, None] + torch.arange(q.shape[1], device=dev)
            kpos = torch.arange(k.shape[1], device=dev)
            mask &= kpos[None, None, :] <= qpos[:, :, None]
            if md.sliding_window is not None:
                mask &= kpos[None, None, :] > qpos[:, :, None] - md.sliding_window
        r = lambda t: t.to(dtype).float()  # the fault: running sums rounded to the dtype
        scale = md.scale_for(query.shape[-1])
        S, Q, H, D = q.shape
        m = torch.full((S, H, Q), -torch.inf, device=dev)
        acc = torch.zeros(S, H, Q, D, device=dev)
        l_sum = torch.zeros(S, H, Q, device=dev)
        for t0 in range(0, k.shape[1], self.TILE):
            kt, vt = k[:, t0 : t0 + self.TILE], v[:, t0 : t0 + self.TILE]
            s = torch.einsum("sqhd,skhd->shqk", q, kt) * scale
            s = s.masked_fill(~mask[:, None, :, t0 : t0 + self.TILE], -torch.inf)
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            p = torch.exp(s - safe[..., None])
            alpha = torch.where(torch.isfinite(m), torch.exp(m - safe), 0.0)
            l_sum = r(alpha * l_sum + p.sum(-1))
            acc = r(alpha[..., None] * acc + torch.einsum("shqk,skhd->shqd", r(p), vt))
            m = m_new
        o = (acc / l_sum.clamp_min(1e-30)[..., None]).transpose(1, 2)  # [S, Q, H, D]
        out = torch.zeros_like(out)
        out[q_idx[q_valid]] = o[q_valid].to(dtype)
        return out


class KillsItsProcess(TorchBackend):
    """Ends its process (like a segfault) on block size 8."""

    name = "fault-kills-process"

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        if metadata.block_size == 8:
            os._exit(11)
        return super().forward(query, key, value, kv_cache, metadata, attn_kind)


class KillsTheEngine(TorchBackend):
    """Kills the engine process itself (its worker's parent) on block size 8: `run` must still
    leave results.csv, every test the engine did not finish an error row."""

    name = "fault-kills-engine"

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        if metadata.block_size == 8:
            os.kill(int(os.environ.get("CONFORMANCE_ENGINE_PID", os.getppid())), 9)
            time.sleep(30)
        return super().forward(query, key, value, kv_cache, metadata, attn_kind)


class TritonImpostor(TorchBackend):
    """Named like a built-in: a run with both must refuse (exit 2), never let it stand in."""

    name = "triton"


class Upcasts(TorchBackend):
    """Returns float64 whatever the query dtype: a low-precision kernel hiding behind an upcast
    must fail (only a backend that declares float64 output, the reference, may)."""

    name = "fault-upcasts"

    def attend(self, *args):
        return super().attend(*args).double()


class WrongFromItsSecondCall(TorchBackend):
    """Right on its first call, wrong on every later one (state kept between calls)."""

    name = "fault-second-call"

    def __init__(self):
        self.calls = 0

    def attend(self, *args):
        self.calls += 1
        out = super().attend(*args)
        return out if self.calls == 1 else out * 1.01


class MutatesOne(TorchBackend):
    """Computes correctly, then changes one element of one input tensor in place: `where` names
    the tensor (query, key, value, or a metadata table) and `row` its row (-1: the last)."""

    name = "fault-mutates-one"

    def __init__(self, where: str = "query", row: int = 0):
        self.where, self.row = where, row

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        out = super().forward(query, key, value, kv_cache, metadata, attn_kind)
        t = {"query": query, "key": key, "value": value}.get(self.where)
        if t is None:
            t = getattr(metadata, self.where)
        if t.is_floating_point():
            t[self.row].view(-1)[0] = 12345.0
        else:
            t[self.row].view(-1)[0] += 1
        return out


class FP8Fault(BaseBackend):
    """A plain fp8 backend (the spec's helpers, float64 math) with one planted fault in its fp8
    handling; steps without fp8 are right. `fault`: forgets_scale (reads stored values
    unscaled), scales_twice, query_head_scale (per-head scales indexed by query head, not kv
    head), no_clamp (e4m3 overflow stores NaN), swaps_formats (quantizes in the other fp8
    format), reads_inputs (attends over a prefill's K/V as given without declaring it), none."""

    name = "fault-fp8"
    capabilities = TorchBackend.capabilities

    def __init__(self, fault: str = "none", declares_reads_inputs: bool = False):
        self.fault = fault
        self.name = f"fault-fp8-{fault}"
        reads = declares_reads_inputs
        self.capabilities = replace(self.capabilities, fp8_prefill_reads_inputs=reads)

    def device(self):
        return torch.device("cpu")

    def _store(self, x, scale, cache_dtype):
        if self.fault == "swaps_formats":
            other = {v: k for k, v in enumerate(FP8_MAX)}[cache_dtype]
            other = list(FP8_MAX)[1 - other]
            return quantize(x, scale, other).view(torch.uint8).view(cache_dtype)
        if self.fault == "no_clamp":  # what a conversion without saturation stores: NaN
            y = x.float() / per_head(scale, x.shape[1])[:, None]  # (e4m3) or Inf (e5m2) past max
            over = y.abs() > FP8_MAX[cache_dtype]
            wild = torch.full_like(y, float("nan" if cache_dtype == torch.float8_e4m3fn else "inf"))
            return torch.where(over, wild.copysign(y), y).to(cache_dtype)
        return quantize(x, scale, cache_dtype)

    def _read(self, stored, scale, num_heads):
        """[tokens, kv_heads, d] stored -> [tokens, num_heads, d] values (GQA expanded)."""
        group = num_heads // stored.shape[1]
        x = stored.double().repeat_interleave(group, 1)
        s = per_head(scale, stored.shape[1]).double()
        if self.fault == "forgets_scale":
            return x
        if self.fault == "scales_twice":
            return x * (s * s).repeat_interleave(group)[:, None]
        if self.fault == "query_head_scale":
            return x * s[torch.arange(num_heads) % len(s)][:, None]
        return x * s.repeat_interleave(group)[:, None]

    def attend(self, query, key, value, kv_cache, md, kind):
        if not md.fp8 or kv_cache is None:
            return TorchBackend().attend(query, key, value, kv_cache, md, kind)
        tables, slots = md.tables_for(kind)
        key_cache, value_cache = kv_cache
        if key is not None:
            written = slots >= 0
            real = slots[written].long()
            b, o = real // md.block_size, real % md.block_size
            key_cache[b, o] = self._store(key[: len(slots)][written], md.k_scale, key_cache.dtype)
            value_cache[b, o] = self._store(
                value[: len(slots)][written], md.v_scale, value_cache.dtype
            )
        out = torch.zeros_like(query)
        starts, kv_starts = md.query_start_loc, md.query_start_loc
        if kind == AttnKind.ENCODER_DECODER:
            kv_starts = md.cross_kv_start_loc
        q_lens, kv_lens = md.query_lens, md.kv_lens_for(kind)
        inputs = self.fault == "reads_inputs" and md.is_prefill_only()
        num_heads = query.shape[1]
        for i in range(md.num_seqs):
            q = query[starts[i] : starts[i] + q_lens[i]]
            if inputs:
                span = slice(kv_starts[i], kv_starts[i] + kv_lens[i])
                k = key[span].double().repeat_interleave(num_heads // key.shape[1], 1)
                v = value[span].double().repeat_interleave(num_heads // key.shape[1], 1)
            else:
                k = self._read(
                    gather_sequence(key_cache, tables[i], kv_lens[i]), md.k_scale, num_heads
                )
                v = self._read(
                    gather_sequence(value_cache, tables[i], kv_lens[i]), md.v_scale, num_heads
                )
            o = textbook_attention(q, k, v, md.sequence_mask(kind, i), md.scale_for(q.shape[-1]),
                                   md.position_bias_for(kind, i))  # fmt: skip
            out[starts[i] : starts[i] + q_lens[i]] = o.to(query.dtype)
        return out


class OutOfMemoryBesideOthers(TorchBackend):
    """Runs out of memory on its first calls of a run (as when other workers' tests filled the
    device), then passes: the engine must run its test again alone, not report an error.
    FAULT_DIR names the folder that counts its calls across worker processes."""

    name = "fault-oom-beside-others"
    failures = 1

    def forward(self, *args):
        counter = os.path.join(os.environ["FAULT_DIR"], f"{self.name}.calls")
        with open(counter, "a") as f:
            f.write("x")
        if os.path.getsize(counter) <= self.failures:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(*args)


class PoisonsItsProcess(TorchBackend):
    """Fails as a kernel's bad address does: its process's CUDA context is gone (a worker ends
    after such a test; the rest of its job must run in a fresh one, not be called a crash)."""

    name = "fault-poisons"

    def forward(self, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class OutOfMemoryAlways(OutOfMemoryBesideOthers):
    """Out of memory whenever it runs, alone too: an error, after its run alone."""

    name = "fault-oom-always"
    failures = 1 << 30


_KEPT: list[torch.Tensor] = []


class Leaks(TorchBackend):
    """Keeps LEAK_MB of memory per call in a module-level list (a cache that never lets go):
    its outputs are right, but the worker holding it must be replaced."""

    name = "fault-leaks"

    def forward(self, *args):
        mb = int(os.environ.get("LEAK_MB", "64"))
        _KEPT.append(torch.ones(mb << 18, device=self.device()))  # mb MiB of float32
        return super().forward(*args)


class BiasFault(BaseBackend):
    """Float64 attention (the spec's helpers) with one planted fault in T5's position bias;
    steps without a bias are right. `fault`: reversed (query minus key position), step_positions
    (decoder queries at their index in the step, not their absolute position), kv_head_table
    (the table read by kv head), none_at_decode (no bias on a step with cached context),
    bf16_buckets (the bucket's log in bf16, T5's serving dtype, not float32), none."""

    name = "fault-bias"
    capabilities = TorchBackend.capabilities

    def __init__(self, fault: str = "none"):
        self.fault, self.name = fault, f"fault-bias-{fault}"

    def device(self):
        return torch.device("cpu")

    def _bias(self, md, kind, i, num_heads):
        if md.position_bias == "none" or (self.fault == "none_at_decode" and any(md.context_lens)):
            return None
        q_len, kv_len = md.query_lens_for(kind)[i], md.kv_lens_for(kind)[i]
        first = md.context_lens[i] if kind == AttnKind.DECODER else 0
        if self.fault == "step_positions":
            first = 0
        q_pos, k_pos = first + torch.arange(q_len), torch.arange(kv_len)
        rel = k_pos[None, :] - q_pos[:, None]
        if self.fault == "reversed":
            rel = -rel
        args = (kind == AttnKind.ENCODER, md.relative_attention_num_buckets,
                md.relative_attention_max_distance)  # fmt: skip
        # bf16_buckets: the log in T5's serving dtype (it moves distances 16, 32 and 90 of 32
        # buckets up to 128)
        log_dtype = torch.bfloat16 if self.fault == "bf16_buckets" else torch.float32
        bucket = relative_position_bucket(rel, *args, log_dtype=log_dtype)
        table = md.relative_attention_bias.double()
        if self.fault == "kv_head_table":  # head h reads column h // group
            group = num_heads // self.num_kv_heads
            table = table[:, torch.arange(num_heads) // group]
        return table[bucket].permute(2, 0, 1)

    def attend(self, query, key, value, kv_cache, md, kind):
        out = torch.zeros_like(query)
        tables, slots = md.tables_for(kind)
        if kv_cache is not None and key is not None:
            write_to_cache(key, value, *kv_cache, slots, md.k_scale, md.v_scale)
        starts = md.encoder_start_loc if kind == AttnKind.ENCODER else md.query_start_loc
        q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
        self.num_kv_heads = (key if key is not None else kv_cache[0]).shape[-2]
        for i in range(md.num_seqs):
            q = query[starts[i] : starts[i] + q_lens[i]]
            if kind == AttnKind.ENCODER:
                k, v = (t[starts[i] : starts[i] + q_lens[i]] for t in (key, value))
            else:
                k, v = (gather_sequence(c, tables[i], kv_lens[i], s) for c, s in
                        zip(kv_cache, (md.k_scale, md.v_scale)))  # fmt: skip
            bias = self._bias(md, kind, i, query.shape[1])
            o = textbook_attention(q, k, v, md.sequence_mask(kind, i), md.scale_for(q.shape[-1]),
                                   bias)  # fmt: skip
            out[starts[i] : starts[i] + q_lens[i]] = o.to(query.dtype)
        return out


# reversed, step_positions and kv_head_table are the catalogue's too (conformance/mutants.py)
BIAS_FAULTS = ("none_at_decode", "bf16_buckets")


class WrongPastABlockBoundary(TorchBackend):
    """Wrong (x1.01) for a decoder sequence whose length is one past a block boundary (a new
    block just begun): the smallest trigger is one sequence of block_size + 1 tokens."""

    name = "fault-past-a-block-boundary"

    def attend(self, query, key, value, kv_cache, md, kind):
        out = super().attend(query, key, value, kv_cache, md, kind)
        if kind == AttnKind.DECODER:
            for i, n in enumerate(md.seq_lens):
                if n > md.block_size and n % md.block_size == 1:
                    start = md.query_start_loc[i]
                    out[start : start + md.query_lens[i]] *= 1.01
        return out


class WrongForKvHeadOne(TorchBackend):
    """Wrong (x1.01) for the query heads of kv head 1 and up: the smallest trigger has two kv
    heads (one query head each)."""

    name = "fault-kv-head-one"

    def attend(self, query, key, value, kv_cache, md, kind):
        out = super().attend(query, key, value, kv_cache, md, kind)
        kv_heads = (key if key is not None else kv_cache[0]).shape[-2]
        out[:, query.shape[1] // kv_heads :] *= 1.01
        return out


class WrongOnTheSecondDecodeStep(TorchBackend):
    """Wrong (x1.01) on the second decoder step with cached context after a prefill (an
    episode's second decode step): the smallest trigger is an episode of two decode steps."""

    name = "fault-second-decode-step"

    def attend(self, query, key, value, kv_cache, md, kind):
        out = super().attend(query, key, value, kv_cache, md, kind)
        if kind == AttnKind.DECODER:
            self.decodes = 0 if md.is_prefill_only() else getattr(self, "decodes", 0) + 1
            if self.decodes == 2:
                out = out * 1.01
        return out


class AssumesDenseCaches(TorchBackend):
    """Reads (and writes) its caches as if they were dense [num_blocks, block_size, num_kv_heads,
    head_size] tensors starting where the view starts: right on contiguous caches, wrong on the
    strided pools engines keep (K and V interleaved in one pool, head-major blocks)."""

    name = "fault-assumes-dense-caches"

    def attend(self, query, key, value, kv_cache, md, kind):
        if kv_cache is not None:
            dense = lambda c: c.as_strided(c.shape, torch.empty(c.shape, device="meta").stride())
            kv_cache = tuple(dense(c) for c in kv_cache)
        return super().attend(query, key, value, kv_cache, md, kind)
