#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most 7 minutes (the step limits below add up
# to 420 s), with the GPU machine's own python3 and packages (device tool KINDS.md: Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, no network).
#
# Here first:  make gpu-wheels   (benchmarks/wheels/: fla-core, which that machine lacks)
# Then the device tool's call, a copy and paste (benchmarks/README.md says more):
#
#   run  carry=["benchmarks/wheels"]  timeout_s=450
#        command="GPU_CHECK_RESULTS=$OUT bash benchmarks/gpu_check.sh"
#
# What comes back (gpu_check.json, gpu_check.log, kernels_cuda.json, models_cuda_llama.json) goes
# into benchmarks/results/. To rerun some steps on the still-warm machine, name them, in order:
#   command="GPU_CHECK_RESULTS=$OUT GPU_CHECK_STEPS=env,wheels,cuda_tests bash benchmarks/gpu_check.sh"
#
# Dry run on this CPU, in the matrix venv that has the GPU machine's versions (Makefile):
#
#   make gpu-dry-run      # GPU_CHECK_DRY_RUN=1 PYTHON=.venv-matrix/bin/python bash benchmarks/gpu_check.sh
#
# Steps (name, limit in seconds; * = needs CUDA):
#   env           15  python/torch/triton/transformers versions and the GPU; fails if torch sees no
#                     GPU (then the CUDA steps are skipped)
#   wheels        20  pip install --no-index --no-deps --target of benchmarks/wheels/*.whl, put on
#                     PYTHONPATH for the steps after it
#   native_build  75  pip install --no-index --no-deps --no-build-isolation -e . (builds
#                     attnres_compile._C against that machine's torch; `setup.py egg_info
#                     build_ext --inplace` if pip cannot), then imports it
#   preflight     30  imports what the CUDA steps import (the package, _C, the Triton kernels,
#                     fla.ops.attnres, transformers' LLaMA, the "attnres" Dynamo backend, both
#                     benchmark scripts) and collects tests/test_cuda.py
#   cuda_tests*  100  pytest -m cuda tests/test_cuda.py: the Triton kernels against float64, a
#                     converted Hugging Face LLaMA (exact at step 0, compiled training, two-phase
#                     serving, bf16 autocast)
#   kernels*      80  bench_kernels.py --devices cuda: kernel bandwidth over copy bandwidth
#                     (forward, backward, two-phase; fp32, bf16; D 2048-7168, 9-33 sources) beside
#                     fla-core's fused_attnres -> kernels_cuda.json
#   model_llama* 100  bench_models.py --model llama (d 1024, 12 layers): compiled training and
#                     two-phase inference against plain residuals -> models_cuda_llama.json
#
# Each step runs under its own limit (SIGINT, SIGKILL 5 s later) whatever the steps before it
# did, and $GPU_CHECK_RESULTS/gpu_check.json (default benchmarks/results/) is rewritten before
# and after every step: a failed, timed-out or killed step leaves the others' results, and the
# step in flight is named ("running"). gpu_check.log holds every step's whole output, written as
# it runs. Exit code 0 when every selected step passed (a dry run: reached its first CUDA call),
# else 1; a failed step's last 30 lines are printed.
#
# Dry run (GPU_CHECK_DRY_RUN=1 or --dry-run; no GPU needed): the set-up steps run for real, each
# CUDA step runs its command on the CPU, where it stops at its first CUDA call (the tests skip,
# the benchmarks record "unmeasured"), and is reported "skipped" unless that command failed.
# Limits are multiplied by GPU_CHECK_LIMIT_SCALE (dry run: 4, for a 2-core machine), and results
# go to build/gpu_check_dry_run/ unless GPU_CHECK_RESULTS names a folder.
# Other settings: PYTHON (default python3), GPU_CHECK_WHEELS (default benchmarks/wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        *) echo "gpu_check: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done
[[ $DRY == 0 || -z $DRY ]] && DRY=0 || DRY=1
PY=${PYTHON:-python3}
if [[ $DRY == 1 ]]; then
    RES=${GPU_CHECK_RESULTS:-build/gpu_check_dry_run}
    SCALE=${GPU_CHECK_LIMIT_SCALE:-4}
else
    RES=${GPU_CHECK_RESULTS:-benchmarks/results}
    SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
