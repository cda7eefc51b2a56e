"""`shrink`: planted faults with known smallest triggers shrink to shapes no larger than the
trigger needs, on the CPU in seconds; the shrunk case still fails for the original reason; a
passing case has nothing to shrink; the command writes the shape and the commands."""

import json

from conformance.cases import Case, lower
from conformance.shrink import shrink, signature
from conformance.tests import faulty
from conformance.tests.cli import FAULTY, cli


def _shrink(case_id: str, backend):
    s = shrink(lower(Case.from_id(case_id)), backend, budget_s=120)
    assert s.failure is not None and s.still == s.failure, (s.failure, s.still)
    return s


def test_one_past_a_block_boundary_shrinks_to_one_sequence_of_block_size_plus_one():
    s = _shrink("decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0",
                faulty.WrongPastABlockBoundary())  # fmt: skip
    shape = s.shape
    assert len(shape.query_lens) == 1 and shape.num_heads == shape.num_kv_heads == 1
    assert shape.context_lens[0] + shape.query_lens[0] == shape.block_size + 1
    assert shape.head_size <= 16 and shape.layout == "contiguous"
    assert s.failure == ("fail", "decoder", "output") and s.kept >= 3


def test_kv_head_one_shrinks_to_two_kv_heads_of_one_query_head():
    s = _shrink("decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0", faulty.WrongForKvHeadOne())
    assert (s.shape.num_heads, s.shape.num_kv_heads) == (2, 2)
    assert len(s.shape.query_lens) == 1 and s.shape.query_lens[0] + s.shape.context_lens[0] <= 2


def test_the_second_decode_step_shrinks_to_an_episode_of_two_decode_steps():
    s = _shrink("episode-episode-enclonger-bs16-h8kv2-d64-fp16-interleaved-s0",
                faulty.WrongOnTheSecondDecodeStep())  # fmt: skip
    shape = s.shape
    assert shape.attn_kind == "episode" and shape.decode_steps == 2
    assert (
        len(shape.query_lens) == 1 and shape.query_lens == (1,) and shape.encoder_seq_lens == (1,)
    )
    assert s.failure[:2] == ("fail", "decoder")


def test_a_failure_keeps_its_kind_an_error_its_exception_type():
    rows = [dict(step="0:decoder", status="pass", reason=""),
            dict(step="1:encoder_decoder", status="fail", reason="numerical mismatch: x"),
            dict(step="permuted", status="error", reason="runtime error: KeyError: 3")]  # fmt: skip
    assert signature(rows) == ("fail", "encoder_decoder", "output")
    assert signature(rows[2:]) == ("error", "permuted", "KeyError")
    assert signature([dict(step="0:decoder", status="fail", reason="cache corruption: k")]) == (
        "fail", "decoder", "cache")  # fmt: skip
    assert signature(rows[:1]) is None


def test_the_command_writes_the_shape_and_its_commands(tmp_path):
    case = "decoder-decode-ragged-bs16-h8kv2-d64-fp32-shuffled-s0"
    r = cli("shrink", case, "--backend-module", f"{FAULTY}:WrongForKvHeadOne", "--out", tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    line = json.loads((tmp_path / "shrunk.jsonl").read_text())
    assert line["num_heads"] == line["num_kv_heads"] == 2
    assert "still fails for the original reason" in r.stdout
    assert f"run --cases {tmp_path / 'shrunk.jsonl'}" in r.stdout and "dump shape~" in r.stdout
    r = cli("shrink", case, "--backend", "torch", "--out", tmp_path / "ok")
    assert r.returncode == 0 and "nothing to shrink" in r.stdout
    r = cli("shrink", case, "--out", tmp_path / "none")
    assert r.returncode == 2 and "give one backend" in r.stderr
