"""Triton kernels: only `@triton.jit` code, one op per file (its launcher, which checks layouts
and plans the launch, is the file of the same name in `optimized/ops/`); and the switch that
runs them through the interpreter on a machine without CUDA."""

import os


def interpret_without_cuda() -> None:
    """Entry points call this before Triton is imported: without a CUDA device, Triton kernels
    run on the CPU through the interpreter (TRITON_INTERPRET=1; an explicit setting wins)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if interpreting():
        _without_overflow_asserts()


def _without_overflow_asserts() -> None:
    """The interpreter checks every int32 add, sub and mul for overflow (a third of a CPU tier's
    time); a compiled kernel has no such check (it is a debug-only assert there), so an
    overflow shows as wrong numbers, which the matrix judges on either side."""
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side integer helpers: triton.cdiv / triton.next_power_of_2 are JIT-callable wrappers, slow
# to call on the host in every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
