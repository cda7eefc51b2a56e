"""The tolerance policy, in one place.

A backend's output is compared in float64 with the reference. It passes when

    max_abs_err(backend) <= FACTOR * max_abs_err(baseline) + FLOOR[dtype]

where `baseline` is the straightforward computation in the same low precision: the dense
textbook attention with q, k, v, scores, softmax and P·V all in the step's dtype (the scheme of
FlashAttention's tests). A backend may be at most FACTOR times worse than naive math in its own
dtype, plus a small absolute floor per dtype that covers outputs where naive math happens to
land exactly. NaN or Inf where the reference is finite always fails.

Numbers (outputs are O(1): inputs are standard normal, outputs are convex mixes of values):
    FACTOR = 2
    FLOOR  = float32 2e-6 | float16 2e-3 | bfloat16 1.6e-2
             (2 ulp of 1.0 in fp16 and bf16; 16 ulp in fp32, for accumulation-order noise)
fp32 backends must use IEEE fp32 products (no TF32): TF32 error (~1e-3) would fail fp32 cases.
Elementwise, `mismatch_frac` counts elements whose error exceeds the same tolerance.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def baseline_attention(step) -> torch.Tensor:
    """Dense textbook attention computed entirely in the step's dtype, returned as float64.

    Uses the step's contiguous K/V histories (not the cache) and the materialized mask."""
    md, kind, dtype = step.metadata, step.attn_kind, step.query.dtype
    mask = md.materialize(kind).to(step.query.device)
    n = mask.shape[0]
    # CPU half matmuls are slow but exact enough to model "naive low precision"; run in fp32
    # with rounding to dtype after every op, which is what a naive kernel in dtype does.
    r = lambda t: t.to(dtype).float()
    q = r(step.query[:n])
    k = r(torch.cat(step.key_history).to(step.query.device))
    v = r(torch.cat(step.value_history).to(step.query.device))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = r(r(torch.einsum("qhd,khd->hqk", q, k)) * md.scale_for(q.shape[-1]))
    probs = r(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1))
    out = torch.zeros(step.query.shape, dtype=torch.float64, device=step.query.device)
    out[:n] = r(torch.einsum("hqk,khd->qhd", probs, v)).double()
    return out


def tolerance(dtype: torch.dtype, baseline_err: float) -> float:
    return FACTOR * baseline_err + FLOOR[dtype]
