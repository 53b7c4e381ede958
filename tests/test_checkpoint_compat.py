"""A converted checkpoint outlives the library version it was saved under (runtime/replay.py).

Saved under this venv's transformers and loaded in a second venv with transformers 5.19
(`make compat-venv`: its modeling files place the residual adds on other lines), and the other
way round: the plan is re-derived from the code there, with one warning, and the logits equal
the saving side's. The saved config holds no path of the saving machine.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnres_compile as ac
from .models import perturb, rel_err

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / ".venv-compat" / "bin" / "python"

pytestmark = pytest.mark.skipif(not COMPAT.exists(), reason="no .venv-compat (make compat-venv): the second "
                                "venv with transformers 5.19 is absent")

MODEL = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
def build():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
"""


def _run(python, code: str, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(python), "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


SAVE = MODEL + """
import sys, transformers, attnres_compile as ac
from tests.models import perturb
d = sys.argv[1]
model = build()
ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
conv = perturb(ac.convert(model, (ids,), preserve="exact", num_blocks=2))
conv.save_pretrained(d + "/ckpt")
torch.save(conv, d + "/whole.pt")
with torch.no_grad():
    torch.save({"ids": ids, "logits": conv(ids).logits}, d + "/want.pt")
print(transformers.__version__)
"""

LOAD = """
import sys, warnings, torch, transformers, attnres_compile as ac
d, how = sys.argv[1], sys.argv[2]
x = torch.load(d + "/want.pt")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    if how == "pretrained":
        model = ac.from_pretrained(d + "/ckpt")
    else:
        model = torch.load(d + "/whole.pt", weights_only=False)
    with torch.no_grad():
        got = model(x["ids"]).logits
torch.save(got, d + "/got.pt")
print(transformers.__version__)
for m in w:
    if "attnres_compile" in str(m.message):
        print("WARNING", m.message)
"""


def _versions_differ(main: str, compat: str) -> None:
    assert main != compat, (main, compat)


def _check(tmp_path, saver, loader, how):
    saved_under = _run(saver, SAVE, tmp_path).strip().splitlines()[-1]
    out = _run(loader, LOAD, tmp_path, how)
    loaded_under = out.splitlines()[0]
    _versions_differ(saved_under, loaded_under)
    want = torch.load(tmp_path / "want.pt")["logits"]
    got = torch.load(tmp_path / "got.pt")
    assert rel_err(got, want) <= 1e-6
    return out


@pytest.mark.parametrize("direction", ["newer_to_5.19", pytest.param("5.19_to_newer", marks=pytest.mark.slow)])  # CI time
def test_save_pretrained_under_one_transformers_loads_under_another(tmp_path, direction):
    saver, loader = (sys.executable, COMPAT) if direction == "newer_to_5.19" else (COMPAT, sys.executable)
    out = _check(tmp_path, saver, loader, "pretrained")
    warnings = [ln for ln in out.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "re-derived" in warnings[0] and "modeling_llama.py" in warnings[0], out
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    _no_absolute_path(config["attnres"])


def test_torch_save_of_the_whole_model_loads_under_another_transformers(tmp_path):
    out = _check(tmp_path, sys.executable, COMPAT, "whole")
    assert sum(ln.startswith("WARNING") for ln in out.splitlines()) == 1 and "re-derived" in out, out
    raw = (tmp_path / "whole.pt").read_bytes()
    for path in {str(ROOT), sys.prefix, os.path.dirname(torch.__file__)}:
        assert path.encode() not in raw, path


def _no_absolute_path(obj, where="attnres"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_absolute_path(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_absolute_path(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        assert not os.path.isabs(obj) and "site-packages" not in obj, f"{where} = {obj!r}"


def test_the_same_version_loads_without_rederiving(tmp_path):
    """Nothing moved: the saved plan is installed as it is, silently."""
    exec(MODEL, g := {})
    model = g["build"]()
    ids = torch.randint(0, 96, (2, 7))
    conv = perturb(ac.convert(model, (ids,), preserve="exact", num_blocks=2))
    conv.save_pretrained(tmp_path / "ckpt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ac.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, conv(ids).logits) <= 1e-6
    buf = io.BytesIO()
    torch.save(conv, buf)
    assert str(ROOT).encode() not in buf.getvalue()
