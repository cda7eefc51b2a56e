"""An independent dense computation of a step: no cache, whole histories, a materialized mask."""

import torch

from reference.workload import Step


def dense_attention(step: Step) -> torch.Tensor:
    """The step's output from the contiguous K/V histories and `metadata.materialize()`.

    Vectorized over all packed tokens at once (unlike the reference's per-sequence loops)."""
    md, kind = step.metadata, step.attn_kind
    mask = md.materialize(kind)  # [real_q, sum(kv_lens)]
    num_real = mask.shape[0]
    q = step.query[:num_real].double()
    k = torch.cat(step.key_history).double()
    v = torch.cat(step.value_history).double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * md.scale_for(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.zeros(step.query.shape, dtype=torch.float64)
    out[:num_real] = torch.einsum("hqk,khd->qhd", probs, v)
    return out
