"""Root pytest setup: without CUDA, Triton kernels run through the interpreter. This must be
set before Triton is imported anywhere."""

from optimized.kernels import interpret_without_cuda

interpret_without_cuda()  # before Triton is imported
