"""Triton kernels, one op per file, each a private @triton.jit kernel and a public launcher."""

import os


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
