"""Every bad-input rule of `reference.validation` gives the same ValueError in every backend,
before anything is written (cache bits checked before and after); valid but unusual layouts
(strided caches and queries) are computed correctly or declined with a reason."""

import pytest
import torch

from conformance import runner
from conformance.compare import bitwise_equal, compare_caches, compare_output
from conformance.workloads import build_step
from optimized.backend import backend_names, get_backend
from reference import attention
from reference.tests.test_bad_inputs import CASES, bad_args

BACKENDS = backend_names()  # the reference included


def _backend(name):
    backend = get_backend(name)
    why = backend.unavailable_reason()
    if why:
        pytest.skip(why)
    return backend


def _decoder(device):
    step = build_step("decoder", (3, 1), (0, 5), block_size=4, num_heads=4, num_kv_heads=2)
    return step.to(device, copy=True)


@pytest.mark.parametrize("name,changes,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_every_backend_rejects_bad_input_before_writing(backend_name, name, changes, message):
    backend = _backend(backend_name)
    device = backend.device()
    step = _decoder(device)
    before = tuple(c.clone() for c in step.kv_cache)
    args = bad_args(step, **{k: _to(v, device) for k, v in changes(step).items()})
    with pytest.raises(ValueError, match=message):
        backend.forward(**args)
    for c, b in zip(step.kv_cache, before):
        assert bitwise_equal(c, b).all(), "the cache was written before the input was rejected"


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v


def _head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache stored head-major ([blocks, heads, block_size, d]), viewed in the
    standard [num_blocks, block_size, num_kv_heads, head_size] order: a strided view."""
    storage = cache.permute(0, 2, 1, 3).contiguous()
    view = storage.permute(0, 2, 1, 3)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_strided_caches_and_query(backend_name, kind):
    """A head-major cache view and a query whose last dim is strided are valid inputs: a backend
    computes them like the contiguous ones, or says it does not support them (never a crash,
    never a half-written cache)."""
    backend = _backend(backend_name)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    step = build_step(
        kind,
        (1, 1),
        (0, 9),
        (7, 12),
        block_size=4,
        num_heads=4,
        num_kv_heads=2,
        dtype=dtype,
        seed=3,
    )
    if backend.capabilities.finite_unowned_slots:  # as the runner gives it (flex)
        runner.poison_finite(step)
    ref_step = step.with_fresh_cache()
    ref = attention(*ref_step.args())
    mine = step.to(backend.device(), copy=True)
    padded = torch.zeros(
        *mine.query.shape[:2], 2 * mine.query.shape[2], dtype=dtype, device=mine.query.device
    )
    padded[..., ::2] = mine.query
    query = padded[..., ::2]  # the same values, last-dim stride 2
    caches = tuple(_head_major(c) for c in mine.kv_cache)
    args = (query, mine.key, mine.value, caches, mine.metadata, mine.attn_kind)
    reasons = backend.not_supported_reasons(*args)
    if reasons:
        with pytest.raises(ValueError):  # declining is fine; writing and then failing is not
            backend.forward(*args)
        assert compare_caches(caches, step.kv_cache) == ""
        pytest.skip("; ".join(reasons))
    out = backend.forward(*args)
    comp = compare_output(step, out, ref, backend=backend)
    assert comp.ok, comp.reason
    assert compare_caches(tuple(c.contiguous() for c in caches), ref_step.kv_cache) == ""


def test_the_reference_backend_takes_float64():
    backend = get_backend("reference")
    step = build_step("decoder", (3, 1), (0, 5), block_size=4, dtype=torch.float64)
    assert backend.not_supported_reasons(*step.args()) == []
    out = backend.forward(*step.with_fresh_cache().args())
    ref = attention(*step.with_fresh_cache().args())
    assert out.dtype == torch.float64 and torch.equal(out, ref)
