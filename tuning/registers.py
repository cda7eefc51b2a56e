"""What a launch of our decode kernel costs a card, compiled without the card:

    python -m tuning.registers [--arch 90] [--head-size 128] [--group 1] [--fp8]

Compiles `_paged_attention_kernel` for CUDA compute capability `arch` with the ptxas Triton
ships (no GPU needed) for every decode launch `plan.launch_candidates` offers, and reads back
what the occupancy model uses: registers, spills (stack), shared memory, resident programs per
SM, the K/V tiles a program buffers (`buffers`) and the K/V bytes in flight per SM. Pointers
and strides get the divisibility a real launch has, so the counts match a compiled run's (the
bf16 d128 decode variant: 123 registers here, as ncu read on an H100). With `--sass`, the
instruction mix of the compiled kernel (loads from shared memory, conversions, matrix ops) for
a launch: where an fp8 or a new card's variant spends its instructions, before any GPU time is
spent on it. (Not under TRITON_INTERPRET=1, which turns Triton's language into the
interpreter's.)
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from optimized.kernels.paged_attention import _paged_attention_kernel as KERNEL
from optimized.ops.plan import H100, Compiled, compiled_kv_buffers, launch_candidates

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Runtime integers the kernel does not specialize (as in its decorator): no divisibility.
_UNSPECIALIZED = {
    "sliding_window", "block_size", "block_shift", "num_splits", "kv_tiles_per_split",
    "stride_bt_seq", "group", "head_size", "fused_reduce", "scale_stride", "scale_log2",
}  # fmt: skip


def compile_decode(
    head_pad: int, launch, group_pad: int = 1, heads: int = 1, kv: str = "bf16", arch: int = 90
):
    """The compiled decode variant (causal, paged, power-of-two block size) for `launch`."""
    constexpr = [p.name for p in KERNEL.params if p.is_constexpr]
    signature, attrs = {}, {}
    for i, name in enumerate(KERNEL.arg_names):
        if name in constexpr:
            signature[name] = "constexpr"
            continue
        if name in ("out_ptr", "q_ptr"):
            signature[name] = "*bf16"
        elif name in ("key_cache_ptr", "value_cache_ptr"):
            signature[name] = f"*{kv}"
        elif name.endswith("_ptr") and name.startswith(("part", "k_scale", "v_scale", "bias")):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
        if name not in _UNSPECIALIZED and (name.endswith("_ptr") or name.startswith("stride")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constants = dict(
        BLOCK_M=max(16, group_pad * heads), GROUP_PAD=group_pad, HEAD_PAD=head_pad, EVEN_D=True,
        TILE_N=launch.tile_n, PAGED=True, POW2_BLOCK=True, CAUSAL=True, WINDOW=False,
        UPCAST_DOT=False, DOT_PRECISION="tf32", HEADS=heads, KV_FP8=kv != "bf16",
    )  # fmt: skip
    src = ASTSource(KERNEL, signature, constexprs=constants, attrs=attrs)
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(kernel, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        cmd = [os.path.join(_TOOLS, "cuobjdump"), *flags, f.name]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def resources(kernel) -> dict:
    """Registers and stack (spills) per thread, shared memory per program."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(kernel, "--dump-resource-usage"))
    return dict(registers=int(m.group(1)), stack=int(m.group(2)), shared=kernel.metadata.shared)


def instruction_mix(kernel) -> collections.Counter:
    """SASS opcodes (without modifiers) of the kernel, counted."""
    ops = collections.Counter()
    for line in _cuobjdump(kernel, "-sass").splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?P\d+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    return ops


def report(head_size: int, group: int, fp8: bool, arch: int, sass: bool) -> list[dict]:
    """One row per decode launch candidate (and, for fp8, the same for bf16 beside it)."""
    head_pad = triton.next_power_of_2(head_size)
    group_pad = triton.next_power_of_2(group)
    heads = 2 if group == 1 and head_pad == 64 else 1
    rows = []
    for kv in ("bf16", "fp8e4nv") if fp8 else ("bf16",):
        wide = head_pad * heads
        for c in launch_candidates(wide, False, max(16, group_pad * heads), 2, H100,
                                   heads, kv != "bf16"):  # fmt: skip
            k = compile_decode(head_pad, c, group_pad, heads, kv, arch)
            r = resources(k)
            resident = H100.resident(Compiled(r["registers"], r["shared"]), c.num_warps)
            kv_bytes = 1 if kv != "bf16" else 2
            block_m = max(16, group_pad * heads)
            buffers = compiled_kv_buffers(r["shared"], block_m, wide, 2, c.tile_n, kv_bytes)
            in_flight = resident * c.tile_n * wide * 2 * kv_bytes * buffers
            row = dict(kv=kv, tile_n=c.tile_n, warps=c.num_warps, stages=c.num_stages, **r,
                       resident=resident, buffers=buffers,
                       in_flight_kb=in_flight // 1024)  # fmt: skip
            if sass:
                mix = instruction_mix(k)
                row.update({op: mix.get(op, 0) for op in ("HMMA", "LDSM", "LDS", "F2F", "F2FP",
                                                           "LOP3", "PRMT")})  # fmt: skip
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tuning.registers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--group", type=int, default=1, help="query heads per kv head")
    p.add_argument("--fp8", action="store_true", help="also the fp8 cache's variants")
    p.add_argument("--sass", action="store_true", help="the instruction mix of each variant")
    args = p.parse_args(argv)
    for row in report(args.head_size, args.group, args.fp8, args.arch, args.sass):
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
