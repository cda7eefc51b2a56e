"""T5's position bias through the matrix: the smoke tier has bias rows for every kind and phase
it applies to, and its bias cases kill each bug a paged T5 kernel has (conformance/tests/
faulty.py: BiasFault), on the CPU; the T5 presets carry T5's bias."""

import json

import pytest

from conformance import runner
from conformance.cases import Case, lower
from conformance.generate import generate
from conformance.models import MODELS
from conformance.schema import result_row
from conformance.tests.cli import cli, csv_rows
from conformance.tests.faulty import BIAS_FAULTS, BiasFault

BIAS_CASES = [c for c in generate("smoke") if c.position_bias != "none"]


def test_the_smoke_tier_has_bias_rows_for_every_kind_and_phase_it_applies_to():
    kinds = {(c.kind, c.phase) for c in BIAS_CASES}
    assert {("encoder", "prefill"), ("episode", "episode")} <= kinds
    assert {("decoder", p) for p in ("prefill", "decode", "mixed", "chunked")} <= kinds
    assert {c.position_bias for c in BIAS_CASES} == {"t5", "t5small"}
    assert all(c.kind != "cross" and f"-pb{c.position_bias}-" in c.id for c in BIAS_CASES)


def test_a_correct_bias_passes_every_bias_row():
    """The planted faults' own harness is right where nothing is planted (each step compared;
    the metamorphic checks are the matrix's)."""
    right = BiasFault("none")
    for case in BIAS_CASES:
        rows = runner.run_case(case, right, metamorphic=False, rerun=False)
        assert all(r["status"] == "pass" for r in rows), [r["reason"] for r in rows]


@pytest.mark.parametrize("fault", BIAS_FAULTS)
def test_the_smoke_tier_kills_each_planted_bias_fault(fault):
    """No bias at decode, buckets in bf16: each fails at least one smoke row (reversed
    direction, positions relative to the step, the table by kv head and more are the
    catalogue's, test_mutate.py)."""
    caught = any(  # the first case that catches it is enough
        r["status"] == "fail"
        for c in BIAS_CASES
        for r in runner.run_case(c, BiasFault(fault), rerun=False)
    )
    assert caught, f"the smoke tier's bias rows did not catch {fault}"


def test_t5_presets_run_t5s_bias_and_others_none():
    for name, m in MODELS.items():
        t5 = name.startswith(("t5-", "flan-t5"))
        assert (m.position_bias == "t5") == t5, name
        case = next(
            c
            for c in [
                Case.from_id(
                    f"{name}~encoder-prefill-ragged-bs16-{m.heads}-"
                    f"d{m.head_size}-{_short(m.dtype)}-contiguous-s0"
                )
            ]
        )
        assert lower(case).position_bias == ("t5" if t5 else "none")
    cross = lower(Case.from_id("t5-small~cross-decode-ragged-bs16-h8kv8-d64-bf16-shuffled-s0"))
    assert cross.position_bias == "none"  # T5's cross-attention takes none


def _short(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]


def _bias_file(tmp_path, episode: bool = True, **config) -> str:
    lines = [
        {"name": "enc", "attn_kind": "encoder", "encoder_seq_lens": [40, 7], "num_heads": 4,
         "head_size": 16, "dtype": "float32", "position_bias": "t5", **config},
        {"name": "ep", "attn_kind": "episode", "encoder_seq_lens": [30, 9], "query_lens": [5, 2],
         "num_heads": 4, "num_kv_heads": 2, "head_size": 16, "dtype": "float32",
         "decode_steps": 1, "position_bias": "t5", **config},
    ]  # fmt: skip
    path = tmp_path / "bias.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[: 2 if episode else 1]))
    return str(path)


@pytest.mark.parametrize("config", [dict(relative_attention_num_buckets=31),
                                    dict(relative_attention_num_buckets=32,
                                         relative_attention_max_distance=16)],
                         ids=["odd-table", "32-up-to-16"])  # fmt: skip
