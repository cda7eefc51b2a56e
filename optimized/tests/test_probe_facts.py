"""The probe reads what a launch costs an SM from the table shipped for the card before it
compiles anything (optimized/ops/probes/, written by tuning/probe.py without a GPU); what the
table lacks is compiled, as before."""

import torch

from optimized.ops import paged_attention as pa
from optimized.ops.plan import Compiled, Launch


def test_a_shipped_fact_is_used_and_a_missing_one_compiled(monkeypatch):
    known, unknown = Launch(64, 4, 2), Launch(32, 2, 2)
    variant = ("a-variant",)
    names = {(*variant, (9, 0), known): "name-known", (*variant, (9, 0), unknown): "name-unknown"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(pa, "_probe_name", lambda key: names[key])
    monkeypatch.setattr(pa, "_probe_file", lambda key: pa.Path("/nonexistent") / names[key])
    monkeypatch.setattr(pa, "_shipped", lambda cc: {"name-known": [123, 38912]} if cc == (9, 0)
                        else {})  # fmt: skip
    monkeypatch.setattr(pa, "_COMPILED", {})
    todo = pa._known(variant, (known, unknown), torch.device("cpu"))
    assert [c for _, c in todo] == [unknown]  # compiled: the table does not have it
    assert pa._COMPILED[(*variant, (9, 0), known)] == Compiled(123, 38912)


def test_every_shipped_table_holds_registers_and_shared_memory():
    for path in sorted(pa.Path(pa.__file__).with_name("probes").glob("sm*.json")):
        facts = pa.json.loads(path.read_text())["facts"]
        assert facts and all(len(v) == 2 and v[0] >= 0 and v[1] > 0 for v in facts.values())
        assert all(len(name) == 32 for name in facts)