fi
WHEELS=${GPU_CHECK_WHEELS:-benchmarks/wheels}
ALL_STEPS="env wheels native_build preflight cuda_tests kernels model_llama"
STEPS=${GPU_CHECK_STEPS:-$ALL_STEPS}
STEPS=" ${STEPS//,/ } "
for s in $STEPS; do
    [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check: unknown step $s (steps: $ALL_STEPS)" >&2; exit 2; }
done
mkdir -p "$RES" || exit 2
RES=$(cd "$RES" && pwd)
WORK=$(mktemp -d)
SITE=$WORK/site
export PY WHEELS SITE WORK ROOT  # read by the step functions, which run in a child bash
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ATTNRES_GPU_CHECK_DRY=$DRY
CUDA_OK=0
: >"$WORK/steps.tsv"
: >"$RES/gpu_check.log"
rm -f "$RES/gpu_check.json" "$RES/kernels_cuda.json" "$RES/models_cuda_llama.json"

# ---- bookkeeping ----------------------------------------------------------------------------
cat >"$WORK/summarize.py" <<'PY'
"""Writes gpu_check.json from the step table; imports nothing heavy."""
import json, pathlib, sys, time
work, res, dry, selected, all_steps = sys.argv[1:6]
work, res, selected, all_steps = pathlib.Path(work), pathlib.Path(res), selected.split(), all_steps.split()
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, limit, cuda, note = line.split("\t")
    p = work / f"{name}.log"
    steps[name] = {"status": status, "exit_code": int(rc) if rc else None, "seconds": int(secs),
                   "limit_seconds": int(limit), "needs_cuda": cuda == "1", "note": note,
                   "log_tail": p.read_text(errors="replace")[-3000:] if p.exists() else ""}
running = (work / "running").read_text().strip() if (work / "running").exists() else None
for name in all_steps:
    if name not in steps:
        steps[name] = {"status": "running" if name == running else
                       "not run yet" if name in selected else "not selected (GPU_CHECK_STEPS)"}
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
finished = all("exit_code" in steps[n] for n in selected)
out = {"dry_run": dry == "1", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": finished,
       "passed": finished and all(steps[n]["status"] in ("ok", "skipped") for n in selected),
       "running": running, "env": load(work / "env.json"), "steps": steps,
       "kernels": load(res / "kernels_cuda.json"), "model_llama": load(res / "models_cuda_llama.json")}
(res / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
PY
summarize() {
    "$PY" "$WORK/summarize.py" "$WORK" "$RES" "$DRY" "$STEPS" "$ALL_STEPS" \
        || echo "gpu_check: could not write $RES/gpu_check.json" >&2
}
selected() { [[ $STEPS == *" $1 "* ]]; }

record() {  # record NAME STATUS RC SECONDS LIMIT NEEDS_CUDA NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
    rm -f "$WORK/running"
    echo "gpu_check: $1: $2${3:+ (exit $3)} after $4 s (limit $5 s)${7:+; $7}"
    summarize
}

step() {  # step NAME LIMIT NEEDS_CUDA COMMAND...: COMMAND under its limit, output to gpu_check.log
    local name=$1 limit=$(( $2 * SCALE )) cuda=$3 t0 rc status note="" off
    shift 3
    selected "$name" || return 0
    if [[ $cuda == 1 && $DRY == 0 && $CUDA_OK == 0 ]]; then
        record "$name" skipped "" 0 "$limit" 1 "no CUDA device visible to torch (see the env step)"
        return 0
    fi
    echo "$name" >"$WORK/running"
    summarize
    echo "gpu_check: $name (limit $limit s) ..."
    printf '\n===== %s (limit %s s) %s\n' "$name" "$limit" "$(date '+%H:%M:%S')" >>"$RES/gpu_check.log"
    off=$(stat -c %s "$RES/gpu_check.log")
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs only
        timeout --signal=INT --kill-after=5 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" \
            >>"$RES/gpu_check.log" 2>&1 </dev/null
    else
        timeout --signal=INT --kill-after=5 "$limit" "$@" >>"$RES/gpu_check.log" 2>&1 </dev/null
    fi
    rc=$?
    tail -c +$(( off + 1 )) "$RES/gpu_check.log" >"$WORK/$name.log"
    if [[ $rc == 0 ]]; then
        status=ok
        [[ $cuda == 1 && $DRY == 1 ]] && status=skipped note="dry run: ran on the CPU up to its first CUDA call"
    elif [[ $rc == 124 || $rc == 137 ]]; then
        status="timed out"
    else
        status=failed
    fi
    if [[ $status != ok && $status != skipped ]]; then
        echo "----- last lines of $name:"; tail -n 30 "$WORK/$name.log"; echo "-----"
    fi
    record "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$limit" "$cuda" "$note"
    return $rc
}

trap 'echo "gpu_check: interrupted" >&2; rm -f "$WORK/running"; summarize; exit 130' INT TERM

# ---- env ------------------------------------------------------------------------------------
cat >"$WORK/env.py" <<'PY'
import importlib.metadata as md, json, os, platform, subprocess, sys
out, pins = sys.argv[1], sys.argv[2]
env = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
       "cpu_count": os.cpu_count(), "dry_run": os.environ.get("ATTNRES_GPU_CHECK_DRY") == "1"}
for name in ("torch", "triton", "transformers", "numpy", "onnx", "onnxruntime", "onnxscript", "onnx-ir",
             "safetensors", "accelerate", "huggingface-hub", "tokenizers", "fla-core", "setuptools", "pip",
             "ninja", "pytest"):
    try:
        env[name] = md.version(name)
    except md.PackageNotFoundError:
        env[name] = None
import torch
env["torch_cuda"] = torch.version.cuda
env["cuda_available"] = torch.cuda.is_available()
if env["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count(),
               gpu_memory_gib=round(p.total_memory / 2**30, 1))
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
pinned = {}
for line in open(pins):
    line = line.split("#")[0].strip()
    if "==" in line:
        k, v = (x.strip() for x in line.split("=="))
        pinned[k.lower().replace("_", "-")] = v
# fla-core is installed by the next step, from the carried wheel
env["differs_from_gpu_machine_versions_txt"] = {
    k: {"pinned": v, "found": env.get(k)} for k, v in pinned.items()
    if k != "fla-core" and (env.get(k) or "").split("+")[0] != v}
with open(out, "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps(env, indent=2))
if not env["cuda_available"] and not env["dry_run"]:
    sys.exit("gpu_check: torch sees no CUDA device: the CUDA steps are skipped")
PY
if selected env; then
    step env 15 0 "$PY" "$WORK/env.py" "$WORK/env.json" benchmarks/gpu-machine-versions.txt
    grep -q '"cuda_available": true' "$WORK/env.json" 2>/dev/null && CUDA_OK=1
else
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && CUDA_OK=1
fi

# ---- wheels ---------------------------------------------------------------------------------
install_wheels() {
    shopt -s nullglob
    local whl=("$WHEELS"/*.whl)
    if (( ${#whl[@]} == 0 )); then
        echo "gpu_check: no wheels in $WHEELS: run \`make gpu-wheels\` here and carry $WHEELS"
        return 1
    fi
    printf 'installing %s\n' "${whl[@]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}"
}
if step wheels 20 0 install_wheels; then
    export PYTHONPATH=$ROOT:$SITE${PYTHONPATH#"$ROOT"}
fi

# ---- native_build ---------------------------------------------------------------------------
native_build() {
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
        || { echo "gpu_check: pip could not install the package; building in place instead"
             "$PY" setup.py -q egg_info build_ext --inplace; }
    "$PY" -c "import attnres_compile._C as m, torch; print('built', m.__file__, 'against torch', torch.__version__)"
}
step native_build 75 0 native_build

# ---- preflight ------------------------------------------------------------------------------
cat >"$WORK/preflight.py" <<'PY'
import importlib, sys, traceback
failed = []
def check(what, fn):
    try:
        r = fn()
        print(f"ok      {what}" + (f": {r}" if r is not None else ""))
    except BaseException as e:  # every failure is a finding
        failed.append(what)
        print(f"FAILED  {what}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)
imp = importlib.import_module
def backend():
    import torch._dynamo
    assert "attnres" in torch._dynamo.list_backends(), "the 'attnres' entry point is not installed"
def fla():
    return f"{imp('fla.ops.attnres').fused_attnres.__name__} from {imp('fla').__file__}"
check("import attnres_compile", lambda: imp("attnres_compile").__file__)
check("attnres_compile._C (native CPU kernels)", lambda: imp("attnres_compile._C").__file__)
check("Triton kernels (attnres_compile.ops.kernels.triton_launch)", lambda: imp("attnres_compile.ops.kernels.triton_launch").__name__)
check("triton", lambda: imp("triton").__version__)
check("fla.ops.attnres.fused_attnres (fla-core)", fla)
check("transformers.LlamaForCausalLM", lambda: imp("transformers").LlamaForCausalLM.__name__)
check("torch.compile backend 'attnres'", backend)
sys.path.insert(0, "benchmarks")
check("benchmarks/bench_kernels.py", lambda: imp("bench_kernels").__file__)
check("benchmarks/bench_models.py", lambda: imp("bench_models").__file__)
sys.exit(f"preflight: {len(failed)} failed: {', '.join(failed)}" if failed else 0)
PY
preflight() {
    "$PY" "$WORK/preflight.py" || return 1
    "$PY" -m pytest -q --collect-only -m cuda -p no:cacheprovider tests/test_cuda.py
}
step preflight 30 0 preflight

# ---- CUDA -----------------------------------------------------------------------------------
step cuda_tests 100 1 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_cuda.py
step kernels 80 1 "$PY" benchmarks/bench_kernels.py --devices cuda --reps 5 --out-dir "$RES"
step model_llama 100 1 "$PY" benchmarks/bench_models.py --device cuda --model llama --layers 12 --d 1024 \
    --heads 16 --batch 8 --seq 512 --iters 10 --warmup 3 --out "$RES/models_cuda_llama.json"

# ---- summary --------------------------------------------------------------------------------
summarize
"$PY" - "$RES/gpu_check.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
env = r.get("env") or {}
print(f"gpu_check: wrote {sys.argv[1]}{' (DRY RUN)' if r['dry_run'] else ''}: {env.get('gpu') or 'no GPU'}, "
      f"python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton')}, "
      f"transformers {env.get('transformers')}")
for name, s in r["steps"].items():
    print(f"  {name:13s} {s['status']}" + (f" (exit {s['exit_code']}, {s['seconds']} s)" if s.get("exit_code") is not None else ""))
print("gpu_check: passed" if r["passed"] else "gpu_check: FAILED")
sys.exit(0 if r["passed"] else 1)
PY
