"""The smallest case that still fails the same way (Hypothesis's shrinking, for attention steps).

    shrink(shape, backend, module, budget_s) -> Shrunk

From a failing workload (a preset case lowered to its explicit shape, or a cases file's shape),
a deterministic greedy search: each round tries simpler variants in a fixed order (fewer
sequences, shorter lengths that keep the boundaries that matter, fewer heads, the smallest head
size, a default page, contiguous layout, no window, default scale, fewer decode steps and
padding, fp32 and the model-dtype cache, no position bias) and keeps the first that is simpler
(`simplicity`) and fails the same way (`signature`: the same verdict on the same step kind for
the same kind of reason; an error with the same exception type). It stops when no variant is
kept, or at the budget.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from conformance import runner
from conformance.schema import Status
from conformance.shapes import Shape

# A failure's kind of reason, by its first words (runner and compare rows); anything else is
# the text up to its first colon.
REASONS = (
    ("numerical mismatch", "output"),
    ("non-finite", "non-finite output"),
    ("cache corruption", "cache"),
    ("backend modified its inputs", "inputs"),
    ("metamorphic", "metamorphic"),
    ("dtype mismatch", "dtype"),
    ("shape mismatch", "shape"),
    ("precision class", "precision"),
)


def signature(rows: list[dict]) -> tuple | None:
    """(status, what the first failing row is about, its kind of reason) of the first row
    that is neither pass nor skip, or None: a step's rows by kind (`decoder`, not `3:decoder`),
    an error by its exception type."""
    for r in rows:
        if r["status"] not in (Status.FAIL, Status.ERROR):
            continue
        where = r["step"].split(":", 1)[-1]
        reason = r["reason"]
        if r["status"] == Status.ERROR:
            m = re.match(r"(runtime error: )?(\w+)", reason)
            kind = "input rejected" if reason.startswith("input rejected") else (
                m.group(2) if m else reason[:20])  # fmt: skip
            return (Status.ERROR, where, kind)
        kind = next((k for prefix, k in REASONS if prefix in reason), reason.split(":")[0])
        return (Status.FAIL, where, kind)
    return None


def simplicity(s: Shape) -> tuple:
    """Smaller is simpler: bytes, then sequences, tokens, heads, head size, then each field
    left at its default (contiguous, no window, default scale, fp32, auto cache, no bias)."""
    lens = (*s.query_lens, *(s.context_lens or ()), *(s.encoder_seq_lens or ()))
    unusual = (s.layout != "contiguous", s.sliding_window is not None, s.scale is not None,
               s.padding_tokens > 0, s.dtype != "float32", s.kv_cache_dtype != "auto",
               s.position_bias != "none", s.block_size != 16)  # fmt: skip
    seqs = len(s.query_lens or s.encoder_seq_lens)
    return (s.footprint(), seqs, sum(lens), s.decode_steps, s.num_heads, s.num_kv_heads,
            s.head_size, sum(unusual))  # fmt: skip


def _lengths(s: Shape) -> list[str]:
    return [f for f in ("query_lens", "context_lens", "encoder_seq_lens") if getattr(s, f)]


def _interesting(n: int, low: int, block: int) -> list[int]:
    """Shorter values of a length, simplest first: the least, a block ± 1, tile edges ± 1,
    half."""
    values = [low, block - 1, block, block + 1, 15, 16, 17, 31, 32, 33, n // 2, n - 1]
    return sorted({v for v in values if low <= v < n})


def candidates(s: Shape, head_low: int) -> list[Shape]:
    """Simpler variants of `s`, in the order they are tried (each may still be invalid)."""
    out = []
    fields = _lengths(s)
    seqs = len(getattr(s, fields[0]))
    if seqs > 1:  # fewer sequences: halves, then one less
        keep = [range(seqs // 2), range(seqs // 2, seqs)] + [
            [j for j in range(seqs) if j != i] for i in range(seqs)
        ]
        for idx in keep:
            out.append(replace(s, **{f: tuple(getattr(s, f)[j] for j in idx) for f in fields}))
    for f in fields:  # shorter lengths, one sequence at a time
        low = 0 if f == "context_lens" else 1
        for i, n in enumerate(getattr(s, f)):
            for v in _interesting(n, low, s.block_size):
                lens = list(getattr(s, f))
                lens[i] = v
                out.append(replace(s, **{f: tuple(lens)}))
    group = s.num_heads // s.num_kv_heads
    for h, kv in ((group, 1), (1, 1), (2 * group, 2), (2, 2)):  # fewer heads (the GQA ratio first)
        if (h, kv) != (s.num_heads, s.num_kv_heads) and h <= s.num_heads and kv <= s.num_kv_heads:
            scales = {}
            if s.k_scale and len(s.k_scale) > 1:  # per kv head: the first kv heads' scales
                scales = dict(k_scale=s.k_scale[:kv], v_scale=s.v_scale[:kv])
            out.append(replace(s, num_heads=h, num_kv_heads=kv, **scales))
    for d in sorted({head_low, 16, 32, 64}):
        if d < s.head_size:
            out.append(replace(s, head_size=d))
    for bs in (16, 8, 4, 2, 1):
        if bs != s.block_size:
            out.append(replace(s, block_size=bs))
    simpler = dict(layout="contiguous", sliding_window=None, scale=None, padding_tokens=0,
                   dtype="float32", position_bias="none")  # fmt: skip
    for k, v in simpler.items():
        if getattr(s, k) != v:
            out.append(replace(s, **{k: v}))
    if s.kv_cache_dtype != "auto":
        out.append(replace(s, kv_cache_dtype="auto", k_scale=None, v_scale=None))
    if s.decode_steps > 1:
        out += [replace(s, decode_steps=n) for n in range(1, s.decode_steps)]
    return out


@dataclass
class Shrunk:
    """The search's outcome: the smallest shape that still fails as the original did, the
    original's failure, and the path (candidates run, kept, seconds, whether the budget ended
    it)."""

    original: Shape
    shape: Shape
    failure: tuple | None
    still: tuple | None
    tried: int = 0
    kept: int = 0
    seconds: float = 0.0
    budget_spent: bool = False


def _valid(s: Shape) -> bool:
    try:
        Shape.from_dict(s.to_dict())
    except ValueError:
        return False
    return not runner.memory_problem(s)


def _fails(s: Shape, backend, module: str, timeout_s: float) -> tuple | None:
    return signature(runner.run_case(s, backend, timeout_s=timeout_s, module=module))


def shrink(
    shape: Shape, backend, module: str = "", budget_s: float = 300.0, timeout_s: float = 60.0
) -> Shrunk:
    """Search from `shape` (see the module docstring); deterministic for a given shape."""
    t0 = time.perf_counter()
    shape = replace(shape, name="", labels=(), source="")
    failure = _fails(shape, backend, module, timeout_s)
    result = Shrunk(shape, shape, failure, failure)
    head_low = backend.capabilities.head_sizes[0]
    while failure is not None:
        for c in candidates(result.shape, head_low):
            if time.perf_counter() - t0 > budget_s:
                result.budget_spent = True
                break
            if not simplicity(c) < simplicity(result.shape) or not _valid(c):
                continue
            result.tried += 1
            if _fails(c, backend, module, timeout_s) == failure:
                result.shape, result.kept = c, result.kept + 1
                break
        else:
            break  # no simpler variant fails the same way
        if result.budget_spent:
            break
    if failure is not None:
        result.still = _fails(result.shape, backend, module, timeout_s)
    result.seconds = time.perf_counter() - t0
    return result
