"""The case model: one frozen dataclass of axis values, a stable readable id, validity rules,
and `build_inputs(case)`: the deterministic step(s) a case runs.

An id names every axis, e.g. `cross-decode-ragged-bs16-h8kv2-d80-bf16-shuffled-s3`
(kind-phase-batch-block-heads-headsize-dtype-layout[-wN][-sc][-large|-long][-kv8e4m3|-kv8e5m2
[-ph]][-pbt5|-pbt5small][-kvinterleaved|-headmajor]-sSEED: `kv8...` an fp8 KV cache, `ph` its
scales per kv head, `pb...` T5's position bias, `kvinterleaved`/`headmajor` strided caches).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from conformance.models import MODELS, SMOKE_SCALE
from conformance.shapes import SHORT_DTYPE, SHORT_KV, STRIDES_ID, Shape
from conformance.workloads import Episode, Layout, Step

# Each axis and its values, in id order; each value is a case real serving produces.
AXES: dict[str, tuple] = {
    "kind": ("encoder", "decoder", "cross", "episode"),
    "phase": ("prefill", "decode", "mixed", "chunked", "episode"),
    "batch": ("single", "uniform", "ragged", "many_short", "few_long", "enc_shorter", "enc_longer"),
    "block_size": (1, 8, 16, 32, 64, 128, 256),
    "heads": ("h4kv4", "h8kv2", "h32kv8", "h8kv1"),
    "head_size": (64, 80, 96, 128, 256),
    "dtype": ("float32", "float16", "bfloat16"),
    "layout": tuple(layout.value for layout in Layout),
    "window": ("off", "on"),
    "scale": ("default", "custom"),
    # long: small shapes except a few very long sequences of small blocks (> 128 blocks, 16 and
    # 32 split-K splits even under the interpreter); for the edge cases only, never pairwise.
    "size": ("small", "large", "long"),
    # How the caches store K/V (reference/fp8.py), and fp8's scale scheme (`fp8_scales`).
    "kv_cache_dtype": ("auto", "fp8_e4m3", "fp8_e5m2"),
    "kv_scale": ("tensor", "head"),
    # T5's relative position bias (reference/position_bias.py) on the encoder and decoder self
    # steps: T5's 32 buckets up to 128, and 8 up to 16, where long contexts clamp to the last.
    "position_bias": ("none", "t5", "t5small"),
    # How the caches sit in memory (workloads.CacheStrides), handed over as strided views.
    "cache_strides": ("contiguous", "kv_interleaved", "head_major"),
}
BIAS_CONFIGS = {"t5": (32, 128), "t5small": (8, 16)}
PAIRWISE_SIZES = ("small", "large")
KIND_TO_ATTN = {"encoder": "encoder", "decoder": "decoder", "cross": "encoder_decoder"}
_BATCH_BY_ID = {b.replace("_", ""): b for b in AXES["batch"]}
_DTYPE_BY_SHORT = {v: k for k, v in SHORT_DTYPE.items()}
CUSTOM_SCALE = 0.37
EPISODE_DECODE_STEPS = {"small": 3, "large": 8, "long": 3}
_KV_BY_SHORT = {v: k for k, v in SHORT_KV.items()}
_STRIDES_BY_ID = {v: k for k, v in STRIDES_ID.items() if v}
# Per tensor, k_scale is small enough that standard-normal keys past ~2.7 saturate (the clamp
# works; without it e4m3 would store NaN) and v_scale is not 1. Per kv head, every head's
# scales differ, so a scale read with the query head's index instead of its kv head's shows.
SATURATING_K_SCALE = {"fp8_e4m3": 0.006, "fp8_e5m2": 0.00005}


def fp8_scales(kv_cache_dtype: str, kv_scale: str, num_kv_heads: int):
    """(k_scale, v_scale) of the preset axes as floats: one each (tensor) or one per kv head."""
    if kv_scale == "tensor":
        return (SATURATING_K_SCALE[kv_cache_dtype],), (CUSTOM_SCALE,)
    heads = range(num_kv_heads)
    return tuple(0.3 + 0.2 * h for h in heads), tuple(1.5 / (1 + h) for h in heads)


@dataclass(frozen=True, order=True)
class Case:
    kind: str
    phase: str
    batch: str
    block_size: int
    heads: str
    head_size: int
    dtype: str
    layout: str
    window: str = "off"
    scale: str = "default"
    size: str = "small"
    seed: int = 0
    model: str = ""  # a preset of conformance/models.py: its geometry, scale, dtype and lengths
    kv_cache_dtype: str = "auto"
    kv_scale: str = "tensor"  # fp8 only ('head': per kv head)
    position_bias: str = "none"
    cache_strides: str = "contiguous"

    @property
    def id(self) -> str:
        parts = [
            self.kind,
            self.phase,
            self.batch.replace("_", ""),
            f"bs{self.block_size}",
            self.heads,
            f"d{self.head_size}",
            SHORT_DTYPE[self.dtype],
            self.layout,
        ]
        if self.window == "on":
            parts.append(f"w{self.window_size}")
        if self.scale == "custom":
            parts.append("sc")
        if self.size != "small":
            parts.append(self.size)
        if self.kv_cache_dtype != "auto":
            parts.append(SHORT_KV[self.kv_cache_dtype])
            if self.kv_scale == "head":
                parts.append("ph")
        if self.position_bias != "none":
            parts.append(f"pb{self.position_bias}")
        if self.cache_strides != "contiguous":
            parts.append(STRIDES_ID[self.cache_strides])
        parts.append(f"s{self.seed}")
        return (f"{self.model}~" if self.model else "") + "-".join(parts)

    @property
    def num_heads(self) -> int:
        return int(self.heads[1:].split("kv")[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.heads.split("kv")[1])

    @property
    def attn_kind(self) -> str:
        """The AttnKind value of the case's step ('encoder', 'decoder', 'encoder_decoder');
        'episode' for a whole episode (its steps have all three)."""
        return KIND_TO_ATTN.get(self.kind, self.kind)

    @property
    def window_size(self) -> int | None:
        if self.window == "off":
            return None
        if self.model:
            w = MODELS[self.model].sliding_window
            return w if self.size == "large" else max(1, w // SMOKE_SCALE)
        return 129 if self.size == "large" else 7

    @property
    def softmax_scale(self) -> float | None:
        """The scale the case's steps use (None: 1/sqrt(head_size))."""
        if self.model:
            return MODELS[self.model].scale
        return CUSTOM_SCALE if self.scale == "custom" else None

    @classmethod
    def from_id(cls, case_id: str) -> Case:
        """Parse an id back into its case (ids name every axis), e.g. to re-run it alone."""
        model, _, rest_id = case_id.rpartition("~")
        parts = rest_id.split("-")
        try:
            kind, phase, batch, bs, heads, d, dtype, layout = parts[:8]
            rest = parts[8:]
            obj = dict(
                kind=kind,
                phase=phase,
                batch=_BATCH_BY_ID[batch],
                block_size=int(bs[2:]),
                heads=heads,
                head_size=int(d[1:]),
                dtype=_DTYPE_BY_SHORT[dtype],
                layout=layout,
                seed=int(rest.pop()[1:]),
            )
            if model:
                obj["model"] = model
            for p in rest:
                if p.startswith("w"):
                    obj["window"] = "on"
                elif p == "sc":
                    obj["scale"] = "custom"
                elif p in ("large", "long"):
                    obj["size"] = p
                elif p in _KV_BY_SHORT:
                    obj["kv_cache_dtype"] = _KV_BY_SHORT[p]
                elif p == "ph":
                    obj["kv_scale"] = "head"
                elif p.startswith("pb"):
                    obj["position_bias"] = p[2:]
                elif p in _STRIDES_BY_ID:
                    obj["cache_strides"] = _STRIDES_BY_ID[p]
                else:
                    raise ValueError(p)
        except (ValueError, KeyError, IndexError):
            raise ValueError(
                f"not a case id: {case_id!r} (expected e.g. "
                "cross-decode-ragged-bs16-h8kv2-d80-bf16-shuffled-s3)"
            ) from None
        case = cls.from_dict(obj)
        if case.id != case_id:
            raise ValueError(f"not a case id: {case_id!r} (did you mean {case.id}?)")
        return case

    def columns(self) -> dict:
        """The result columns that describe the case (conformance.schema.result_row)."""
        return dict(
            case_id=self.id,
            attn_kind=self.attn_kind,
            phase=self.phase,
            batch_shape=self.batch,
            block_size=self.block_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.dtype,
            layout=self.layout,
            window=self.window,
            scale=self.scale,
            size=self.size,
            seed=self.seed,
            model=self.model,
            shape="",
            cases_file="",
            kv_cache_dtype=self.kv_cache_dtype,
            kv_scale=self.kv_scale if self.kv_cache_dtype != "auto" else "",
            position_bias=self.bias.label if self.bias_applies else "none",
            cache_strides=self.cache_strides,
        )

    @property
    def bias_applies(self) -> bool:
        """The case's steps take a position bias: T5's where its model has it or its axis says
        so, on the encoder and decoder self steps (an episode: those of its steps)."""
        return self.bias.kind != "none" and self.kind != "cross"

    @property
    def bias(self):
        """The position bias of its encoder and decoder steps (a model's own, else the axis)."""
        from conformance.workloads import PositionBias

        if self.model:
            m = MODELS[self.model]
            return PositionBias(m.position_bias, m.relative_attention_num_buckets,
                                m.relative_attention_max_distance)  # fmt: skip
        if self.position_bias == "none":
            return PositionBias()
        return PositionBias("t5", *BIAS_CONFIGS[self.position_bias])

    def to_dict(self) -> dict:
        """The axis values (a cases-file line; Shape.to_dict is the explicit shapes' one)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict) -> Case:
        """A case from axis values (e.g. a JSON line or a report row); unknown names or invalid
        combinations are a ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown case axes {unknown}; known: {sorted(names)}")
        missing = sorted(
            n
            for n in (
                "kind",
                "phase",
                "batch",
                "block_size",
                "heads",
                "head_size",
                "dtype",
                "layout",
            )
            if n not in obj
        )
        if missing:
            raise ValueError(f"case is missing axes {missing}")
        case = cls(
            **{k: int(v) if k in ("block_size", "head_size", "seed") else v for k, v in obj.items()}
        )
        problems = invalid_reasons(case)
        if problems:
            raise ValueError(f"invalid case {obj}: {'; '.join(problems)}")
        return case


