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

What a backend supports and how it works is one record, `Capabilities` (its fields below: the
dtypes, head sizes, kinds, cache dtypes and layout it takes, and the flags that tell the harness
how to judge it), declared once as the class attribute `capabilities`; everything outside it is
a `skip` with its reason.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, fields, replace
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


@dataclass(frozen=True)
class Capabilities:
    """What a backend takes and how the harness judges it (PyTorch OpInfo's way: one record).

    dtypes                     query dtypes it computes in
    head_sizes                 (smallest, largest) head size, inclusive
    attn_kinds                 the attention kinds it implements
    max_block_size             the largest cache block (page) it addresses
    kv_cache_dtypes            how it can store K/V: auto (the model dtype), fp8_e4m3, fp8_e5m2
    cache_layout               which cache strides it reads correctly (`CacheLayout`)
    position_biases            the score biases it adds: none, t5 (reference/position_bias.py)
    float64_output             returns float64 (the spec itself); everyone else the query dtype
    fp8_prefill_reads_inputs   at a step with no cached context, attends over the new K/V as
                               given, not as stored (vLLM V0's xFormers prefill): the reference
                               is computed the same way for it (reference/fp8.py)
    fp8_write_ulps             its fp8 cache write multiplies by the reciprocal scale: written
                               slots are judged to this many fp8 ulps, every other bit for bit
    finite_unowned_slots       it multiplies zero weights into slots it does not own: its copy
                               of the caches holds finite poison (1000) where nothing was
                               written, not NaN (a read with nonzero weight still fails)
    bitwise_under_permutation  False: it sums in physical block order, so a block permutation is
                               judged against the reference's tolerance, not bit for bit
    """

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    head_sizes: tuple[int, int] = (16, 256)
    attn_kinds: tuple[AttnKind, ...] = tuple(AttnKind)
    max_block_size: int = 256
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    cache_layout: CacheLayout = CacheLayout.ANY
    position_biases: tuple[str, ...] = ("none",)
    float64_output: bool = False
    fp8_prefill_reads_inputs: bool = False
    fp8_write_ulps: int = 0
    finite_unowned_slots: bool = False
    bitwise_under_permutation: bool = True

    @classmethod
    def describe(cls) -> str:
        """The fields and their defaults, one line (for --help)."""

        def text(v) -> str:
            if isinstance(v, tuple):
                return "(" + ", ".join(map(text, v)) + ")"
            if isinstance(v, torch.dtype):
                return str(v).removeprefix("torch.")
            return str(v.value) if isinstance(v, StrEnum) else repr(v)

        return ", ".join(f"{f.name}={text(f.default)}" for f in fields(cls))


class BaseBackend:
    """`forward` = validate once, then `attend`; `capabilities` says what it supports (every
    other step a skip with its reason)."""

    name = "base"
    capabilities = Capabilities()

    def __init_subclass__(cls, **kwargs):
        # A `prepare` belongs to the `attend` it was written for: a subclass that brings its own
        # attend without its own prepare times its attend (the default), never an inherited
        # kernel's (flex on the triton backend's prepare timed triton under flex's name).
        super().__init_subclass__(**kwargs)
        if "attend" in cls.__dict__ and "prepare" not in cls.__dict__:
            cls.prepare = BaseBackend.prepare
        # Declarations as plain class attributes (`dtypes = (...)`, the form before the record)
        # become the record's fields.
        own = cls.__dict__
        given = {f.name: own[f.name] for f in fields(Capabilities) if f.name in own}
        if given:
            cls.capabilities = replace(cls.capabilities, **given)

    def unavailable_reason(self) -> str | None:
        return None

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def not_supported_reasons(self, query, key, value, kv_cache, metadata, attn_kind) -> list[str]:
        reasons, caps = [], self.capabilities
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if query.dtype not in caps.dtypes:
            reasons.append(f"dtype {query.dtype} not supported (supports {_names(caps.dtypes)})")
        lo, hi = caps.head_sizes
        if not lo <= query.shape[-1] <= hi:
            reasons.append(f"head_size {query.shape[-1]} not in [{lo}, {hi}]")
        if AttnKind(attn_kind) not in caps.attn_kinds:
            reasons.append(f"attention kind {AttnKind(attn_kind).value} not supported")
        if metadata.block_size > caps.max_block_size:
            reasons.append(f"block_size {metadata.block_size} > {caps.max_block_size}")
        kv = metadata.kv_cache_dtype
        if kv_cache is not None and kv not in caps.kv_cache_dtypes:
            reasons.append(
                f"kv_cache_dtype {kv} not supported (supports {', '.join(caps.kv_cache_dtypes)})"
            )
        if metadata.position_bias not in caps.position_biases:
            reasons.append(
                f"position_bias {metadata.position_bias} not supported: this backend "
                f"adds no such score bias (takes {', '.join(caps.position_biases)})"
            )
        reasons += cache_layout_reasons(kv_cache, caps.cache_layout)
        return reasons

    def validate(self, query, key, value, kv_cache, metadata, attn_kind) -> AttnKind:
        """`check_inputs`, then the declared cache layout: a ValueError naming the argument,
        before anything is written."""
        kind = check_inputs(query, key, value, kv_cache, metadata, attn_kind)
        problems = cache_layout_reasons(kv_cache, self.capabilities.cache_layout)
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
    capabilities = Capabilities(
        dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16),
        head_sizes=(1, 1 << 16),
        max_block_size=1 << 30,
        kv_cache_dtypes=("auto", "fp8_e4m3", "fp8_e5m2"),
        position_biases=("none", "t5"),
        float64_output=True,
    )

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
    if not hasattr(backend, "capabilities"):  # the protocol alone: the strict defaults
        backend.capabilities = Capabilities()
    if not isinstance(backend.capabilities, Capabilities):
        raise ValueError(f"--backend-module: {spec}'s capabilities is not a Capabilities record")
    if not hasattr(backend, "prepare"):  # to time it: its forward on the same inputs
        backend.prepare = lambda *args: lambda: backend.forward(*args)
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
