"""Strided caches in the matrix (`cache_strides`): the pools engines keep (FlashInfer's K and V
interleaved in one tensor, head-major blocks) handed over as strided views; the smoke tier
holds both, our backends pass them, a backend that declares dense caches only skips them with
its reason, and one that assumes dense caches fails."""

import csv
import io

import torch

from conformance import runner
from conformance.cases import lower
from conformance.generate import generate
from conformance.tests.cli import cli
from conformance.tests.faulty import AssumesDenseCaches
from conformance.workloads import copy_caches, with_strides
from optimized.backend import BaseBackend, CacheLayout, Capabilities
from optimized.torch_backend import TorchBackend

STRIDED = [c for c in generate("smoke") if c.cache_strides != "contiguous"]


def test_the_smoke_list_has_a_cache_strides_column_with_both_strided_values():
    r = cli("list", "--tier", "smoke", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["cache_strides"] for row in rows} == {"contiguous", "kv_interleaved", "head_major"}
    kinds = {(row["kind"], row["cache_strides"]) for row in rows}
    assert {(k, s) for k in ("decoder", "cross", "episode")
            for s in ("kv_interleaved", "head_major")} <= kinds  # fmt: skip
    assert all(row["kind"] != "encoder" for row in rows if row["cache_strides"] != "contiguous")


def test_the_layouts_are_views_of_the_pools_they_name_and_copies_keep_them():
    k = torch.randn(5, 4, 2, 8)
    v = torch.randn(5, 4, 2, 8)
    ki, vi = with_strides((k, v), "kv_interleaved")
    assert ki._base is vi._base and ki._base.shape == (5, 2, 4, 2, 8)
    kh, vh = with_strides((k, v), "head_major")
    assert kh.stride() == (64, 8, 32, 1) and not kh.is_contiguous()
    for pair in ((ki, vi), (kh, vh)):
        assert torch.equal(pair[0], k) and torch.equal(pair[1], v)
        copied = copy_caches(pair)
        assert [c.stride() for c in copied] == [c.stride() for c in pair]
        assert all(torch.equal(a, b) for a, b in zip(copied, pair))
    a, b = copy_caches((ki, vi))
    assert a._base is b._base  # one pool, copied once


def test_a_strided_case_is_built_strided_and_its_backends_get_it_so():
    case = next(c for c in STRIDED if c.cache_strides == "kv_interleaved" and c.kind != "episode")
    shape = lower(case)
    step = shape.build()
    k, v = step.kv_cache
    assert k._base is v._base and not k.is_contiguous()
    seen = []

    class Looks(TorchBackend):
        name = "looks"

        def attend(self, query, key, value, kv_cache, md, kind):
            seen.append([c.stride() for c in kv_cache])
            return super().attend(query, key, value, kv_cache, md, kind)

    rows = runner.run_case(shape, Looks())
    assert all(r["status"] == "pass" for r in rows)
    assert seen and all(s == [k.stride(), v.stride()] for s in seen)
    assert {r["cache_strides"] for r in rows} == {"kv_interleaved"}


def test_a_backend_that_declares_dense_caches_only_skips_strided_cases_with_its_reason():
    class Dense(TorchBackend):
        name = "dense-only"
        capabilities = Capabilities(cache_layout=CacheLayout.CONTIGUOUS,
                                    kv_cache_dtypes=("auto", "fp8_e4m3", "fp8_e5m2"),
                                    position_biases=("none", "t5"))  # fmt: skip

    assert issubclass(Dense, BaseBackend)
    strided = [
        c
        for c in STRIDED
        if not lower(c).build().kv_cache[0].is_contiguous() and c.kind != "episode"
    ]  # fmt: skip (a page of one token is dense head-major)
    assert len(strided) >= 6
    for case in strided[:6]:
        rows = runner.run_case(case, Dense())
        assert all(r["status"] == "skip" and "needs a contiguous cache" in r["reason"]
                   for r in rows), rows  # fmt: skip


def test_a_backend_that_assumes_dense_caches_fails_the_strided_smoke_cases():
    """The first smoke case of each strided layout fails it (the cheapest of each, cut at the
    first failing step); a contiguous case passes it."""
    for layout in ("kv_interleaved", "head_major"):
        cases = sorted((lower(c) for c in STRIDED if c.cache_strides == layout),
                       key=lambda s: s.footprint())  # fmt: skip
        failed = next((s.id for s in cases if any(
            r["status"] == "fail" for r in runner.run_case(s, AssumesDenseCaches(),
                                                            metamorphic=False, rerun=False))),
            None)  # fmt: skip
        assert failed, f"no {layout} smoke case catches a backend that assumes dense caches"
    contiguous = next(c for c in generate("smoke") if c.kind == "decoder")
    assert all(r["status"] == "pass" for r in runner.run_case(contiguous, AssumesDenseCaches()))
