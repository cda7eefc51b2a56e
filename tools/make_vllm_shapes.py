"""Writes conformance/explicit/vllm_encdec.jsonl: the configurations of vLLM's encoder/decoder
attention kernel test (tests/kernels/attention/test_encoder_decoder_attn.py) as explicit shapes.

That test sweeps num_heads {1, 16} x head_size {64, 256} x batch {1, 16}, block size 16, and draws
decoder and encoder lengths at random up to 128; it runs encoder attention, then decoder self-
and cross-attention prefill, then one decode step of each. Here each configuration becomes
  - an episode (encoder -> decoder prefill -> cross prefill -> decode steps), and
  - a decoder self-attention decode step and a cross-attention decode step on cached context,
    alone (single steps also get the block-permutation and re-run checks),
with lengths drawn once from a fixed seed and written into the file, so the ids are stable.
dtype: float16. Re-run this script only to regenerate the file (its output is deterministic).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "conformance" / "explicit" / "vllm_encdec.jsonl"
MAX_LEN = 128


def main() -> None:
    rng = random.Random(20240611)
    lines = []
    for heads in (1, 16):
        for head_size in (64, 256):
            for batch in (1, 16):
                tag = f"vllm-h{heads}-d{head_size}-b{batch}"
                draw = lambda n=batch: [rng.randint(1, MAX_LEN) for _ in range(n)]
                common = dict(num_heads=heads, head_size=head_size, block_size=16, dtype="float16")
                enc, dec = draw(), draw()
                lines.append(
                    dict(
                        name=f"{tag}-episode",
                        attn_kind="episode",
                        query_lens=dec,
                        encoder_seq_lens=enc,
                        decode_steps=1,
                        **common,
                    )
                )
                ctx = draw()
                lines.append(
                    dict(
                        name=f"{tag}-dec-decode",
                        attn_kind="decoder",
                        query_lens=[1] * batch,
                        context_lens=ctx,
                        layout="shuffled",
                        **common,
                    )
                )
                lines.append(
                    dict(
                        name=f"{tag}-cross-decode",
                        attn_kind="encoder_decoder",
                        query_lens=[1] * batch,
                        context_lens=ctx,
                        encoder_seq_lens=draw(),
                        layout="shuffled",
                        **common,
                    )
                )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"wrote {len(lines)} shapes to {OUT}")


if __name__ == "__main__":
    main()
