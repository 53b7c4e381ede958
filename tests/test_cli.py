"""The `attnres` command line, end to end through real subprocesses.

Every command starts a fresh interpreter (torch import: seconds), so all runs are started at
once from one module fixture, a few at a time, and the tests read their results; one run
serves several assertions (e.g. `check --onnx --json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
M = "examples.cli_models"


def _runs(tmp: Path) -> dict[str, list[str]]:
    return {
        # the CI gate: passes on the examples GPT (ONNX and JSON too) and on a tiny HF LLaMA
        "check_gpt": ["check", f"{M}:gpt_small", "--expect-sites", "9", "--onnx", "--json", str(tmp / "check.json")],
        "check_llama": ["check", f"{M}:hf_llama", "--expect-sites", "5", "--generate", "6"],
        "export_cache": ["export", f"{M}:hf_llama", "-o", str(tmp / "dec" / "model.onnx"), "--with-cache", "--fused"],
        "export_cache_no_cache": ["export", f"{M}:gpt_small", "-o", str(tmp / "x2.onnx"), "--with-cache"],
        # a dynamic sequence needs a maximum: torch's suggestion is shown, --max-seq gives it
        "convert_unbounded": ["convert", f"{M}:gpt_checked", "-o", str(tmp / "u.pt2"), "--dynamic"],
        "convert_bounded": ["convert", f"{M}:gpt_checked", "-o", str(tmp / "b.pt2"), "--max-seq", "16"],
        "bad_dim": ["convert", f"{M}:gpt_checked", "-o", str(tmp / "b2.pt2"), "--dim", "seq=9:3"],
        "check_wrong_sites": ["check", f"{M}:gpt_small", "--expect-sites", "8"],
        # inspect a bare module instance with --input-shape; JSON report
        "inspect": ["inspect", f"{M}:gpt_module", "--input-shape", "2,16", "--input-dtype", "long",
                    "--block-size", "4", "--json", str(tmp / "inspect.json")],
        "inspect_postnorm": ["inspect", f"{M}:postnorm", "--json", str(tmp / "postnorm.json")],
        "convert": ["convert", f"{M}:gpt_small", "-o", str(tmp / "out" / "gpt.pt2"), "--num-blocks", "2"],
        "export": ["export", f"{M}:gpt_small", "-o", str(tmp / "gpt.onnx"), "--dynamic", "--num-blocks", "2"],
        "export_fused": ["export", f"{M}:gpt_small", "-o", str(tmp / "gpt_fused.onnx"), "--dynamic", "--fused"],
        "fused_inline": ["export", f"{M}:gpt_small", "-o", str(tmp / "y.onnx"), "--fused", "--inline"],
        # bad input: exit 2, one line on stderr, no traceback
        "unknown_module": ["inspect", "no_such_package.models:gpt"],
        "missing_attr": ["check", f"{M}:no_such_factory"],
        "not_a_model": ["convert", f"{M}:vocab_size", "-o", str(tmp / "x.pt2")],
        "untraceable": ["check", f"{M}:data_dependent"],
        "no_chain": ["export", f"{M}:no_residual", "-o", str(tmp / "x.onnx")],
        "both_layouts": ["inspect", f"{M}:gpt_small", "--num-blocks", "2", "--block-size", "2"],
        "instance_no_inputs": ["inspect", f"{M}:gpt_module"],
        "bad_spec": ["inspect", "examples.cli_models"],
        "debug_traceback": ["--debug", "inspect", "no_such_package.models:gpt"],
        # through the console script `attnres` (pyproject [project.scripts]) where installed
        "version": ["--version"],
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # the repo root must come from cwd, as for a user

    script = Path(sys.executable).with_name("attnres")

    def run(name, argv):
        if name == "version" and script.exists():
            cmd = [str(script), *argv]
        else:
            cmd = [sys.executable, "-m", "attnres_compile", *argv]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    runs = _runs(tmp)
    # The slow runs first, so the pool does not end on one of them.
    order = sorted(runs, key=lambda k: not k.startswith(("check", "export", "convert")))
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    futures = {name: pool.submit(run, name, runs[name]) for name in order}

    def result(name) -> subprocess.CompletedProcess:
        return futures[name].result()

    result.tmp = tmp
    yield result
    pool.shutdown(wait=True)


def _ok(r, code=0):
    assert r.returncode == code, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr


def test_check_passes_on_examples_gpt_with_onnx_and_json(cli):
    r = cli("check_gpt")
    _ok(r)
    lines = r.stdout.splitlines()
    for name in ("sites", "step-0 equivalence", "gradient flow", "onnx parity"):
        assert any(ln.startswith("PASS") and name in ln for ln in lines), (name, r.stdout)
    assert "FAIL" not in r.stdout
    assert "9 (expected 9)" in r.stdout
    assert "8/8 queries finite and non-zero" in r.stdout and "8/8 norm_weight grads present" in r.stdout
    data = json.loads((cli.tmp / "check.json").read_text())
    assert data["status"] == "pass" and data["target"] == "examples.cli_models:gpt_small"
    checks = {c["name"]: c for c in data["checks"]}
    assert set(checks) == {"sites", "step-0 equivalence", "gradient flow", "onnx parity"}
    assert all(c["passed"] for c in checks.values())
    assert checks["sites"]["value"] == 9
    assert checks["step-0 equivalence"]["value"] <= 1e-5  # exact mode: the original logits
    assert checks["onnx parity"]["value"] <= 1e-4
    assert data["report"]["num_sites"] == 9 and data["report"]["preserve"] == "exact"
    assert len(data["report"]["parameters"]) == 16
    # which implementation each site ran (information, not a check): 8 sites with parameters
    info = [ln for ln in lines if ln.startswith("INFO") and "kernel paths" in ln]
    assert len(info) == 1 and "(8 sites)" in info[0], r.stdout
    assert len(data["site_paths"]) == 8 and set(data["site_paths"].values()) <= {"native CPU kernel", "PyTorch"}
    assert data["kernel_selfcheck"] == {}  # no Triton kernel on a CPU run


def test_check_passes_on_hf_llama_with_generation(cli):
    r = cli("check_llama")
    _ok(r)
    assert "LlamaForCausalLM" in r.stdout and "5 (expected 5)" in r.stdout
    assert r.stdout.count("PASS") == 4 and "check passed" in r.stdout
    assert "6 greedy tokens: PyTorch equal to the original, onnxruntime (decoder with past) equal" in r.stdout


def test_export_with_cache_writes_a_decoder_that_generates(cli):
    r = cli("export_cache")
    _ok(r)
    assert "decoder with past: 2 layers" in r.stdout and "genai_config.json" in r.stdout
    assert "PASS  onnxruntime generates PyTorch's 8 greedy tokens" in r.stdout
    assert "PASS  onnxruntime + fused kernel generates" in r.stdout
    config = json.loads((cli.tmp / "dec" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx" and config["model"]["type"] == "llama"
    r = cli("export_cache_no_cache")
    _ok(r, 2)
    assert "GPT.forward takes no cache argument" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # 14 s (CI time); exit 1 itself is also checked by test_dynamic_export_shows_torchs_suggested_bounds
def test_check_fails_with_wrong_site_count(cli):
    r = cli("check_wrong_sites")
    _ok(r, 1)
    assert any(ln.startswith("FAIL") and "sites" in ln and "9 (expected 8)" in ln for ln in r.stdout.splitlines())
    assert "check FAILED" in r.stdout


@pytest.mark.slow  # 32 s (CI time)
def test_inspect_module_instance_with_input_shape(cli):
    r = cli("inspect")
    _ok(r)
    out = r.stdout
    assert "AttnRes conversion of GPT" in out and "9 sites" in out
    assert "block size 4 (2 blocks + b0)" in out
    assert "b1 = sublayers 0-3 | b2 = sublayers 4-7" in out
    assert "transformer.h.3.mlp" in out and "(final consumer)" in out
    assert "add(s) left alone" in out and "broadcasting or bias add" in out  # wte + wpe
    data = json.loads((cli.tmp / "inspect.json").read_text())
    assert data["status"] == "ok" and data["num_sites"] == 9
    assert data["chains"][0]["block_size"] == 4 and data["block_size"] == 4
    assert data["left_alone"] and all(la["reason"] for la in data["left_alone"])


def test_inspect_no_eligible_chain_prints_report_and_exits_2(cli):
    r = cli("inspect_postnorm")
    _ok(r, 2)
    assert "AttnRes conversion of PostNormNet: 0 chain(s)" in r.stdout
    assert "left alone" in r.stdout and "PostNorm" in r.stdout
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "no residual stream of PostNormNet is eligible" in r.stderr
    data = json.loads((cli.tmp / "postnorm.json").read_text())
    assert data["status"] == "no_eligible_chain" and data["num_sites"] == 0
    assert "eligible" in data["message"] and data["refused_chains"]


def test_convert_saves_program_and_weights_that_load_back(cli):
    r = cli("convert")
    _ok(r)
    program = cli.tmp / "out" / "gpt.pt2"
    weights = cli.tmp / "out" / "gpt.attnres.safetensors"
    assert str(program) in r.stdout and str(weights) in r.stdout
    assert "PASS" in r.stdout and "FAIL" not in r.stdout

    import attnres_compile as ac
    from examples.cli_models import gpt_small

    model, args = gpt_small()
    converted = ac.convert(model, args, num_blocks=2).eval()
    ac.load_attnres_state_dict(converted, weights)  # the layout in the file fits
    loaded = torch.export.load(program).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), converted(*args), rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    assert set(load_file(weights)) == set(ac.attnres_parameters(converted))


def test_export_onnx_dynamic(cli):
    r = cli("export")
    _ok(r)
    assert "attnres::DepthAttention nodes" in r.stdout and "dynamic idx[0:batch, 1:seq]" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if "onnxruntime vs PyTorch" in ln]
    assert len(lines) == 2 and all(ln.startswith("PASS") and "max rel err" in ln for ln in lines)
    assert "resized inputs 3x15" in r.stdout

    import onnx

    from attnres_compile.onnx import count_depth_attention_nodes

    proto = onnx.load(cli.tmp / "gpt.onnx")
    assert count_depth_attention_nodes(proto) == 8  # every site with more than one source


def test_export_fused_kernel(cli):
    from attnres_compile.onnx import ort_kernel

    if not ort_kernel.available():
        pytest.skip("no C compiler for the fused onnxruntime kernel")
    r = cli("export_fused")
    _ok(r)
    lines = [ln for ln in r.stdout.splitlines() if "vs PyTorch" in ln]
    fused = [ln for ln in lines if "onnxruntime + fused kernel vs PyTorch" in ln]
    assert len(lines) == 4 and len(fused) == 2, r.stdout
    assert all(ln.startswith("PASS") for ln in lines)


BAD_INPUT = {
    "fused_inline": "--fused needs DepthAttention nodes; it cannot be combined with --inline",
    "unknown_module": "cannot import 'no_such_package.models': no module named 'no_such_package'",
    "missing_attr": "module 'examples.cli_models' has no attribute 'no_such_factory'",
    "not_a_model": "examples.cli_models:vocab_size is an int, not an nn.Module or a zero-argument factory",
    "untraceable": "cannot capture DataDependentNet: the model has data-dependent control flow",
    "no_chain": "no residual stream of NoResidualNet is eligible for AttnRes",
    "both_layouts": "argument --block-size: not allowed with argument --num-blocks",
    "instance_no_inputs": "is a module instance without example inputs: pass --input-shape",
    "bad_spec": "MODEL must be package.module:attr",
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(cli, name):
    r = cli(name)
    _ok(r, 2)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("attnres") and "error:" in err
    assert BAD_INPUT[name] in err, err


def test_untraceable_names_the_line(cli):
    assert "cli_models.py" in cli("untraceable").stderr and "if x.sum() > 0" in cli("untraceable").stderr


def test_debug_shows_traceback(cli):
    r = cli("debug_traceback")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "no module named 'no_such_package'" in r.stderr


def test_version(cli):
    r = cli("version")
    _ok(r)
    assert r.stdout.startswith("attnres 0.") and "(torch " in r.stdout


def test_dynamic_shapes_share_dims_by_size():
    from attnres_compile.cli.inputs import dynamic_shapes_for

    class Two(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, pixel_values=None, use_cache=True):
            return input_ids

    ids = torch.zeros(2, 7, dtype=torch.long)
    spec = dynamic_shapes_for(Two(), (ids,), {"attention_mask": ids.clone(),
                                              "pixel_values": torch.zeros(3, 3, 4, 4), "use_cache": False})
    assert spec["input_ids"][0] is spec["attention_mask"][0]
    assert spec["input_ids"][1] is spec["attention_mask"][1]
    assert list(spec["pixel_values"]) == [0] and spec["pixel_values"][0] is not spec["input_ids"][0]
    assert spec["use_cache"] is None


def test_dynamic_export_shows_torchs_suggested_bounds_and_takes_them(cli):
    r = cli("convert_unbounded")
    _ok(r, 1)
    assert "torch suggests seq = Dim('seq', max=16) (set bounds with --dim NAME=MIN:MAX)" in r.stderr
    r = cli("convert_bounded")
    _ok(r)
    assert "dynamic" in r.stdout and r.stdout.count("PASS") == 2
    r = cli("bad_dim")
    _ok(r, 2)
    assert "seq: MIN 9 is larger than MAX 3" in r.stderr