def case_from_id(case_id: str) -> Case:
    """Case.from_id, with a hint for ids that only a cases file can resolve."""
    try:
        return Case.from_id(case_id)
    except ValueError as e:
        raise ValueError(
            f"{e}; an explicit shape's id is resolved by its file: --cases FILE --case ID"
        ) from None


def read_cases_file(path: str | Path) -> list[Case | Shape]:
    """The cases of a JSON-lines file: rows of axis values (with `kind`, conformance/cases.py)
    or explicit shapes (with `attn_kind`, conformance/shapes.py), in file order; ValueError
    naming the line and the field otherwise (ids must be unique)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--cases: cannot read {str(path)!r} ({e})") from None
    cases, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            if "attn_kind" in obj:
                case = Shape.from_dict(obj, source=str(path))
                if case.name and _is_case_id(case.name):
                    raise ValueError(
                        f"name: {case.name!r} is the id of a preset case (one id must mean one "
                        "workload in every file): give the shape another name"
                    )
            else:
                case = Case.from_dict(obj)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--cases {path} line {n}: {e}") from None
        if case.id in seen:
            raise ValueError(
                f"--cases {path} line {n}: id {case.id} is already on line {seen[case.id]}"
            )
        seen[case.id] = n
        cases.append(case)
    return cases


def _is_case_id(name: str) -> bool:
    try:
        Case.from_id(name)
    except ValueError:
        return False
    return True


def select_cases(ids: list[str] | None, cases_file: str | None) -> list[Case | Shape] | None:
    """What `--case ID ... [--cases FILE]` selects: with a file, its cases of those ids (all
    of them without ids); without one, the ids parsed. None when neither is given."""
    if cases_file:
        pool = read_cases_file(cases_file)
        if not ids:
            return pool
        by_id = {c.id: c for c in pool}
        for i in ids:
            if i not in by_id:
                raise ValueError(f"--case {i}: no such case in --cases {cases_file}")
        return [by_id[i] for i in dict.fromkeys(ids)]
    if ids:
        return [case_from_id(i) for i in dict.fromkeys(ids)]
    return None


def invalid_reasons(case: Case | dict) -> list[str]:
    """Why a combination of axis values is not a valid case (empty: valid). Works on partial
    dicts too (what a pairwise generator asks about while it builds rows)."""
    v = asdict(case) if isinstance(case, Case) else case
    bad = []
    model = v.get("model") or ""
    preset = MODELS.get(model) if model else None
    if model and preset is None:
        bad.append(f"model={model!r} not in {sorted(MODELS)}")
    from_model = ("heads", "head_size", "dtype") if preset else ()
    for axis, value in v.items():
        if axis in AXES and axis not in from_model and value not in AXES[axis]:
            bad.append(f"{axis}={value!r} not in {AXES[axis]}")
    if preset:
        want = dict(heads=preset.heads, head_size=preset.head_size, dtype=preset.dtype)
        for axis, value in want.items():
            if axis in v and v[axis] != value:
                bad.append(f"{axis}={v[axis]!r}: model {model} has {value!r}")
        if v.get("scale", "default") != "default":
            bad.append(f"scale: model {model} has its own scale (scale must be 'default')")
        if v.get("size", "small") == "long":
            bad.append("size 'long' is for the preset axes' edge cases")
        if v.get("window") == "on" and preset.sliding_window is None:
            bad.append(f"model {model} has no sliding window")
        if v.get("batch") == "enc_shorter" and preset.encoder_fixed:
            bad.append(f"model {model} has a fixed encoder length")
        if v.get("position_bias", "none") != "none":
            bad.append(f"model {model} brings its own position bias (position_bias must be 'none')")
    kind, phase, batch = v.get("kind"), v.get("phase"), v.get("batch")
    kv = v.get("kv_cache_dtype", "auto")
    if kv == "auto" and v.get("kv_scale", "tensor") != "tensor":
        bad.append("kv_scale 'head' needs an fp8 kv_cache_dtype")
    if kind == "encoder" and kv != "auto":
        bad.append("the encoder has no cache: kv_cache_dtype auto only")
    if kind == "encoder" and v.get("cache_strides", "contiguous") != "contiguous":
        bad.append("the encoder has no cache: cache_strides contiguous only")
    if kind == "encoder":
        if phase not in (None, "prefill"):
            bad.append("the encoder has no decode or cached context: phase must be prefill")
        if v.get("block_size", 16) != 16 or v.get("layout", "contiguous") != "contiguous":
            bad.append("the encoder uses no cache: block_size 16 and layout contiguous only")
    if (kind == "episode") != (phase == "episode") and None not in (kind, phase):
        bad.append("phase 'episode' goes with kind 'episode' only")
    if v.get("position_bias", "none") != "none" and kind == "cross":
        bad.append("the position bias applies to encoder and decoder self-attention, not cross")
    if v.get("window") == "on" and kind in ("encoder", "cross"):
        bad.append("sliding window applies to decoder self-attention only")
    if batch in ("enc_shorter", "enc_longer") and kind in ("encoder", "decoder"):
        bad.append("encoder-vs-decoder lengths need cross-attention (cross or episode)")
    if batch == "single" and phase == "mixed":
        bad.append("a mixed batch needs several sequences")
    if v.get("layout") == "shared" and kind in ("encoder", "cross"):
        bad.append("shared prefix blocks are decoder self-attention context")
    if v.get("layout") == "shared" and phase == "prefill":
        bad.append("shared prefix blocks need cached context")
    if v.get("layout") == "shared" and batch == "single":
        bad.append("shared prefix blocks need several sequences")
    return bad


def _model_decoder_lengths(case: Case) -> list[int]:
    """A model's decoder lengths: its real maximum (full), or ÷ SMOKE_SCALE (smoke)."""
    m, bs = MODELS[case.model], case.block_size
    dmax = max(2, m.decoder_max // (SMOKE_SCALE if case.size == "small" else 1))
    clip = lambda lens: [min(max(n, 1), dmax) for n in lens]
    many = 12 if case.size == "small" else 64
    return clip(
        {
            "single": [dmax * 3 // 4],
            "uniform": [dmax // 2] * (3 if case.size == "small" else 8),
            "ragged": [1, bs - 1, bs, bs + 1, dmax // 2, dmax],
            "many_short": [1 + (i * 7) % 9 for i in range(many)],
            "few_long": [dmax, dmax - 3],
            "enc_shorter": [dmax, dmax // 2, dmax // 3],
            "enc_longer": [3, 5, 2],
        }[case.batch]
    )


def _model_encoder_lengths(case: Case, dec: list[int]) -> list[int]:
    m = MODELS[case.model]
    emax = max(2, m.encoder_len // (SMOKE_SCALE if case.size == "small" else 1))
    if m.encoder_fixed:
        return [emax] * len(dec)
    if case.batch == "enc_longer":
        return [emax, max(1, emax // 2), max(1, emax // 3)][: len(dec)]
    if case.batch == "enc_shorter":
        return [max(1, n // 3) for n in dec]
    return [min(emax, n + 5 * (i % 3) + 2) for i, n in enumerate(dec)]


def decoder_lengths(case: Case) -> list[int]:
    """Total decoder tokens per sequence (context + new) for the batch shape."""
    if case.model:
        return _model_decoder_lengths(case)
    bs, small = case.block_size, case.size != "large"
    # long: 32 and 16 split-K splits under the interpreter (64-token tiles, 4 SMs assumed)
    if case.size == "long" and case.batch == "single":
        return [8203]
    if case.size == "long" and case.batch == "few_long":
        return [2200, 4100]
    if case.batch == "single":
        return [bs + 3 if small and bs < 40 else (37 if small else 1000)]
    if case.batch == "uniform":
        return [21] * 3 if small else [300] * 16
    if case.batch == "ragged":
        lens = [1, bs - 1, bs, bs + 1, 54, 97] if not small else [1, bs - 1, bs, bs + 1, 54]
        lens = [n for n in lens if n >= 1]
        return [min(n, 130) for n in lens] if small else lens
    if case.batch == "many_short":
        return (
            [1 + (i * 7) % 9 for i in range(12)]
            if small
            else [1 + (i * 37) % 61 for i in range(96)]
        )
    if case.batch == "few_long":
        return [61, 45] if small else [2048 + 17, 3001]
    if case.batch == "enc_shorter":
        return [17, 9, 30] if small else [400, 448, 300]
    return [3, 5, 2] if small else [12, 40, 7]  # enc_longer: few decoder tokens


def encoder_lengths(case: Case, dec: list[int]) -> list[int]:
    """Encoder tokens per sequence, independent of the decoder's."""
    if case.model:
        return _model_encoder_lengths(case, dec)
    if case.batch == "enc_shorter":
        return [max(1, n // 3) for n in dec]
    if case.batch == "enc_longer":
        return [41, 26, 60] if case.size != "large" else [1500, 1024, 512]
    return [n + 5 * (i % 3) + 2 for i, n in enumerate(dec)]


def split_phase(case: Case, totals: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(query_lens, context_lens) for the phase: prompt, one token on a context, a chunk, or
    a mix of prefills, chunks and decodes (prefills first, as engines pack them)."""
    if case.phase in ("prefill", "episode"):
        return tuple(totals), (0,) * len(totals)
    if case.phase == "decode":
        return (1,) * len(totals), tuple(max(n - 1, 1) for n in totals)
    if case.phase == "chunked":
        q = [max(1, n // 3) for n in totals]
        return tuple(q), tuple(max(n - c, 1) for n, c in zip(totals, q))
    q, c = [], []  # mixed: a full prefill, a chunk on a context, then decodes
    for i, n in enumerate(totals):
        if i == 0:
            q.append(n), c.append(0)
        elif i == 1:
            q.append(max(1, n // 2)), c.append(max(n - n // 2, 1))
        else:
            q.append(1), c.append(max(n - 1, 1))
    return tuple(q), tuple(c)


def lower(case: Case) -> Shape:
    """The explicit shape a preset case stands for: its lengths (from the batch shape, phase and
    size), geometry, layout, window, scale and seed, labelled with the case's id and columns.
    The runner, the results and the report see only shapes."""
    dec = decoder_lengths(case)
    enc = encoder_lengths(case, dec)
    common = dict(
        num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads,
        head_size=case.head_size,
        block_size=case.block_size,
        dtype=case.dtype,
        layout=case.layout,
        scale=case.softmax_scale,
        seed=case.seed,
        name=case.id,
        labels=tuple(case.columns().items()),
        cache_strides=case.cache_strides,
    )
    if case.kv_cache_dtype != "auto":
        k, v = fp8_scales(case.kv_cache_dtype, case.kv_scale, case.num_kv_heads)
        common.update(kv_cache_dtype=case.kv_cache_dtype, k_scale=k, v_scale=v)
    if case.bias_applies:
        b = case.bias
        common.update(position_bias=b.kind, relative_attention_num_buckets=b.num_buckets,
                      relative_attention_max_distance=b.max_distance)  # fmt: skip
    if case.kind == "episode":
        steps = EPISODE_DECODE_STEPS[case.size]
        return Shape(
            "episode",
            query_lens=tuple(dec),
            encoder_seq_lens=tuple(enc),
            sliding_window=case.window_size,
            decode_steps=steps,
            **common,
        )
    if case.kind == "encoder":  # a padded encoder batch: rows past the last token (NaN)
        pad = 2 if case.batch in ("ragged", "many_short") else 0
        return Shape("encoder", encoder_seq_lens=tuple(enc), padding_tokens=pad, **common)
    q, c = split_phase(case, dec)
    pad = 2 if case.layout in ("nullblock", "fragmented") else 0  # CUDA-graph style padding
    if case.kind == "decoder":
        return Shape(
            "decoder",
            query_lens=q,
            context_lens=c,
            sliding_window=case.window_size,
            padding_tokens=pad,
            **common,
        )
    return Shape(
        "encoder_decoder",
        query_lens=q,
        context_lens=c,
        encoder_seq_lens=tuple(enc),
        padding_tokens=pad,
        **common,
    )


def build_inputs(case: Case | Shape, device: torch.device | str = "cpu") -> Step | Episode:
    """The deterministic step (or episode) of a case; caches hold NaN wherever unwritten."""
    return (lower(case) if isinstance(case, Case) else case).build(device)
