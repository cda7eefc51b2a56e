"""What the bench times: workloads of the matrix's own type (`Shape`), named by family.

A `BenchCase` is one bench.csv configuration (its key columns) and lowers to a Shape, so a row
is rebuilt from its columns (`from_row`: what `bench limits` profiles is the row's own step,
fp8 included). The grid is data (`grid`): decode across batch × context × heads × page, fp8
caches, the models' decode, cross prefill and encoder steps, chunked prefill. Families:

    self-decode     one new token a sequence over `context_len` cached ones
    cross-decode    one decoder token over `context_len` encoder tokens (the cross cache)
    cross-prefill   `query_len` decoder tokens over the encoder, the cross cache written
    encoder         `batch` encoder sequences of `context_len` tokens (no cache)
    chunked-prefill `query_len` new tokens on `context_len - query_len` cached ones

A T5 model's self-decode and encoder steps carry its position bias, as the model runs them; the
label `<model>+nobias` is the same step without it (the bias's cost). Workloads from a cases
file are their explicit shapes, named `shape:<id>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from conformance.models import MODELS, model_names
from conformance.shapes import Shape

FAMILIES = ("self-decode", "cross-decode", "cross-prefill", "encoder", "chunked-prefill")
PROMPT_TOKENS = 4  # decoder tokens of a cross-attention prefill
FP8_SCALES = dict(k_scale=(0.5,), v_scale=(0.25,))
MODEL_BATCHES = (1, 16, 64, 256)
BENCH_MODELS = ("whisper-large-v3", "bart-large", "flan-t5-xl")  # the grid's model rows
BIAS_FIELDS = ("position_bias", "relative_attention_num_buckets", "relative_attention_max_distance")
NO_BIAS = "+nobias"  # a T5 label's step without its position bias (the bias's cost)


@dataclass(frozen=True)
class BenchCase:
    """One bench configuration: `family:label` (label: `grid` or a model preset) and sizes."""

    family: str
    label: str
    batch: int
    context_len: int
    query_len: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    kv_cache_dtype: str = "auto"

    @property
    def workload(self) -> str:
        return f"{self.family}:{self.label}"

    def shape(self) -> Shape:
        b, ctx, q = self.batch, self.context_len, self.query_len
        model = MODELS.get(self.label.removesuffix(NO_BIAS))
        common = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      head_size=self.head_size, dtype=self.dtype,
                      scale=model.scale if model else None)  # fmt: skip
        if model and not self.label.endswith(NO_BIAS) and not self.family.startswith("cross"):
            common.update({k: getattr(model, k) for k in BIAS_FIELDS})  # as the model runs it
        if self.family == "encoder":
            return Shape("encoder", encoder_seq_lens=(ctx,) * b, **common)
        common.update(block_size=self.block_size, layout="shuffled")
        if self.kv_cache_dtype != "auto":
            common.update(kv_cache_dtype=self.kv_cache_dtype, **FP8_SCALES)
        if self.family == "self-decode":
            return Shape("decoder", query_lens=(1,) * b, context_lens=(ctx - 1,) * b, **common)
        if self.family == "chunked-prefill":
            return Shape("decoder", query_lens=(q,) * b, context_lens=(ctx - q,) * b, **common)
        if self.family == "cross-decode":
            return Shape("encoder_decoder", query_lens=(1,) * b, context_lens=(1,) * b,
                         encoder_seq_lens=(ctx,) * b, **common)  # fmt: skip
        if self.family == "cross-prefill":
            return Shape("encoder_decoder", query_lens=(q,) * b, encoder_seq_lens=(ctx,) * b,
                         **common)  # fmt: skip
        raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")

    @classmethod
    def from_row(cls, row: dict) -> BenchCase:
        """The configuration of a bench.csv row (ValueError for a row of an explicit shape)."""
        family, _, label = str(row["workload"]).partition(":")
        if family not in FAMILIES:
            raise ValueError(f"workload {row['workload']!r}: not a family of the grid")
        names = [f.name for f in fields(cls)][2:]
        return cls(family, label, **{n: type(getattr(_ZERO, n))(row[n]) for n in names})


_ZERO = BenchCase("", "", 0, 0, 0, 0, 0, 0, 0, "")


def _decode(label, batch, ctx, heads, kv_heads, head_size, bs, dtype, kv="auto") -> BenchCase:
    return BenchCase("self-decode", label, batch, ctx, 1, heads, kv_heads, head_size, bs, dtype, kv)


def grid(quick: bool = False) -> list[BenchCase]:
    """The benchmark grid; `quick`: three batch × context pairs of decode, not six."""
    pairs = [(16, 1024), (64, 4096), (4, 32768)] if quick else [
        (16, 1024), (64, 1024), (16, 4096), (64, 4096), (16, 16384), (4, 32768)]  # fmt: skip
    geos = [(32, 32, 128), (32, 32, 64), (32, 8, 128), (32, 4, 128)]
    out = []
    for b, ctx in pairs:
        for h, kv, d in geos:
            for bs, dtypes in ((16, ("bfloat16", "float16")), (32, ("bfloat16",)),
                               (256, ("bfloat16",))):  # fmt: skip
                out += [_decode("grid", b, ctx, h, kv, d, bs, t) for t in dtypes]
            if not quick or (b, ctx) != (4, 32768):
                fp8 = [("fp8_e4m3", 16), ("fp8_e4m3", 256)] + (
                    [("fp8_e5m2", 16)] if b == 64 else []
                )
                out += [_decode("grid", b, ctx, h, kv, d, bs, "bfloat16", f) for f, bs in fp8]
    for name in BENCH_MODELS:
        m = MODELS[name]
        geo = (m.num_heads, m.num_kv_heads, m.head_size)
        for b in (64, 256):
            for bs in (16, 32, 64, 256):
                out.append(BenchCase("cross-decode", name, b, m.encoder_len, 1, *geo, bs, m.dtype))
                out.append(BenchCase("self-decode", name, b, m.decoder_max, 1, *geo, bs, m.dtype))
            for fam, n in (("cross-decode", m.encoder_len), ("self-decode", m.decoder_max)):
                out.append(BenchCase(fam, name, b, n, 1, *geo, 16, m.dtype, "fp8_e4m3"))
            out.append(BenchCase("cross-prefill", name, b, m.encoder_len, PROMPT_TOKENS, *geo, 16,
                                 m.dtype))  # fmt: skip
        out.append(BenchCase("encoder", name, 16, m.encoder_len, m.encoder_len, *geo, 0, m.dtype))
        if m.position_bias != "none":  # the same steps without the bias
            enc = (m.encoder_len, m.encoder_len, *geo, 0, m.dtype)
            out += [_decode(name + NO_BIAS, 64, m.decoder_max, *geo, 16, m.dtype),
                    BenchCase("encoder", name + NO_BIAS, 16, *enc)]  # fmt: skip
    for ctx, chunk, kv in ((4096, 512, 8), (8192, 1024, 8), (2048, 2048, 32)):
        out.append(BenchCase("chunked-prefill", "grid", 8, ctx + chunk, chunk, 32, kv, 128, 16,
                             "bfloat16"))  # fmt: skip
    return out


def models(spec: str, batches=MODEL_BATCHES, divide: int = 1) -> list[BenchCase]:
    """Each preset's self and cross decode, cross prefill and encoder steps at its lengths ÷
    `divide` (the CPU smoke: 16), page 16, in its own dtype."""
    out = []
    for name in model_names(spec):
        m = MODELS[name]
        enc, dec = max(2, m.encoder_len // divide), max(2, m.decoder_max // divide)
        geo = (m.num_heads, m.num_kv_heads, m.head_size)
        for b in batches:
            out += [
                BenchCase("self-decode", name, b, dec, 1, *geo, 16, m.dtype),
                BenchCase("cross-decode", name, b, enc, 1, *geo, 16, m.dtype),
                BenchCase("cross-prefill", name, b, enc, PROMPT_TOKENS, *geo, 16, m.dtype),
                BenchCase("encoder", name, b, enc, enc, *geo, 0, m.dtype),
            ]
    return out


def from_cases_file(path: str) -> list[tuple[str, Shape]]:
    """(workload, shape) of a cases file's steps (an episode has no one step to time)."""
    from conformance.cases import lower, read_cases_file
    from conformance.runner import check_fits

    shapes = [c if isinstance(c, Shape) else lower(c) for c in read_cases_file(path)]
    check_fits(shapes, f"--cases {path}")
    episodes = [s.id for s in shapes if s.attn_kind == "episode"]
    if episodes:
        raise ValueError(f"--cases: an episode has no one step to time ({episodes[0]})")
    return [(f"shape:{s.id}", s) for s in shapes]


def named(cases: list[BenchCase]) -> list[tuple[str, Shape]]:
    return [(c.workload, c.shape()) for c in cases]


def as_row(case: BenchCase) -> dict:
    """The key columns of a configuration, as bench.csv holds them."""
    return {"workload": case.workload, **{k: v for k, v in asdict(case).items()
                                          if k not in ("family", "label")}}  # fmt: skip
