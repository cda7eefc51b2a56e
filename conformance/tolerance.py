"""The tolerance policy, in one place.

A backend's output is compared in float64 with the reference. It passes when

    max_abs_err(backend) <= FACTOR * max_abs_err(baseline) + FLOOR[dtype] * max(1, max|ref|)

where `baseline` is the straightforward computation in the same low precision: the dense
textbook attention with q, k, v, scores, softmax and P·V all in the step's dtype (the scheme of
FlashAttention's tests). A backend may be at most FACTOR times worse than naive math in its own
dtype, plus a small floor per dtype, relative to the output's magnitude, that covers outputs
where naive math happens to land exactly and the extra rounding of an online softmax (one
rescale per K/V tile) on top of naive math. NaN or Inf where the reference is finite always fails.

Numbers (outputs are O(1): inputs are standard normal, outputs are convex mixes of values):
    FACTOR = 2
    FLOOR  = float32 1e-5 | float16 2e-3 | bfloat16 1.6e-2
             (2 ulp of 1.0 in fp16 and bf16; in fp32 about 84 ulp: measured on the smoke tier,
             tiled kernels reach 2.2x the naive fp32 error (2e-5) where scores are peaked,
             d=256 with scale 0.37; still 100x below TF32's error, which must fail)
fp32 backends must use IEEE fp32 products (no TF32): TF32 error (~1e-3) would fail fp32 cases.
Elementwise, `mismatch_frac` counts elements whose error exceeds the same tolerance.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def baseline_attention(step) -> torch.Tensor:
    """Dense textbook attention computed entirely in the step's dtype, returned as float64.

    Uses the step's contiguous K/V histories (not the cache), one sequence at a time with its
    `sequence_mask` (memory stays per sequence, so large GPU cases fit). Computed in fp32 with
    rounding to the dtype after every op, which is what a naive kernel in that dtype does."""
    md, kind, dtype = step.metadata, step.attn_kind, step.query.dtype
    dev = step.query.device
    r = lambda t: t.to(dtype).float()
    scale = md.scale_for(step.query.shape[-1])
    out = torch.zeros(step.query.shape, dtype=torch.float64, device=dev)
    q_lens = md.query_lens_for(kind)
    start = 0
    for i, n in enumerate(q_lens):
        q = r(step.query[start : start + n])
        k = r(step.key_history[i].to(dev))
        v = r(step.value_history[i].to(dev))
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = r(r(torch.einsum("qhd,khd->hqk", q, k)) * scale)
        mask = md.sequence_mask(kind, i).to(dev)
        probs = r(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1))
        out[start : start + n] = r(torch.einsum("hqk,khd->qhd", probs, v)).double()
        start += n
    return out


def tolerance(dtype: torch.dtype, baseline_err: float, ref_scale: float = 1.0) -> float:
    """The largest max-abs error a backend may have; `ref_scale` = max |reference output|."""
    return FACTOR * baseline_err + FLOOR[dtype] * max(1.0, ref_scale)
