"""The backend protocol, the registry, and loading backends written outside this repository.

A backend computes exactly what `reference.attention` specifies, from the same arguments:

    forward(query, key, value, kv_cache, metadata, attn_kind) -> output [num_tokens, num_heads,
    head_size], writing the new K/V into kv_cache in place

It says what it cannot do, as reasons (never by failing): `unavailable_reason()` for the whole
backend on this machine (no CUDA, xFormers' extension not loaded, ...), and
`not_supported_reasons(query, key, value, kv_cache, metadata, attn_kind)` for one step (dtype,
head size, block size, kind, phase, ...): the same arguments as `forward`, nothing else (a
backend never sees the expected answer). The runner records a step with reasons as `skip` with
those reasons; an exception raised by any of these methods is an `error` row, never a skip.

`BaseBackend.forward` validates once for every backend built on it, before anything is written:
`reference.validation.check_inputs`, then the cache layout the backend declares
(`cache_layout`), then it hands contiguous query/key/value to the backend's `attend`. A backend
that overrides `forward` itself calls `check_inputs` first.

Two fp8 declarations (reference/fp8.py): `fp8_prefill_reads_inputs = True` (at a step where no
sequence has cached context, the kernel attends over the new K/V as given, not as stored: the
reference is computed the same way for it) and `fp8_write_ulps = 1` (its cache write multiplies
by the reciprocal scale: written slots are judged to that many fp8 ulps, never silently).

Two optional class attributes relax what the matrix assumes, for kernels built that way (flex):
`finite_unowned_slots = True` (the kernel multiplies zero weights into slots it does not own:
its copy of the caches holds finite poison, 1000, instead of NaN where nothing was written; a
read with nonzero weight still fails) and `bitwise_under_permutation = False` (it sums in
physical block order: a block permutation is judged against the reference's tolerance instead
of bit for bit). Both default to the strict behaviour.
"""

from __future__ import annotations

import importlib
import sys
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from reference.metadata import AttnKind
from reference.validation import check_inputs

ENTRY_POINT_GROUP = "encdec_attn.backends"


