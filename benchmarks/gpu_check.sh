#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of under 8 minutes:
#
#   bash benchmarks/gpu_check.sh        # on the GPU machine, from anywhere
#
# 1. the CUDA tests (tests/test_cuda.py, `pytest -m cuda`): the Triton kernels and a converted
#    Hugging Face LLaMA (exact at step 0, compiled training, two-phase serving, bf16 autocast);
# 2. kernel bandwidth over copy bandwidth (forward, backward, two-phase; float32 and bfloat16;
#    D 2048-7168, 9-33 sources) with fla-core's fused_attnres on the same inputs
#    (benchmarks/bench_kernels.py --devices cuda -> kernels_cuda.json);
# 3. compiled training and two-phase inference overhead of a LLaMA config (d 1024, 12 layers)
#    against the same model with plain residuals (bench_models.py --model llama -> models_cuda_llama.json).
#
# Writes benchmarks/results/gpu_check.json: the GPU's name, each step's exit code, seconds and log
# tail, and the figures of steps 2-3. Each step has its own time limit, so one slow or failing
# step still leaves the others' results. Needs torch with CUDA and the package's dependencies
# installed (no network: it builds the native code with --no-build-isolation --no-deps if absent).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results
LOG=$(mktemp -d)
mkdir -p "$RES"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing measured" >&2
    exit 2
fi
if ! $PY -c "import attnres_compile._C" 2>/dev/null; then
    $PY -m pip install -q --no-build-isolation --no-deps -e . >"$LOG/install.log" 2>&1 || echo "gpu_check: native build failed (see log)"
fi

: >"$LOG/steps"
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >>"$LOG/steps"
    echo "gpu_check: $name exit $rc after $(( $(date +%s) - t0 )) s"
}

step cuda_tests 140 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
step kernels 150 $PY benchmarks/bench_kernels.py --devices cuda --reps 5 --out-dir "$RES"
step model_llama 150 $PY benchmarks/bench_models.py --device cuda --model llama --layers 12 --d 1024 \
    --heads 16 --batch 8 --seq 512 --iters 10 --warmup 3 --out "$RES/models_cuda_llama.json"

$PY - "$LOG" "$RES" <<'PY'
import json, pathlib, sys, time
import torch
log, res = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
steps = {}
for line in (log / "steps").read_text().split("\n"):
    if line.strip():
        name, rc, secs = line.split()
        tail = (log / f"{name}.log").read_text(errors="replace")[-3000:]
        steps[name] = {"exit_code": int(rc), "seconds": int(secs), "log_tail": tail}
def load(name):
    p = res / name
    return json.loads(p.read_text()) if p.exists() else None
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "time": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
       "kernels": load("kernels_cuda.json"), "model_llama": load("models_cuda_llama.json")}
(res / "gpu_check.json").write_text(json.dumps(out, indent=2))
print(f"gpu_check: wrote {res / 'gpu_check.json'} ({out['gpu']})")
sys.exit(0 if all(s["exit_code"] == 0 for s in steps.values()) else 1)
PY
