"""An independent dense computation of a step: no cache, whole histories, and a mask written
element by element from the rules in the issue (not from StepMetadata's own mask code)."""

import torch

from conformance.workloads import Step
from reference.metadata import AttnKind


def mask_by_rule(step: Step) -> torch.Tensor:
    """[num_real_query_tokens, sum(kv_lens)] bool, one element at a time."""
    md, kind = step.metadata, step.attn_kind
    q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
    mask = torch.zeros(sum(q_lens), sum(kv_lens), dtype=torch.bool)
    row = 0
    for i in range(md.num_seqs):
        col0 = sum(kv_lens[:i])
        for j in range(q_lens[i]):
            for p in range(kv_lens[i]):
                if kind == AttnKind.DECODER:
                    pos = md.context_lens[i] + j
                    w = md.sliding_window
                    seen = p <= pos and (w is None or p > pos - w)
                else:
                    seen = True
                mask[row, col0 + p] = seen
            row += 1
    return mask


def dense_attention(step: Step) -> torch.Tensor:
    """The step's output from the contiguous K/V histories, vectorized over all packed tokens."""
    md = step.metadata
    mask = mask_by_rule(step)
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
