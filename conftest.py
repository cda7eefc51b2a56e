"""Root pytest setup: without CUDA, Triton kernels run through the interpreter. This must be
set before Triton is imported anywhere."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