def test_configurations_hugging_face_computes_run(tmp_path, config):
    """An odd bidirectional table (an encoder and an episode), and an encoder of 32 buckets up
    to 16 (16 a direction, 8 exact; a decoder of it has no far bucket, refused): both run and
    pass on our kernel and the torch path."""
    out = tmp_path / "out"
    episode = config.get("relative_attention_max_distance", 128) > 16
    r = cli("run", "--cases", _bias_file(tmp_path, episode, **config), "--backend", "triton",
            "--backend", "torch", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    rows = csv_rows(out)
    assert rows and {row["status"] for row in rows} == {"pass"}
    label = f"t5-{config['relative_attention_num_buckets']}-"
    assert any(row["position_bias"].startswith(label) for row in rows)


def test_a_configuration_hugging_face_cannot_compute_is_refused_when_the_file_is_read(tmp_path):
    """`list --cases` and `run --cases`: exit 2, one line naming the file, the line and the
    field, before anything runs."""
    path = _bias_file(tmp_path, relative_attention_num_buckets=3)
    for argv in (("list", "--cases", path), ("run", "--cases", path, "--out", tmp_path / "o")):
        r = cli(*argv)
        assert r.returncode == 2, (argv, r.stdout[-500:])
        line = r.stderr.strip()
        assert f"--cases {path} line 1: relative_attention_num_buckets: 3" in line, line
    assert not (tmp_path / "o").exists()


def test_every_presets_labels_agree_with_its_rows():
    """`list --format csv` and a dump's case.json label each case's position bias as its
    result rows do (a T5 preset's own bias, though its axis value is none)."""
    import csv as csvlib
    import io

    r = cli("list", "--model", "all", "--format", "csv")
    assert r.returncode == 0
    listed = {row["case_id"]: row for row in csvlib.DictReader(io.StringIO(r.stdout))}
    from conformance.generate import generate_for_models

    cases = generate_for_models("smoke", "all")
    assert set(listed) == {c.id for c in cases}
    for c in cases:
        row = result_row(lower(c), "x", "0:" + lower(c).step_kinds()[0], "pass")
        assert listed[c.id]["position_bias"] == row["position_bias"], c.id
    assert any(v["position_bias"] == "t5" for v in listed.values())


def test_a_dumped_bias_case_recomputes_from_its_own_files(tmp_path):
    """Every step of a T5 episode, recomputed in NumPy from case.npz and case.json alone (the
    bias table, its buckets by HF's function written again, the direction, the positions),
    equals the reference output the dump holds: nothing of the project's reference used."""
    import numpy as np

    from reference.tests.hf import hf_bucket

    case_id = "t5-small~episode-episode-ragged-bs16-h8kv8-d64-bf16-interleaved-s0"
    assert cli("dump", case_id, "--model", "t5-small", "--out", tmp_path).returncode == 0
    meta = json.loads((tmp_path / "case.json").read_text())
    assert meta["position_bias"] == "t5"
    z = np.load(tmp_path / "case.npz")
    checked = 0
    for i, step in enumerate(meta["steps"]):
        p = f"step{i}_"
        got = _numpy_step(z, p, step, hf_bucket)
        want = z[p + "reference_output"]
        assert np.abs(got - want).max() < 1e-9, (i, np.abs(got - want).max())
        checked += step["position_bias"] == "t5"
    assert checked == 1 + 4  # the encoder and every decoder self step


def _numpy_step(z, p, step, bucket):
    """One dumped step's output in float64 NumPy from its arrays."""
    import numpy as np

    q = z[p + "query"].astype(np.float64)
    kind = step["attn_kind"]
    out = np.zeros_like(q)
    if kind == "encoder":
        lens = z[p + "encoder_seq_lens"]
        q_lens, kv_lens, first = lens, lens, np.zeros_like(lens)
    else:
        q_lens, ctx = z[p + "query_lens"], z[p + "context_lens"]
        kv_lens = ctx + q_lens if kind == "decoder" else z[p + "encoder_seq_lens"]
        first = ctx if kind == "decoder" else np.zeros_like(ctx)
    table = z[p + ("block_tables" if kind == "decoder" else "cross_block_tables")] if \
        kind != "encoder" else None  # fmt: skip
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    for s in range(len(q_lens)):
        rows = slice(starts[s], starts[s] + q_lens[s])
        if kind == "encoder":
            k, v = z[p + "key"][rows], z[p + "value"][rows]
        else:
            caches = z[p + "key_cache_after"], z[p + "value_cache_after"]
            bs = caches[0].shape[1]
            pos = np.arange(kv_lens[s])
            k, v = (c[table[s][pos // bs], pos % bs].astype(np.float64) for c in caches)
        qs, k, v = q[rows], k.astype(np.float64), v.astype(np.float64)
        group = qs.shape[1] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", qs, k) * step["scale"]
        qpos = first[s] + np.arange(q_lens[s])
        kpos = np.arange(kv_lens[s])
        if step["position_bias"] == "t5":
            rel = kpos[None, :] - qpos[:, None]
            b = bucket(rel, step["bidirectional"], step["relative_attention_num_buckets"],
                       step["relative_attention_max_distance"])  # fmt: skip
            scores = scores + z[p + "relative_attention_bias"][b].transpose(2, 0, 1)
        if kind == "decoder":
            scores = np.where(kpos[None, None, :] <= qpos[None, :, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out[rows] = np.einsum("hqk,khd->qhd", scores / scores.sum(-1, keepdims=True), v)
    return out
