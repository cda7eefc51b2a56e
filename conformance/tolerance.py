"""The tolerance policy, in one place.

A backend's output is compared in float64 with the reference. It passes when

    max_abs_err(backend) <= FACTOR * max_abs_err(baseline) + FLOOR[dtype] * max(1, max|ref|)

where `baseline` is the straightforward computation in the same low precision: the dense
textbook attention with q, k, v, scores, softmax and P·V all rounded to the step's dtype, op
by op (the scheme of FlashAttention's tests; each op exact before its rounding, so the baseline
is the step's own on any device). A backend may be at most FACTOR times worse than naive math
in its own dtype, plus a small floor per dtype, relative to the output's magnitude, that covers
outputs where naive math happens to land exactly and the extra rounding of an online softmax
(one rescale per K/V tile) on top of naive math. NaN or Inf where the reference is finite
always fails.

Numbers (outputs are O(1): inputs are standard normal, outputs are convex mixes of values):
    FACTOR = 2
    FLOOR  = float32 1e-5 | float16 2e-3 | bfloat16 1.6e-2
             (2 ulp of 1.0 in fp16 and bf16; in fp32 about 84 ulp: measured on the smoke tier,
             tiled kernels reach 2.2x the naive fp32 error (2e-5) where scores are peaked,
             d=256 with scale 0.37; still 100x below TF32's error, which must fail)
fp32 backends must use IEEE fp32 products (no TF32): TF32 error (~1e-3) would fail fp32 cases.
Elementwise, `mismatch_frac` counts elements whose error exceeds the same tolerance.

A second criterion, the precision class (`rms_ratio`): the max-abs tolerance cannot tell a
kernel that accumulates in fp32 from one that keeps its running output or softmax sum in
fp16/bf16 (such a kernel passed every fp16/bf16 row of the full tier). So for fp16 and bf16

    rms_ratio = RMS(backend - reference) / RMS(round(reference, dtype) - reference)

compares the backend's error with the error of rounding the exact output once to the dtype,
the least any kernel that returns that dtype can have. A kernel that accumulates in fp32 and
rounds P to the dtype for its P·V product (FlashAttention does) stays near 1-2; one that
rounds its running sums every K/V tile grows with the number of tiles. It fails above
PRECISION_LIMIT (calibrated on the full tier, see the constant). fp32 steps report the ratio but
are judged by the max-abs tolerance alone: fp32 rounding of the output is ~100x below the
error of any tiled fp32 kernel, and a kernel that computes fp32 steps in lower precision
already fails the fp32 floor.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def baseline_attention(step, reads_inputs: bool = False) -> torch.Tensor:
    """Naive attention in the step's dtype, returned as float64: q, k, v, the scores q·kᵀ,
    their scaling, the bias, the softmax and P·V, each op computed exactly and its result
    rounded to the dtype, as the most careful op-by-op computation in that dtype gets. Rounded
    per op, never accumulated in low precision, so it depends on the step alone (not on how a
    library orders a sum).

    Uses the step's contiguous K/V histories (not the cache) as attention reads them: for an
    fp8 cache the dequantized values (the reference attends over exactly those, so the baseline
    charges the kernel only for computing in its dtype, never for the quantization); with
    `reads_inputs` at an fp8 prefill step, the new K/V as given (reference/fp8.py). One sequence
    at a time with its `sequence_mask` (conformance/expected.py computes the same for a whole
    step at once)."""
    md, kind, dtype = step.metadata, step.attn_kind, step.query.dtype
    dev = step.query.device
    r = lambda t: t.to(dtype).double()
    scale = md.scale_for(step.query.shape[-1])
    out = torch.zeros(step.query.shape, dtype=torch.float64, device=dev)
    q_lens = md.query_lens_for(kind)
    raw = reads_inputs and md.fp8 and md.is_prefill_only() and step.key is not None
    kv_start = md.query_start_loc if kind == "decoder" else md.cross_kv_start_loc
    start = 0
    for i, n in enumerate(q_lens):
        q = r(step.query[start : start + n])
        if raw:  # every K/V of the sequence is new at a prefill step
            span = slice(kv_start[i], kv_start[i + 1])
            k, v = r(step.key[span].to(dev)), r(step.value[span].to(dev))
        else:
            k = r(step.key_history[i].to(dev))
            v = r(step.value_history[i].to(dev))
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = r(r(torch.einsum("qhd,khd->hqk", q, k)) * scale)
        bias = md.position_bias_for(kind, i)
        if bias is not None:
            scores = r(scores + r(bias.to(dev)))
        mask = md.sequence_mask(kind, i).to(dev)
        probs = r(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1))
        out[start : start + n] = r(torch.einsum("hqk,khd->qhd", probs, v))
        start += n
    return out


# Calibration (the full tier on the GPU and the CPU smoke tier, every built-in backend): the
# bound is the worst ratio seen there with a margin; a planted kernel that keeps its running
# output/sum in bf16 or fp16 exceeds it on long K/V walks (conformance/tests/faulty.py:
# LowPrecisionAccumulator).
PRECISION_LIMIT = {torch.float16: 4.0, torch.bfloat16: 4.0}
PRECISION_LIMIT_BY_NAME = {str(k).removeprefix("torch."): v for k, v in PRECISION_LIMIT.items()}


def rms_ratio(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """RMS error of `got` against the float64 `ref`, ÷ the RMS error of rounding `ref` once to
    `dtype` (both float64 tensors of one shape, all finite). 0 when both errors are 0."""
    if ref.numel() == 0:
        return 0.0
    rms = lambda t: t.square().mean().sqrt().item()
    return rms_ratio_of(rms(got - ref), rms(ref.to(dtype).double() - ref), rms(ref), dtype)


def rms_ratio_of(err_rms: float, rounding_rms: float, ref_rms: float, dtype) -> float:
    """`rms_ratio` from its three RMS values (the error, the rounding's, the output's)."""
    # A floor for outputs that round exactly (e.g. all zeros): 1/20 of an ulp of the RMS output.
    floor = 0.05 * torch.finfo(dtype).eps * ref_rms
    rounding = max(rounding_rms, floor)
    if rounding == 0:
        return 0.0 if err_rms == 0 else float("inf")
    return err_rms / rounding


def tolerance(dtype: torch.dtype, baseline_err: float, ref_scale: float = 1.0) -> float:
    """The largest max-abs error a backend may have; `ref_scale` = max |reference output|."""
    return FACTOR * baseline_err + FLOOR[dtype] * max(1.0, ref_scale)
