"""Collective bytes a converted model adds per training step under TP, SP and FSDP2 x TP.

    python benchmarks/parallel_bytes.py        # -> benchmarks/results/parallel_bytes.json

Runs tests/distributed/parallel_worker.py under torchrun (gloo, 2 ranks for tp / sp, 4 for
fsdp_tp on a (2, 2) mesh) on the examples GPT (4 layers, d 32, TP on the MLP) and a Hugging
Face Llama (3 layers, d 64; SP inside FSDP2), converted and unconverted, one forward and
backward each, and reads what torch's CommDebugMode saw: collectives per phase and the bytes of
the whole tensor each works on (an all-gather's output, a reduce-scatter's input, an
all-reduce's tensor; a ring moves (n-1)/n of that per rank for the first two and 2(n-1)/n for
an all-reduce). The formula, with B = S x 2D x 4 bytes (S parameterised sites, float32):

    tp        forward 0   backward 0
    sp        forward 0   backward B    (one all-reduce per site over the tp group)
    fsdp_tp   forward B   backward B    (in the root group's all-gather / reduce-scatter), + B under SP
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "parallel_worker.py"
OUT = ROOT / "benchmarks" / "results" / "parallel_bytes.json"
RUNS = [(2, "tp,sp", "gpt"), (2, "tp,sp", "llama"), (4, "fsdp_tp", "gpt"), (4, "fsdp_tp", "llama")]


def formula(scenario: str, kind: str, b: int) -> dict:
    sp_inside = scenario == "sp" or (scenario == "fsdp_tp" and kind != "gpt")   # the worker's fsdp_tp: SP for HF
    fsdp = scenario == "fsdp_tp"
    return {"forward": b if fsdp else 0, "backward": (b if fsdp else 0) + (b if sp_inside else 0)}


def main() -> int:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        for ranks, scenarios, kind in RUNS:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   str(WORKER), f"{scenarios}:{kind}", d]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            for scenario in scenarios.split(","):
                r = json.loads((Path(d) / f"{scenario}_{kind}.rank0.json").read_text())
                conv, ctrl = r["converted"], r["control"]
                b = conv["attnres_sites"] * 2 * conv["dim"] * 4
                extra = {ph: conv["collectives"]["bytes"][ph] - ctrl["collectives"]["bytes"][ph]
                         for ph in ("forward", "backward")}
                counts = {ph: {k: v - ctrl["collectives"]["counts"][ph].get(k, 0)
                               for k, v in conv["collectives"]["counts"][ph].items()
                               if v != ctrl["collectives"]["counts"][ph].get(k, 0)} for ph in ("forward", "backward")}
                row = {"mode": scenario, "model": kind, "ranks": ranks, "sites": conv["attnres_sites"],
                       "dim": conv["dim"], "B": b, "extra_bytes": extra, "formula_bytes": formula(scenario, kind, b),
                       "extra_collectives": counts, "control_bytes": ctrl["collectives"]["bytes"]}
                row["matches"] = row["extra_bytes"] == row["formula_bytes"]
                rows.append(row)
                print(f"{scenario:8s} {kind:6s} {ranks} ranks  S={row['sites']} D={row['dim']} B={b:6d}  "
                      f"extra fwd {extra['forward']:6d} bwd {extra['backward']:6d}  formula {row['formula_bytes']}  "
                      f"extra collectives {counts}  control fwd {ctrl['collectives']['bytes']['forward']} "
                      f"bwd {ctrl['collectives']['bytes']['backward']}")
    OUT.write_text(json.dumps({"python": platform.python_version(), "backend": "gloo", "rows": rows}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0 if all(r["matches"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
