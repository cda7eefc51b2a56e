"""A minimal external backend, the shape of yours: run it through the whole matrix with

    python -m conformance run --backend-module examples.my_backend:MyBackend

It computes each sequence in fp32 with plain torch over the paged cache (the reference's own
helpers do the paging), so it passes; replace `attend` with your kernel's call. `BaseBackend`'s
`forward` validates the step first (a ValueError naming the argument, before anything is
written) and hands `attend` contiguous query/key/value.
"""

from __future__ import annotations

import torch

from optimized.backend import BaseBackend, Capabilities
from reference.paged_cache import gather_sequence, write_to_cache


class MyBackend(BaseBackend):
    name = "my-backend"  # the backend column of its rows
    # What it supports (optimized/backend.py `Capabilities`): any other step is a skip, with why.
    capabilities = Capabilities(
        dtypes=(torch.float32, torch.float16, torch.bfloat16), position_biases=("none", "t5")
    )

    def device(self) -> torch.device:
        return torch.device("cpu")  # where the runner puts the inputs (yours: "cuda")

    def attend(self, query, key, value, kv_cache, metadata, kind) -> torch.Tensor:
        md, out = metadata, torch.zeros_like(query)  # padding rows stay zero
        tables, slots = md.tables_for(kind)
        if kv_cache is not None and key is not None:
            write_to_cache(key, value, *kv_cache, slots)
        starts = md.encoder_start_loc if kind == "encoder" else md.query_start_loc
        q_lens, kv_lens = md.query_lens_for(kind), md.kv_lens_for(kind)
        for i in range(md.num_seqs):
            q = query[starts[i] : starts[i] + q_lens[i]].float()
            if kind == "encoder":
                k, v = (t[starts[i] : starts[i] + q_lens[i]].float() for t in (key, value))
            else:
                k, v = (gather_sequence(c, tables[i], kv_lens[i]).float() for c in kv_cache)
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * md.scale_for(q.shape[-1])
            bias = md.position_bias_for(kind, i)  # T5's: [heads, q, k], or None
            if bias is not None:
                scores = scores + bias.to(scores)
            mask = md.sequence_mask(kind, i).to(scores.device)  # built on the host
            scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
            out[starts[i] : starts[i] + q_lens[i]] = o.to(query.dtype)
        return out