@runtime_checkable
class Backend(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None."""

    def device(self) -> torch.device:
        """Where its inputs must live."""

    def not_supported_reasons(self, query, key, value, kv_cache, metadata, attn_kind) -> list[str]:
        """Why this backend cannot run this step (empty: it can)."""

    def forward(self, query, key, value, kv_cache, metadata, attn_kind) -> torch.Tensor: ...


class CacheLayout(StrEnum):
    """Which strides of `key_cache`/`value_cache` a backend reads correctly."""

    ANY = "any"  # any strides (indexes the cache by (block, offset, head))
    UNIT_LAST_DIM = "unit_last_dim"  # any strides except along head_size, which must be 1
    CONTIGUOUS = "contiguous"  # a dense [num_blocks, block_size, num_kv_heads, head_size] tensor


def cache_layout_reasons(kv_cache, layout: CacheLayout) -> list[str]:
    """Why `kv_cache` does not have `layout` (empty: it does, or there is no cache)."""
    if kv_cache is None or layout == CacheLayout.ANY:
        return []
    caches = [(n, c) for n, c in zip(("key_cache", "value_cache"), kv_cache) if c.dim() == 4]
    if layout == CacheLayout.CONTIGUOUS:
        return [
            f"{n}: needs a contiguous cache, got strides {c.stride()}"
            for n, c in caches
            if not c.is_contiguous()
        ]
    return [
        f"{n}: needs a contiguous last dim (stride 1), got stride {c.stride(-1)}"
        for n, c in caches
        if c.stride(-1) != 1
    ]


class BaseBackend:
    """Declarative support limits shared by the built-in backends (subclasses narrow them), and
    `forward` = validate once, then `attend`."""

    name = "base"
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    attn_kinds: tuple[AttnKind, ...] = tuple(AttnKind)
    head_sizes: tuple[int, int] = (16, 256)  # inclusive range
    max_block_size: int = 256
    cache_layout: CacheLayout = CacheLayout.ANY
    # How it can store K/V (reference/fp8.py): ("auto",) means the model dtype only, so a
    # backend written before fp8 caches declines them with a reason instead of failing.
    kv_cache_dtypes: tuple[str, ...] = ("auto",)

    def __init_subclass__(cls, **kwargs):
        # A `prepare` belongs to the `attend` it was written for: a subclass that brings its own
        # attend without its own prepare times its attend (the default), never an inherited
        # kernel's (flex on the triton backend's prepare timed triton under flex's name).
        super().__init_subclass__(**kwargs)
        if "attend" in cls.__dict__ and "prepare" not in cls.__dict__:
            cls.prepare = BaseBackend.prepare

    def unavailable_reason(self) -> str | None:
        return None

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def not_supported_reasons(self, query, key, value, kv_cache, metadata, attn_kind) -> list[str]:
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if query.dtype not in self.dtypes:
            reasons.append(f"dtype {query.dtype} not supported (supports {_names(self.dtypes)})")
        lo, hi = self.head_sizes
        if not lo <= query.shape[-1] <= hi:
            reasons.append(f"head_size {query.shape[-1]} not in [{lo}, {hi}]")
        if AttnKind(attn_kind) not in self.attn_kinds:
            reasons.append(f"attention kind {AttnKind(attn_kind).value} not supported")
        if metadata.block_size > self.max_block_size:
            reasons.append(f"block_size {metadata.block_size} > {self.max_block_size}")
        kv = getattr(metadata, "kv_cache_dtype", "auto")
        if kv_cache is not None and kv not in self.kv_cache_dtypes:
            reasons.append(
                f"kv_cache_dtype {kv} not supported (supports {', '.join(self.kv_cache_dtypes)})"
            )
        reasons += cache_layout_reasons(kv_cache, self.cache_layout)
        return reasons

    def validate(self, query, key, value, kv_cache, metadata, attn_kind) -> AttnKind:
        """`check_inputs`, then the declared cache layout: a ValueError naming the argument,
        before anything is written."""
        kind = check_inputs(query, key, value, kv_cache, metadata, attn_kind)
        problems = cache_layout_reasons(kv_cache, self.cache_layout)
        if problems:
            raise ValueError(problems[0])
        return kind

    def forward(self, query, key, value, kv_cache, metadata, attn_kind) -> torch.Tensor:
        """Validate, then `attend` on contiguous query/key/value."""
        kind = self.validate(query, key, value, kv_cache, metadata, attn_kind)
        query, key, value = contiguous(query, key, value)
        return self.attend(query, key, value, kv_cache, metadata, kind)

    def attend(self, query, key, value, kv_cache, metadata, kind: AttnKind) -> torch.Tensor:
        """The step on validated inputs: write the new K/V into `kv_cache`, return the output
        [num_tokens, num_heads, head_size] (padding rows zero). Backends implement this."""
        raise NotImplementedError

    def prepare(self, query, key, value, kv_cache, metadata, attn_kind):
        """The step as a call to time (`python -m bench`): validation and whatever host work the
        backend can do once happen here; the returned callable does what `forward` does after
        that, on these inputs, every time it is called. By default: `attend`."""
        kind = self.validate(query, key, value, kv_cache, metadata, attn_kind)
        query, key, value = contiguous(query, key, value)
        return lambda: self.attend(query, key, value, kv_cache, metadata, kind)

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def contiguous(*tensors):
    """The tensors with a contiguous layout (a copy only where needed; None stays None): for
    kernels that index their inputs densely. Caches are never copied (they are written in place)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


class ReferenceBackend(BaseBackend):
    """The spec itself, registered like a backend (`--backend reference`): float64 output, every
    dtype the spec accepts (float64 included), any head and block size, on the CPU."""

    name = "reference"
    float64_output = True  # the spec's own output; every other backend returns the query dtype
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    kv_cache_dtypes = ("auto", "fp8_e4m3", "fp8_e5m2")
    head_sizes = (1, 1 << 16)
    max_block_size = 1 << 30

    def device(self) -> torch.device:
        return torch.device("cpu")

    def attend(self, query, key, value, kv_cache, metadata, kind) -> torch.Tensor:
        from reference.attention import attention

        return attention(query, key, value, kv_cache, metadata, kind)


# name -> "module:Class"; imported lazily so one broken backend never hides the others.
BUILTIN = {
    "reference": "optimized.backend:ReferenceBackend",
    "torch": "optimized.torch_backend:TorchBackend",
    "triton": "optimized.triton_backend:TritonBackend",
    "triton-splitk": "optimized.triton_backend:TritonSplitKBackend",
    "xformers": "optimized.xformers_backend:XFormersBackend",
    "xformers-paged": "optimized.xformers_backend:XFormersPagedBackend",
    "flex": "optimized.flex_backend:FlexBackend",
}


class UnavailableBackend(BaseBackend):
    """Stands in for a backend whose module could not be imported; every step is skipped."""

    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable_reason(self) -> str | None:
        return self._reason


def _import(module_name: str):
    """A module by dotted name, or by file path (`path/to/kernel.py`): the file's folder goes on
    sys.path first, so the file can import its neighbours."""
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name).expanduser().resolve()
    if not path.is_file():
        raise ModuleNotFoundError(f"no such file {module_name!r}")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return importlib.import_module(path.stem)


def load_backend(spec: str) -> Backend:
    """`package.module:ClassName` or `path/to/file.py:ClassName` → an instance implementing the
    protocol (a clear ValueError otherwise)."""
    if ":" not in spec.lstrip("/"):
        raise ValueError(
            f"--backend-module: expected 'package.module:ClassName' or "
            f"'path/to/file.py:ClassName', got {spec!r}"
        )
    module_name, class_name = spec.rsplit(":", 1)
    cls = getattr(_import(module_name), class_name, None)
    if cls is None:
        raise ValueError(f"--backend-module: {module_name} has no attribute {class_name!r}")
    backend = cls()
    missing = [
        m
        for m in ("name", "forward", "not_supported_reasons", "unavailable_reason", "device")
        if not hasattr(backend, m)
    ]
    if missing:
        raise ValueError(f"--backend-module: {spec} lacks {missing} of the Backend protocol")
    return backend


def canonical_spec(spec: str) -> str:
    """The spec of a loaded backend as it re-runs from anywhere: a file path made absolute; a
    single-file module found outside this project and site-packages (e.g. through PYTHONPATH) as
    its absolute file path. Other specs stay as given."""
    module_name, class_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        return f"{Path(module_name).expanduser().resolve()}:{class_name}"
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if "." in module_name or not origin:
        return spec
    where = Path(origin).resolve().parent
    here = Path(__file__).resolve().parents[1]
    if where == here or "site-packages" in where.parts:
        return spec
    return f"{Path(origin).resolve()}:{class_name}"


def get_backend(name: str) -> Backend:
    """A built-in or entry-point backend by name; an import failure becomes a skip reason."""
    specs = {**BUILTIN, **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}
    if name not in specs:
        raise ValueError(f"--backend: unknown backend {name!r}; known: {sorted(specs)}")
    try:
        return load_backend(specs[name])
    except ImportError as e:
        return UnavailableBackend(name, f"{name} could not be imported: {e}")


def backend_names() -> list[str]:
    return [*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))]
