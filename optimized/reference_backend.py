"""The reference, registered as a backend (float64 output; the spec itself)."""

from optimized.backend import BaseBackend
from reference.attention import attention


class ReferenceBackend(BaseBackend):
    name = "reference"
    head_sizes = (1, 1024)
    max_block_size = 1 << 20

    def device(self):
        import torch

        return torch.device("cpu")

    def forward(self, query, key, value, kv_cache, metadata, attn_kind):
        return attention(query, key, value, kv_cache, metadata, attn_kind)
