"""Explicit shapes: a step (or a whole episode) spelled out, for `--cases FILE`.

A line of a cases file with an `attn_kind` field is an explicit shape; one with `kind` is a
case of the preset axes (conformance/cases.py). An explicit shape names its lengths, heads and
cache geometry directly, e.g. (one JSON object per line):

    {"name": "vllm-h16-d64-b16-cross-decode", "attn_kind": "encoder_decoder",
     "query_lens": [1, 1], "context_lens": [54, 97], "encoder_seq_lens": [128, 17],
     "num_heads": 16, "head_size": 64, "block_size": 16, "dtype": "float16"}

Fields (only `attn_kind`, `num_heads`, `head_size` and the lengths its kind needs are required):

    attn_kind         encoder | decoder | encoder_decoder | episode
    query_lens        new decoder tokens per sequence (episode: the decoder prompt lengths)
    context_lens      decoder tokens already cached (default 0: a first step). For
                      encoder_decoder, > 0 means the cross cache was written earlier (a decode)
    encoder_seq_lens  encoder tokens per sequence (encoder, encoder_decoder, episode)
    num_heads, num_kv_heads (default num_heads), head_size
    block_size (16), dtype (bfloat16; float16, float32, or fp16/bf16/fp32), layout (contiguous;
    see workloads.Layout), sliding_window (decoder, episode), scale (default 1/sqrt(head_size)),
    seed (0), decode_steps (episode: decode steps after the prefill, default 2),
    padding_tokens (trailing rows past the last real token, as CUDA graphs pad; slot -1; not
                    for episodes)
    kv_cache_dtype    auto (default: the model dtype) | fp8_e4m3 | fp8_e5m2 (reference/fp8.py)
    k_scale, v_scale  fp8 only, both required: a number (per tensor) or a list of one number per
                      kv head (per head); finite and > 0
    position_bias     none (default) | t5: T5's relative position bias on the encoder and decoder
                      steps (reference/position_bias.py), its table drawn from the seed, with
    relative_attention_num_buckets (32), relative_attention_max_distance (128): any
                      configuration Hugging Face's bucket function computes
    cache_strides     contiguous (default) | kv_interleaved (K and V views of one
                      [num_blocks, 2, block_size, num_kv_heads, head_size] pool) | head_major
                      (each stored [num_blocks, num_kv_heads, block_size, head_size]): the
                      caches are handed over as strided views in the usual index order
    name              the shape's id (letters, digits, . _ + -); default: a readable id with a
                      short hash of the content, `shape~cross-b2-h16kv16-d64-bs16-fp16-1a2b3c4d`

The id is stable (same content, same id) and is what `--case`, the report's re-run command and
the gate use; an explicit shape is re-run with its file: `run --cases FILE --case ID`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

import torch

from conformance.workloads import (
    Episode,
    KVFormat,
    Layout,
    PositionBias,
    Step,
    build_episode,
    build_step,
)
from reference.fp8 import KV_CACHE_DTYPES
from reference.position_bias import POSITION_BIASES, config_problem

ATTN_KINDS = ("encoder", "decoder", "encoder_decoder", "episode")
# Ids abbreviate the kind: encoder_decoder (the AttnKind value every row and API uses) is "cross".
_KIND_SHORT = {"encoder": "enc", "decoder": "dec", "encoder_decoder": "cross", "episode": "episode"}
# The model dtypes a workload can have (the one table: cases, shapes, models and the bench).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_DTYPE_ALIASES = {v: k for k, v in SHORT_DTYPE.items()}
SHORT_KV = {"fp8_e4m3": "kv8e4m3", "fp8_e5m2": "kv8e5m2"}  # how ids name an fp8 cache
# How ids name a cache layout (workloads.CacheStrides); contiguous is not named.
STRIDES_ID = {"contiguous": "", "kv_interleaved": "kvinterleaved", "head_major": "headmajor"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
DEFAULT_DECODE_STEPS = 2
# What each kind needs (N) and must not have (X); everything else is optional.
_NEEDS = {
    "encoder": ("encoder_seq_lens",),
    "decoder": ("query_lens",),
    "encoder_decoder": ("query_lens", "encoder_seq_lens"),
    "episode": ("query_lens", "encoder_seq_lens"),
}
_FORBIDS = {
    "encoder": ("query_lens", "context_lens", "sliding_window", "decode_steps"),
    "decoder": ("encoder_seq_lens", "decode_steps"),
    "encoder_decoder": ("sliding_window", "decode_steps"),
    "episode": ("context_lens", "padding_tokens"),
}


@dataclass(frozen=True)
class Shape:
    """One explicit step or episode (see the module docstring for the fields)."""

    attn_kind: str
    num_heads: int
    head_size: int
    query_lens: tuple[int, ...] = ()
    context_lens: tuple[int, ...] | None = None
    encoder_seq_lens: tuple[int, ...] | None = None
    num_kv_heads: int = 0  # 0: num_heads (from_dict fills it in)
    block_size: int = 16
    dtype: str = "bfloat16"
    layout: str = "contiguous"
    sliding_window: int | None = None
    scale: float | None = None
    seed: int = 0
    decode_steps: int = 0
    padding_tokens: int = 0
    kv_cache_dtype: str = "auto"
    k_scale: tuple[float, ...] | None = None
    v_scale: tuple[float, ...] | None = None
    position_bias: str = "none"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    cache_strides: str = "contiguous"
    name: str = ""
    source: str = field(default="", compare=False)  # the cases file it was read from
    # A preset case lowered to this shape (`Case.shape()`) keeps its axis values here (the
    # result columns: batch shape, size, model, ...); empty for an explicit shape.
    labels: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    # ---- identity ------------------------------------------------------------------------
    def content(self) -> dict:
        """The fields that define the shape (not its name, file or labels), for the id's hash;
        the fp8 fields only where they are set (ids of earlier shapes stay what they were)."""
        later = {"kv_cache_dtype": "auto", "k_scale": None, "v_scale": None,
                 "position_bias": "none", "relative_attention_num_buckets": 32,
                 "relative_attention_max_distance": 128,
                 "cache_strides": "contiguous"}  # fmt: skip
        return {
            k: v
            for k, v in asdict(self).items()
            if k not in ("name", "source", "labels") and not (k in later and v == later[k])
        }

    @property
    def content_hash(self) -> str:
        text = json.dumps(self.content(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def id(self) -> str:
        if self.name:
            return self.name
        n = len(self.encoder_seq_lens if self.attn_kind == "encoder" else self.query_lens)
        parts = [
            _KIND_SHORT[self.attn_kind],
            f"b{n}",
            f"h{self.num_heads}kv{self.num_kv_heads}",
            f"d{self.head_size}",
            f"bs{self.block_size}",
            SHORT_DTYPE[self.dtype],
            self.layout,
            *([SHORT_KV[self.kv_cache_dtype]] if self.kv_cache_dtype != "auto" else []),
            *(["pbt5"] if self.position_bias == "t5" else []),
            *([STRIDES_ID[self.cache_strides]] if self.cache_strides != "contiguous" else []),
            self.content_hash,
        ]
        return "shape~" + "-".join(parts)

    # ---- what the result rows say about it ----------------------------------------------------
    @property
    def phase(self) -> str:
        if self.attn_kind == "episode":
            return "episode"
        if self.attn_kind == "encoder":
            return "prefill"
        ctx = self.context_lens or (0,) * len(self.query_lens)
        if not any(ctx):
            return "prefill"
        if all(c > 0 for c in ctx):
            return "decode" if all(q == 1 for q in self.query_lens) else "chunked"
        return "mixed"

    @property
    def model(self) -> str:
        return dict(self.labels).get("model", "")

    def columns(self) -> dict:
        """The result columns that describe the workload (conformance.schema.result_row): a
        lowered preset case's own axis values, else what the explicit fields say."""
        if self.labels:
            return dict(self.labels)
        return dict(
            case_id=self.id,
            attn_kind=self.attn_kind,
            phase=self.phase,
            batch_shape="explicit",
            block_size=self.block_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.dtype,
            layout=self.layout,
            window="on" if self.sliding_window else "off",
            scale="default" if self.scale is None else "custom",
            size="explicit",
            seed=self.seed,
            model="",
            shape=self.id,
            cases_file=self.source,
            kv_cache_dtype=self.kv_cache_dtype,
            kv_scale=self.kv_scale,
            position_bias=self.bias.label,
            cache_strides=self.cache_strides,
        )

    @property
    def kv_scale(self) -> str:
        """The fp8 scale scheme: tensor (one scale), head (one per kv head), '' without fp8."""
        if self.kv_cache_dtype == "auto":
            return ""
        return "tensor" if len(self.k_scale) == 1 else "head"

    @property
    def bias(self) -> PositionBias:
        return PositionBias(self.position_bias, self.relative_attention_num_buckets,
                            self.relative_attention_max_distance)  # fmt: skip

    @property
    def kv_format(self) -> KVFormat:
        if self.kv_cache_dtype == "auto":
            return KVFormat()
        return KVFormat(self.kv_cache_dtype, tuple(self.k_scale), tuple(self.v_scale))

    def step_kinds(self) -> tuple[str, ...]:
        """The AttnKind value of each step it builds, in order (an episode: the encoder, then a
        decoder and a cross step per decoder step)."""
        if self.attn_kind == "episode":
            return ("encoder", *("decoder", "encoder_decoder") * (self.decode_steps + 1))
        return (self.attn_kind,)

    def footprint(self) -> int:
        """Bytes of the tensors `build` makes, from the fields alone (conformance/memory.py):
        what a machine must hold before anything is built."""
        from conformance.memory import host_bytes

        return host_bytes(self)

    # ---- reading and building ------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as a cases-file line holds them, defaults left out (round-trips through
        from_dict)."""
        defaults = {f.name: f.default for f in fields(self)}
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k not in ("source", "labels")
            and (v != defaults[k] or k in ("attn_kind", "num_heads", "head_size"))
        }

    @classmethod
    def from_dict(cls, obj: dict, source: str = "") -> Shape:
        """A shape from a cases-file object; ValueError naming the field otherwise."""
        known = [f.name for f in fields(cls) if f.name not in ("source", "labels")]
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; an explicit shape has {known}")
        kind = obj.get("attn_kind")
        if kind not in ATTN_KINDS:
            raise ValueError(f"attn_kind: expected one of {list(ATTN_KINDS)}, got {kind!r}")
        for f in ("num_heads", "head_size") + _NEEDS[kind]:
            if obj.get(f) is None:
                raise ValueError(f"{f}: required for attn_kind {kind!r}")
        for f in _FORBIDS[kind]:
            if obj.get(f) not in (None, 0):
                raise ValueError(f"{f}: does not apply to attn_kind {kind!r}")
        v = dict(obj)
        v["num_kv_heads"] = obj.get("num_kv_heads", obj["num_heads"])
        for f, low in (
            ("num_heads", 1),
            ("num_kv_heads", 1),
            ("head_size", 1),
            ("block_size", 1),
            ("seed", 0),
            ("decode_steps", 0),
            ("padding_tokens", 0),
        ):
            if f in v:
                v[f] = _int(f, v[f], low)
        if v["num_heads"] % v["num_kv_heads"]:
            raise ValueError(
                f"num_kv_heads: {v['num_kv_heads']} does not divide num_heads {v['num_heads']}"
            )
        lens = {}
        for f, low in (("query_lens", 1), ("context_lens", 0), ("encoder_seq_lens", 1)):
            if v.get(f) is not None:
                lens[f] = v[f] = _lengths(f, v[f], low)
        n = {f: len(x) for f, x in lens.items()}
        if len(set(n.values())) > 1:
            raise ValueError(f"lengths disagree on the number of sequences: {n}")
        given = v.get("dtype", "bfloat16")
        dtype = _DTYPE_ALIASES.get(given, given)
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {v.get('dtype')!r}")
        v["dtype"] = dtype
        layouts = [x.value for x in Layout]
        if v.get("layout", "contiguous") not in layouts:
            raise ValueError(f"layout: expected one of {layouts}, got {v.get('layout')!r}")
        if kind == "encoder" and v.get("layout", "contiguous") != "contiguous":
            raise ValueError("layout: the encoder uses no cache (contiguous only)")
        if v.get("sliding_window") is not None:
            v["sliding_window"] = _int("sliding_window", v["sliding_window"], 1)
        if v.get("scale") is not None:
            s = v["scale"]
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise ValueError(f"scale: expected a finite number, got {s!r}")
            if s <= 0:
                raise ValueError(f"scale: expected > 0, got {s!r}")
            v["scale"] = float(s)
        kv = v.get("kv_cache_dtype", "auto")
        if kv not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {list(KV_CACHE_DTYPES)}, got {kv!r}")
        if kv != "auto" and kind == "encoder":
            raise ValueError("kv_cache_dtype: the encoder has no cache (auto only)")
        for f in ("k_scale", "v_scale"):
            if kv == "auto":
                if v.get(f) is not None:
                    raise ValueError(f"{f}: only with an fp8 kv_cache_dtype")
                continue
            v[f] = _scales(f, v.get(f), v["num_kv_heads"])
        if kv != "auto" and len(v["k_scale"]) != len(v["v_scale"]):
            raise ValueError("k_scale/v_scale: expected both per tensor or both per kv head")
        bias = v.get("position_bias", "none")
        if bias not in POSITION_BIASES:
            raise ValueError(
                f"position_bias: expected one of {list(POSITION_BIASES)}, got {bias!r}"
            )
        if bias != "none" and kind == "encoder_decoder":
            raise ValueError("position_bias: t5 applies to encoder, decoder and episode shapes "
                             "(T5's cross-attention takes none)")  # fmt: skip
        for f, low in (
            ("relative_attention_num_buckets", 2),
            ("relative_attention_max_distance", 2),
        ):
            if f in v:
                if bias == "none":
                    raise ValueError(f"{f}: only with position_bias t5")
                v[f] = _int(f, v[f], low)
        if bias != "none":  # what Hugging Face computes, per direction the kind's steps use
            buckets = v.get("relative_attention_num_buckets", 32)
            distance = v.get("relative_attention_max_distance", 128)
            for bidirectional in {"encoder": (True,), "decoder": (False,)}.get(kind, (True, False)):
                problem = config_problem(buckets, distance, bidirectional)
                if problem:
                    step = "encoder" if bidirectional else "decoder"
                    raise ValueError(f"{problem} (the {step} steps' bias)")
        strides = v.get("cache_strides", "contiguous")
        if strides not in STRIDES_ID:
            raise ValueError(f"cache_strides: expected one of {list(STRIDES_ID)}, got {strides!r}")
        if kind == "encoder" and strides != "contiguous":
            raise ValueError("cache_strides: the encoder has no cache (contiguous only)")
        if kind == "episode" and v.get("decode_steps") is None:
            v["decode_steps"] = DEFAULT_DECODE_STEPS
        name = v.get("name", "")
        if not isinstance(name, str) or (name and not _NAME.fullmatch(name)):
            raise ValueError(
                f"name: {name!r} must start with a letter or digit and hold only letters, "
                "digits and . _ + -"
            )
        return cls(**{k: x for k, x in v.items() if x is not None}, source=source)

    def build(self, device: torch.device | str = "cpu") -> Step | Episode:
        """The deterministic step (or episode): caches hold NaN wherever unwritten."""
        common = dict(
            block_size=self.block_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=DTYPES[self.dtype],
            layout=self.layout,
            scale=self.scale,
            sliding_window=self.sliding_window,
            seed=self.seed,
            device=device,
            kv_format=self.kv_format,
            position_bias=self.bias,
            cache_strides=self.cache_strides,
        )
        if self.attn_kind == "episode":
            return build_episode(
                self.encoder_seq_lens, self.query_lens, self.decode_steps, **common
            )
        q = self.query_lens or (0,) * len(self.encoder_seq_lens)
        return build_step(
            self.attn_kind,
            q,
            self.context_lens,
            self.encoder_seq_lens,
            num_padding_tokens=self.padding_tokens,
            **common,
        )


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    return value


def _lengths(name: str, value, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}: expected a non-empty list of integers, got {value!r}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int) or x < low:
            raise ValueError(f"{name}[{i}]: expected an integer >= {low}, got {x!r}")
    return tuple(value)


def _scales(name: str, value, num_kv_heads: int) -> tuple[float, ...]:
    """An fp8 scale: a number (per tensor) or a list of num_kv_heads numbers (per kv head)."""
    if value is None:
        raise ValueError(
            f"{name}: required with an fp8 kv_cache_dtype (a number, or a list per kv head)"
        )
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(values) != num_kv_heads:
        raise ValueError(
            f"{name}: expected a number or a list of num_kv_heads={num_kv_heads} numbers, "
            f"got {len(values)}"
        )
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name}[{i}]: expected a finite number > 0, got {x!r}")
    return tuple(float(x) for x in values)
