"""Our fp8 kernel code, run by the interpreter on the CPU (and compiled on a GPU): the cache
write quantizes bit for bit like the spec (torch's conversion after the clamp) on every tie and
subnormal, every finite fp8 value is read back exactly through the attention kernel, and fp8
decode agrees with the reference in every launch variant (splits, merges, heads per program,
per-tensor and per-head scales)."""

import pytest
import torch

from conformance.compare import compare_output
from conformance.workloads import KVFormat, build_step
from optimized.ops.paged_attention import paged_attention
from optimized.ops.plan import Launch, make_schedule
from optimized.ops.reshape_and_cache import reshape_and_cache
from reference import attention
from reference.fp8 import FP8_MAX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


def _values(dt: torch.dtype) -> torch.Tensor:
    """Every finite fp8 value, the midpoint of each neighbouring pair (a tie) and the float32
    values either side of it, values past the range, normals, and subnormal-sized ones."""
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(dt).float()
    grid = grid[torch.isfinite(grid)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    mx = FP8_MAX[dt]
    return torch.cat([
        grid, mids, mids.nextafter(up), mids.nextafter(down),
        (torch.rand(1000, generator=g) * 2 - 1) * mx * 1.3,
        torch.randn(1000, generator=g), torch.randn(500, generator=g) * 1e-3,
        torch.randn(500, generator=g) * 1e-6, torch.tensor([0.0, -0.0, mx, -mx, 1e30, -1e30]),
    ])  # fmt: skip


@pytest.mark.parametrize("dt", FORMATS, ids=["e4m3", "e5m2"])
def test_the_cache_write_quantizes_bit_for_bit_like_the_spec(dt):
    x = _values(dt)
    n = x.numel()
    scale = torch.tensor([0.37], device=DEVICE)
    key = (x * 0.37).reshape(n, 1, 1).to(DEVICE)  # divided by the scale: x again, near enough
    kc = torch.empty(n, 1, 1, 1, dtype=dt, device=DEVICE)
    vc = torch.empty_like(kc)
    reshape_and_cache(key, key, kc, vc, torch.arange(n, device=DEVICE), scale, scale)
    want = (key.float().cpu() / 0.37).clamp(-FP8_MAX[dt], FP8_MAX[dt]).to(dt)
    got, want = kc.cpu().view(torch.uint8).flatten(), want.view(torch.uint8).flatten()
    bad = (got != want).nonzero().flatten()
    assert len(bad) == 0, (len(bad), key.flatten()[bad[:5]].tolist())


@pytest.mark.parametrize("dt", FORMATS, ids=["e4m3", "e5m2"])
def test_every_finite_fp8_value_is_read_exactly(dt):
    """One cross-attention decode token over one encoder token whose value row holds every
    finite fp8 value: the output row is that row times v_scale, exactly (fp32 query, IEEE
    products, a power-of-two scale)."""
    grid = torch.arange(256, dtype=torch.uint8).view(dt)
    finite = grid[torch.isfinite(grid.float())]
    d = 256
    row = torch.cat([finite, finite[: d - finite.numel()]])
    value_cache = row.reshape(1, 1, 1, d).to(DEVICE)
    key_cache = torch.zeros_like(value_cache)
    query = torch.randn(1, 1, d, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    schedule = make_schedule((1,), (1,), (0,), 1, DEVICE)
    ones, half = torch.ones(1, device=DEVICE), torch.tensor([0.5], device=DEVICE)
    out = paged_attention(query, key_cache, value_cache, tables, schedule, causal=False,
                          scale=0.1, k_scale=ones, v_scale=half)  # fmt: skip
    assert torch.equal(out[0, 0].cpu(), row.float() * 0.5)


@pytest.mark.parametrize(
    "splits,fused,heads",
    [(1, None, 1), (3, True, 1), (3, False, 1), (1, None, 2), (5, True, 2)],
    ids=["1", "3-fused", "3-reduce", "1-h2", "5-h2"],
)
@pytest.mark.parametrize("scheme", ["tensor", "head"])
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_decode_variants_match_reference(kv, scheme, splits, fused, heads):
    heads_n, kv_heads = (4, 4) if heads > 1 else (8, 2)
    k = (0.006,) if scheme == "tensor" else tuple(0.3 + 0.2 * h for h in range(kv_heads))
    v = (0.37,) if scheme == "tensor" else tuple(1.5 / (1 + h) for h in range(kv_heads))
    fmt = KVFormat(kv, k if kv == "fp8_e4m3" else tuple(x / 100 for x in k), v)
    step = build_step("decoder", (1, 1, 1), (40, 7, 65), block_size=8, num_heads=heads_n,
                      num_kv_heads=kv_heads, head_size=64, dtype=torch.bfloat16,
                      layout="shuffled", seed=11, kv_format=fmt)  # fmt: skip
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())
    md = step.metadata
    key_cache, value_cache = (c.to(DEVICE) for c in ref_step.kv_cache)
    schedule = make_schedule(md.query_lens, md.kv_lens_for("decoder"), md.context_lens,
                             heads_n // kv_heads, DEVICE)  # fmt: skip
    out = paged_attention(step.query.to(DEVICE), key_cache, value_cache,
                          md.block_tables.to(DEVICE), schedule, causal=True,
                          scale=md.scale_for(64), k_scale=md.k_scale.to(DEVICE),
                          v_scale=md.v_scale.to(DEVICE), num_splits=splits, fused_reduce=fused,
                          heads=heads, launch=Launch(16, 4, 1))  # fmt: skip
    comp = compare_output(step, out.cpu(), ref)
    assert comp.ok, comp.reason
