"""The probe's facts for a card, compiled without the card:

    python -m tuning.probe [--tier full] [--model NAME|all] [--arch 90] [-j 2] [--out FILE]

On a GPU, `plan_attention` compiles every candidate launch of a kernel variant to read what it
costs an SM (registers, shared memory), before it picks one: a cold machine compiles about
twice the kernels it launches. This walks every step of a selection through the `triton`
backend on the CPU (the backend's own tensors, the plan for `--arch`'s card, nothing launched),
and compiles each candidate the probe would compile, with Triton's own argument binding and the
ptxas it ships (no GPU needed): the same binary, so the same registers (read from it with
cuobjdump) and shared memory. The table it writes, `optimized/ops/probes/sm<arch>.json`, is read
by the probe before it compiles anything (its entries are keyed by the Triton version and the
kernel's source: a stale table costs compiles, never a wrong fact). The `triton-splitk` and
`xformers` backends probe the same launches for the same steps.

Run it again after a change to `optimized/kernels/paged_attention.py` or to the plan's
candidates. (Not under TRITON_INTERPRET=1, which turns Triton's language into the
interpreter's.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("tuning.probe: unset TRITON_INTERPRET (it compiles for a GPU)")

import torch

from optimized.ops import paged_attention as pa
from optimized.ops import plan
from optimized.ops.plan import H100, Compiled

PROBES = Path(pa.__file__).with_name("probes")


def compile_facts(args: tuple, meta: dict, launch, arch: int) -> tuple[int, int]:
    """(registers, shared memory) of the kernel `warmup(*args, **meta, launch)` compiles for
    compute capability `arch`; (0, shared) where it takes more shared memory than the card lets
    a program have (as the probe records a launch the device refuses)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from tuning.registers import resources

    kernel = pa._paged_attention_kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(meta, TILE_N=launch.tile_n, num_warps=launch.num_warps,
                  num_stages=launch.num_stages, debug=False,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)  # fmt: skip
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)  # fmt: skip
    r = resources(compiled)
    shared = compiled.metadata.shared
    return (0 if shared > H100.smem_per_block else r["registers"]), shared


def _job(item):
    name, args, meta, launch, arch = item
    return name, compile_facts(args, meta, launch, arch)


class Walk:
    """Every step of the selection through the triton backend with nothing launched, the probe's
    compiles done here: first collected (each candidate assumed to fit) and compiled together in
    a pool of `jobs` processes, then the walk again with those facts, compiling what it still
    asks for (smaller launches where one did not fit), until it asks for nothing new. `facts`
    by probe name."""

    def __init__(self, arch: int, jobs: int, known: dict):
        self.arch, self.facts = arch, dict(known)
        self.pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
        self.asked: dict[str, tuple] = {}  # name -> what compiles it, while collecting
        self.collecting = False

    def compile(self, todo, args, meta) -> None:
        # Each tensor stands in as one element of its dtype: the binding reads only the dtype
        # and the 16-byte alignment (every tensor here is a fresh allocation, as on the GPU).
        light = tuple(torch.empty(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
                      for a in args)  # fmt: skip
        for key, c in todo:
            name = pa._probe_name(key)
            if name not in self.facts:
                self.asked.setdefault(name, (name, light, meta, c, self.arch))
            if self.collecting:
                pa._COMPILED[key] = Compiled(*self.facts.get(name, (1, 1)))
        if not self.collecting:
            self._compile_asked()
            for key, _ in todo:
                pa._COMPILED[key] = Compiled(*self.facts[pa._probe_name(key)])

    def _compile_asked(self) -> None:
        items = list(self.asked.values())
        found = self.pool.map(_job, items) if self.pool else map(_job, items)
        self.facts.update(found)
        self.asked.clear()

    def steps(self, shapes) -> int:
        from conformance.expected import steps_of
        from optimized.triton_backend import TritonBackend

        backend, n = TritonBackend(), 0
        for shape in shapes:
            for step in steps_of(shape.build("cpu")):
                backend.forward(*step.args())
                n += 1
        return n

    def run(self, shapes) -> int:
        self.collecting = True
        self.steps(shapes)
        self._compile_asked()
        self.collecting = False
        pa._COMPILED.clear()
        plan._CHOSEN.items.clear()  # choices made on assumed facts
        return self.steps(shapes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tier", default="full")
    p.add_argument("--model", default=None, help="the cases around a model preset (or all)")
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    p.add_argument("-j", dest="jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="default optimized/ops/probes/sm<arch>.json")
    args = p.parse_args(argv)
    from conformance import selection

    out = Path(args.out or PROBES / f"sm{args.arch}.json")
    known = {}
    if out.exists():  # entries of other selections stay
        known = json.loads(out.read_text())["facts"]
    shapes = selection.workloads(args.tier, args.model)
    walk = Walk(args.arch, args.jobs, known)
    cc = (args.arch // 10, args.arch % 10)
    torch.cuda.get_device_capability = lambda *a, **k: cc  # the probe's key names the card
    pa.card_of = lambda device: H100  # plans for a GPU, not the interpreter
    pa._compile = walk.compile
    pa.launch = lambda plan, query, key_cache, value_cache, tables, schedule, out, **k: out
    import optimized.ops.reshape_and_cache as rc

    rc.reshape_and_cache = lambda *a, **k: None
    t0 = time.time()
    n = walk.run(shapes)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = dict(arch=args.arch, note="tuning/probe.py: name -> [registers, shared bytes]",
                 facts=dict(sorted(walk.facts.items())))  # fmt: skip
    out.write_text(json.dumps(table, indent=0) + "\n")
    print(f"{len(walk.facts)} probe facts ({len(walk.facts) - len(known)} new) for {n} steps of "
          f"{len(shapes)} cases in {time.time() - t0:.0f} s -> {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
