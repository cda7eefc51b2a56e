"""Comparing one backend's step with the reference: output metrics and cache checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conformance.tolerance import baseline_attention, tolerance


@dataclass(frozen=True)
class Comparison:
    """Metrics of one output against the reference (float64)."""

    ok: bool
    reason: str
    max_abs_err: float
    max_rel_err: float  # max |err| / max |reference|
    err_ratio: float  # max_abs_err / tolerance
    mismatch_frac: float  # elements with |err| > tolerance
    nan_count: int  # non-finite outputs where the reference is finite
    tolerance: float


def compare_output(
    step, out: torch.Tensor, ref: torch.Tensor, baseline_err: float | None = None
) -> Comparison:
    """`out` (any dtype) against `ref` (float64) for `step`, under the tolerance policy."""
    if tuple(out.shape) != tuple(ref.shape):
        return Comparison(
            False,
            f"shape mismatch: output {list(out.shape)}, expected {list(ref.shape)}",
            math.inf,
            math.inf,
            math.inf,
            1.0,
            0,
            0.0,
        )
    ref = ref.cpu()
    got = out.detach().cpu().double()
    if baseline_err is None:
        baseline_err = (baseline_attention(step.to("cpu")) - ref).abs().max().item()
    finite_ref = torch.isfinite(ref)
    ref_scale = ref[finite_ref].abs().max().item() if finite_ref.any() else 0.0
    tol = tolerance(step.query.dtype, baseline_err, ref_scale)
    bad = finite_ref & ~torch.isfinite(got)
    nan_count = int(bad.sum())
    err = (got - ref).abs().where(~bad, torch.zeros((), dtype=torch.float64))
    max_abs = err.max().item() if err.numel() else 0.0
    mismatch = ((err > tol) | bad).double().mean().item() if err.numel() else 0.0
    comp = dict(
        max_abs_err=max_abs,
        max_rel_err=max_abs / ref_scale if ref_scale else max_abs,
        err_ratio=max_abs / tol,
        mismatch_frac=mismatch,
        nan_count=nan_count,
        tolerance=tol,
    )
    if nan_count:
        return Comparison(False, f"NaN/Inf: {nan_count} non-finite outputs", **comp)
    if out.dtype not in (step.query.dtype, torch.float64):
        return Comparison(
            False, f"dtype mismatch: output {out.dtype}, query {step.query.dtype}", **comp
        )
    if max_abs > tol:
        return Comparison(
            False,
            f"numerical mismatch: max_abs_err {max_abs:.3g} > tolerance "
            f"{tol:.3g} ({mismatch:.1%} of elements)",
            **comp,
        )
    return Comparison(True, "", **comp)


def compare_caches(
    got: tuple[torch.Tensor, torch.Tensor] | None,
    expected: tuple[torch.Tensor, torch.Tensor] | None,
) -> str:
    """'' when the caches are bitwise equal (NaN == NaN: unwritten slots must stay NaN),
    else a description of the first difference."""
    if got is None or expected is None:
        return ""
    for name, g, e in (("key_cache", got[0], expected[0]), ("value_cache", got[1], expected[1])):
        g = g.detach().cpu()
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"cache corruption: {name} changed shape/dtype"
        # Compare bit patterns so that NaN slots must stay NaN and -0.0 != 0.0.
        gi = g.contiguous().view(-1, *g.shape[2:]).view(_int_type(g.dtype))
        ei = e.cpu().contiguous().view(-1, *e.shape[2:]).view(_int_type(e.dtype))
        diff = (gi != ei).flatten(1).any(1)
        if diff.any():
            slots = diff.nonzero().flatten()
            return (
                f"cache corruption: {name} differs in {len(slots)} slot(s), first slot "
                f"{int(slots[0])} (block {int(slots[0]) // g.shape[1]})"
            )
    return ""


def _int_type(dtype: torch.dtype) -> torch.dtype:
    return {
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float64: torch.int64,
    }[dtype]
