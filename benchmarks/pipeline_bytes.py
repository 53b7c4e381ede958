"""Bytes that cross pipeline-stage boundaries with and without cross-stage caching.

    python benchmarks/pipeline_bytes.py        # -> benchmarks/results/pipeline_bytes.json

For P ranks and V virtual stages per rank (C = P * V chunks, stage k on rank k % P), a converted
examples GPT with one layer per chunk and one block per layer (num_blocks = layers), so each
chunk produces one block as the paper's formulas assume. The stages are the real
`attnres_compile.parallel.pipeline` modules; `run_locally` runs them in one process and each stage counts
what its forward returns (tests/test_distributed.py checks the same counts under
torch.distributed.pipelining on 2 gloo ranks). Counts are in blocks of N_p x d (a micro-batch's
tokens x width); the embedding b_0 is a block too, which the paper's formulas leave out, so
both are given:

    naive                 C(C-1)/2
    cached (paper)        P(P-1)/2 + (V-1) P^2         a rank keeps the blocks it received
    cached (held)         P(P-1)/2 + (V-1) P (P-1)     it also keeps the blocks it produced
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnres_compile as ac  # noqa: E402
from attnres_compile.parallel.pipeline import pipeline_stages, run_locally  # noqa: E402
from examples.gpt import GPT, GPTConfig, GPTEmbed, GPTHead, loss_fn  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "pipeline_bytes.json"
CONFIGS = [(2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (4, 4), (8, 2)]
POLICIES = ("none", "received", "held")


def formula(policy: str, P: int, V: int) -> int:
    C = P * V
    if policy == "none":
        return C * (C - 1) // 2
    if policy == "received":
        return P * (P - 1) // 2 + (V - 1) * P * P
    return P * (P - 1) // 2 + (V - 1) * P * (P - 1)


def b0_boundaries(policy: str, P: int, V: int) -> int:
    """Boundaries that carry the embedding b_0 (produced by stage 0 on rank 0)."""
    C = P * V
    if policy == "none":
        return C - 1
    if policy == "received":
        return (P - 1) + min(1, V - 1)   # the first round, and once into rank 0 (which then received it)
    return P - 1


def measure(P: int, V: int, batch: int = 2, seq: int = 16, d: int = 32) -> dict:
    C = P * V
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=seq, n_layer=C, n_head=2, n_embd=d, dropout=0.0))
    ids = torch.randint(0, 64, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    conv = ac.convert(gpt, (ids[:, :-1],), num_blocks=C)
    block_bytes = batch * seq * d * 4
    row = {"P": P, "V": V, "C": C, "N_p": batch * seq, "d": d, "block_bytes": block_bytes, "policies": {}}
    for policy in POLICIES:
        stages = pipeline_stages(conv, conv.transformer.h, list(range(C + 1)), embed=GPTEmbed(conv),
                                 head=GPTHead(conv), ranks=P, cache=policy)
        run_locally(stages, ids[:, :-1], loss_fn=loss_fn, target=ids[:, 1:])
        blocks = [st.blocks_sent[-1] for st in stages[:-1]]
        sent = [st.bytes_sent[-1] for st in stages[:-1]]
        total = sum(blocks)
        row["policies"][policy] = {
            "blocks_per_boundary": blocks, "bytes_per_boundary": sent, "blocks": total, "bytes": sum(sent),
            "blocks_without_b0": total - b0_boundaries(policy, P, V), "formula": formula(policy, P, V),
            "formula_bytes": formula(policy, P, V) * block_bytes,
            "matches": total - b0_boundaries(policy, P, V) == formula(policy, P, V),
        }
    naive = row["policies"]["none"]["bytes"]
    for policy in POLICIES:
        row["policies"][policy]["bytes_over_naive"] = row["policies"][policy]["bytes"] / naive if naive else None
    return row


def main() -> None:
    rows = [measure(P, V) for P, V in CONFIGS]
    for r in rows:
        cells = "  ".join(f"{p}: {r['policies'][p]['blocks']:3d} blocks ({r['policies'][p]['blocks_without_b0']} + b0; "
                          f"formula {r['policies'][p]['formula']}{'' if r['policies'][p]['matches'] else ' MISMATCH'})"
                          for p in POLICIES)
        print(f"P={r['P']} V={r['V']}  {cells}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"env": {"torch": torch.__version__, "python": platform.python_version()},
                               "note": __doc__.strip().splitlines()[0], "configs": rows}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
