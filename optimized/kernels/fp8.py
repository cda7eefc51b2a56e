"""fp8 in our kernels: the cache write's float32 -> fp8 conversion, in integer arithmetic.

`fp8_bits` gives the bit pattern of `clamp(x, -MAX, MAX)` rounded to the nearest fp8 value, ties
to even, subnormals kept: what torch's `.to(torch.float8_e4m3fn / float8_e5m2)` gives after the
clamp (reference/fp8.py). It is written with integer operations on the float32 bits, so the
Triton interpreter (the CPU tiers) computes exactly what the compiled kernel computes: the
interpreter's own float -> fp8 cast loses the carry when rounding crosses into the next
exponent (127.15 -> 64 instead of 128) and flushes subnormals. Reads need no such care: the
interpreter and the GPU read every finite fp8 pattern exactly (only NaN/Inf patterns differ,
and a cache slot a kernel reads always holds a written, finite value).

FORMAT (a constexpr): 1 = e4m3 (`float8_e4m3fn`, bias 7, 3 mantissa bits, max 448),
2 = e5m2 (`float8_e5m2`, bias 15, 2 mantissa bits, max 57344).
"""

import triton
import triton.language as tl

E4M3, E5M2 = 1, 2


@triton.jit
def fp8_bits(x, FORMAT: tl.constexpr):
    """float32 tensor -> int32 tensor of fp8 bit patterns (0..255): sign, then the magnitude
    rounded to nearest even (saturated to the format's max first)."""
    if FORMAT == 1:
        BIAS: tl.constexpr = 7
        MANT: tl.constexpr = 3
        MAX: tl.constexpr = 448.0
    else:
        BIAS: tl.constexpr = 15
        MANT: tl.constexpr = 2
        MAX: tl.constexpr = 57344.0
    SHIFT: tl.constexpr = 23 - MANT
    x = tl.minimum(tl.maximum(x, -MAX), MAX)
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    e = (mag >> 23) - 127  # the float32 exponent, unbiased
    # A normal fp8 value: round the 23 mantissa bits to MANT (to nearest, ties to even: add
    # half an fp8 ulp less one, plus the bit that decides ties), then re-bias the exponent. A
    # carry out of the mantissa moves into the exponent on its own.
    normal = (mag + ((1 << (SHIFT - 1)) - 1) + ((mag >> SHIFT) & 1)) >> SHIFT
    normal = normal - ((127 - BIAS) << MANT)
    # A subnormal one (below 2^(1 - BIAS)): the 24-bit significand shifted right, same rounding;
    # a result of 2^MANT is the smallest normal, which is exactly its bit pattern.
    m24 = (mag & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum(23 - (e + BIAS + MANT - 1), 1), 31)
    sub = (m24 + ((1 << (s - 1)) - 1) + ((m24 >> s) & 1)) >> s
    return (sign << 7) | tl.where(e >= 1 - BIAS, normal, sub)
