"""Comparing one backend's step with the reference: output metrics and cache checks.

A comparison has three outcomes: `pass` (every check held), `fail` (the backend's output is
wrong) and `error` (the harness cannot judge: the reference itself is not finite, or the backend
returned no tensor). Anything the comparison is unsure of is an error, never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conformance.schema import Status
from conformance.tolerance import PRECISION_LIMIT, baseline_attention, rms_ratio_of, tolerance


@dataclass(frozen=True)
class Comparison:
    """Metrics of one output against the reference (float64)."""

    status: Status  # pass / fail / error (never skip: a comparison always judges)
    reason: str
    max_abs_err: float = math.nan
    max_rel_err: float = math.nan  # max |err| / max |reference|
    err_ratio: float = math.nan  # max_abs_err / tolerance
    mismatch_frac: float = math.nan  # elements with |err| > tolerance
    nan_count: int = 0  # non-finite outputs where the reference is finite
    tolerance: float = math.nan
    rms_ratio: float = math.nan  # RMS error ÷ RMS error of rounding the exact output once

    @property
    def ok(self) -> bool:
        return self.status == Status.PASS


def nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def compare_output(
    step, out, ref: torch.Tensor, baseline_err: float | None = None, backend=None,
    ref_scale: float | None = None,
) -> Comparison:  # fmt: skip
    """`out` against `ref` (float64) for `step`, under the tolerance policy, on the device of
    `ref` (its metrics read in one go). `out` must have the query's dtype (a low-precision
    kernel must not hide behind an upcast), or float64 where the backend declares
    `float64_output` (the reference). `ref_scale` (max |ref|) given: `ref` is known finite."""
    if not isinstance(out, torch.Tensor):
        return Comparison(Status.ERROR, f"forward returned {type(out).__name__}, expected a tensor")
    if ref_scale is None:
        bad_ref = nonfinite_count(ref)
        if bad_ref:
            return Comparison(Status.ERROR, f"reference produced {bad_ref} non-finite values")
        ref_scale = ref.abs().max().item() if ref.numel() else 0.0
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(
            Status.FAIL,
            f"shape mismatch: output {list(out.shape)}, expected {list(ref.shape)}",
            math.inf,
            math.inf,
            math.inf,
            1.0,
        )
    if not out.is_floating_point():
        return Comparison(
            Status.FAIL, f"dtype mismatch: output {out.dtype}, query {step.query.dtype}"
        )
    got = out.detach().to(ref.device).double()
    if baseline_err is None:
        baseline_err = (baseline_attention(step.to("cpu")) - ref.cpu()).abs().max().item()
    dtype = step.query.dtype
    tol = tolerance(dtype, baseline_err, ref_scale)
    if not (math.isfinite(tol) and tol > 0):  # never judge against a NaN or infinite bound
        return Comparison(
            Status.ERROR,
            f"tolerance is {tol} (baseline error {baseline_err}): the comparison cannot judge",
        )
    max_abs, nan_count, mismatch, ratio = _metrics(got, ref, dtype, tol)
    comp = dict(
        max_abs_err=max_abs,
        max_rel_err=max_abs / ref_scale if ref_scale else max_abs,
        err_ratio=max_abs / tol,
        mismatch_frac=mismatch,
        nan_count=nan_count,
        tolerance=tol,
        rms_ratio=ratio,
    )
    if nan_count:
        return Comparison(Status.FAIL, f"NaN/Inf: {nan_count} non-finite outputs", **comp)
    wide = backend is not None and backend.capabilities.float64_output
    if out.dtype != dtype and not (wide and out.dtype == torch.float64):
        return Comparison(Status.FAIL, f"dtype mismatch: output {out.dtype}, query {dtype}", **comp)
    if not max_abs <= tol:  # `not <=`: a NaN metric fails too
        return Comparison(
            Status.FAIL,
            f"numerical mismatch: max_abs_err {max_abs:.3g} > tolerance "
            f"{tol:.3g} ({mismatch:.1%} of elements)",
            **comp,
        )
    limit = PRECISION_LIMIT.get(dtype) if out.dtype != torch.float64 else None
    if limit is not None and not ratio <= limit:
        return Comparison(
            Status.FAIL,
            f"precision: RMS error {ratio:.2f}x that of rounding the exact output to "
            f"{str(dtype).removeprefix('torch.')} (limit {limit:g}): accumulates below fp32?",
            **comp,
        )
    return Comparison(Status.PASS, "", **comp)


def _metrics(got: torch.Tensor, ref: torch.Tensor, dtype, tol: float):
    """(max abs error, non-finite outputs, share of elements over `tol`, rms_ratio) of float64
    `got` against `ref`, computed where they are and read once (non-finite outputs count as an
    infinite error; rms_ratio infinite where any)."""
    if not ref.numel():
        return 0.0, 0, 0.0, 0.0
    bad = ~torch.isfinite(got)
    diff = (got - ref).masked_fill(bad, 0.0)
    err = diff.abs().masked_fill(bad, math.inf)
    rms = lambda t: t.square().mean().sqrt()
    values = torch.stack([err.max(), bad.sum().double(), (err > tol).double().mean(), rms(diff),
                          rms(ref.to(dtype).double() - ref), rms(ref)]).tolist()  # fmt: skip
    max_abs, nan_count, mismatch, err_rms, rounding, ref_rms = values
    ratio = rms_ratio_of(err_rms, rounding, ref_rms, dtype) if not nan_count else math.inf
    return max_abs, int(nan_count), mismatch, ratio


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per leading index (a slot for caches, a token for inputs): are the bit patterns equal?
    NaN == NaN here, and -0.0 != 0.0. `a` and `b` share shape and dtype; compared where `b`
    lives (the expected side), the answer there."""
    a, b = a.detach().to(b.device).contiguous(), b.detach().contiguous()
    if a.is_floating_point():
        a, b = a.view(_int_type(a.dtype)), b.view(_int_type(b.dtype))
    if a.dim() == 0:
        return (a == b).reshape(1)
    return (a == b).reshape(a.shape[0], -1).all(1)


