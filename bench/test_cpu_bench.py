"""CPU cost of the reference and the torch backend on small cases (pytest-benchmark), so the
cost of the reference and of the matrix is tracked. Under xdist these run once, as tests."""

import pytest

from conformance.workloads import build_step
from optimized.torch_backend import TorchBackend
from reference.attention import attention

SHAPES = {
    "decode-self": dict(kind="decoder", q=(1,) * 8, c=(127,) * 8, e=None),
    "prefill-self": dict(kind="decoder", q=(64,) * 4, c=(0,) * 4, e=None),
    "decode-cross": dict(kind="encoder_decoder", q=(1,) * 8, c=(5,) * 8, e=(150,) * 8),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_cost(benchmark, backend, shape):
    s = SHAPES[shape]
    step = build_step(
        s["kind"],
        s["q"],
        s["c"],
        s["e"],
        block_size=16,
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        seed=0,
    )
    fn = attention if backend == "reference" else TorchBackend().forward
    kv_lens = step.metadata.kv_lens_for(step.attn_kind)
    flops = 4 * sum(q * k for q, k in zip(step.metadata.query_lens, kv_lens)) * 8 * 64
    benchmark.extra_info.update(
        workload=f"cpu:{shape}",
        backend=backend,
        batch=len(s["q"]),
        context_len=max(kv_lens),
        query_len=max(s["q"]),
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype="float32",
        flops=flops,
    )
    out = benchmark(lambda: fn(*step.with_fresh_cache().args()))
    assert out.shape == step.query.shape
