"""`python -m bench registers` compiles our decode kernel for sm_90 on any machine (Triton's own
ptxas) and reads back what the occupancy model needs. Run as a user runs it: its own process,
without the interpreter these tests switch on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from optimized.ops.plan import decode_kv_buffers

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(
    not (TOOLS / "cuobjdump").exists(),
    reason="this Triton wheel ships no ptxas/cuobjdump: `bench registers` cannot compile here",
)
def test_every_decode_launch_compiles_for_sm90_without_spills_and_fits_an_sm():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "bench", "registers", "--fp8", "--sass"],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [dict(f.split("=") for f in line.split()) for line in r.stdout.splitlines()]
    assert {row["kv"] for row in rows} == {"bf16", "fp8e4nv"}
    for row in rows:
        assert 0 < int(row["registers"]) <= 255 and row["stack"] == "0", row  # no spills
        assert int(row["resident"]) >= 1 and int(row["in_flight_kb"]) > 0, row
        assert int(row["HMMA"]) > 0, row  # the tile products are on the tensor cores
        # The planner's count of K/V buffers is what Triton compiles (five stages: two).
        assert int(row["buffers"]) == decode_kv_buffers(int(row["stages"])), row
    assert {row["stages"] for row in rows} == {"2", "5"}  # both kinds were compiled