def compare_caches(
    got: tuple[torch.Tensor, torch.Tensor] | None,
    expected: tuple[torch.Tensor, torch.Tensor] | None,
    written: torch.Tensor | None = None,
    fp8_ulps: int = 0,
) -> str:
    """'' when the caches are bitwise equal (NaN == NaN: unwritten slots must stay NaN),
    else a description of the first difference (slot, block, offset, which kv head). With
    `fp8_ulps` (a backend that rounds its fp8 writes through a reciprocal, reference/fp8.py),
    the slots in `written` may differ from the reference by that many fp8 ulps (same sign);
    every other slot still bit for bit. Compared where `expected` lives; read once."""
    if got is None or expected is None:
        return ""
    names = ("key_cache", "value_cache")
    for name, g, e in zip(names, got, expected):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"cache corruption: {name} changed shape/dtype"
    same = []
    for g, e in zip(got, expected):
        ok = bitwise_equal(g.flatten(0, 1), e.flatten(0, 1))
        if fp8_ulps and g.dtype in FP8_DTYPES and written is not None:
            near = _within_ulps(g.flatten(0, 1), e.flatten(0, 1), fp8_ulps)
            ok_here = torch.zeros_like(ok)
            ok_here[written.to(ok.device).long()] = True
            ok = ok | (near & ok_here)
        same.append(ok)
    if all(torch.stack([s.all() for s in same]).tolist()):
        return ""
    for name, g, e, ok in zip(names, got, expected, same):
        if not bool(ok.all()):
            bs = g.shape[1]
            slots = (~ok).nonzero().flatten().cpu()
            s = int(slots[0])
            heads = (~bitwise_equal(g.flatten(0, 1)[s], e.flatten(0, 1)[s])).nonzero().cpu()
            return (
                f"cache corruption: {name} differs in {len(slots)} slot(s), first slot {s} "
                f"(block {s // bs}, offset {s % bs}, kv head(s) {heads.flatten()[:4].tolist()})"
            )
    return ""


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _within_ulps(a: torch.Tensor, b: torch.Tensor, ulps: int) -> torch.Tensor:
    """Per leading index: every fp8 element of `a` within `ulps` codes of `b`, same sign."""
    x, y = a.detach().to(b.device).view(torch.uint8).int(), b.detach().view(torch.uint8).int()
    ok = ((x >> 7) == (y >> 7)) & ((x & 0x7F) - (y & 0x7F)).abs().le(ulps)
    return ok.reshape(ok.shape[0], -1).all(1)


def _int_type(dtype: torch.dtype) -> torch.dtype:
    return {
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float64: torch.int64,
        torch.float8_e4m3fn: torch.uint8,
        torch.float8_e5m2: torch.uint8,
    }[dtype]
