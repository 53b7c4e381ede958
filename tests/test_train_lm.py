"""The training-dynamics study (examples/train_lm.py) in a tiny configuration, and its tools.

The real runs take ~10 minutes each (docs/results.md); here every variant trains a 2-layer
model for a few steps, and the test checks what the study relies on: finite, decreasing
losses, every measurement written, depth weights that are distributions, figures drawn,
and `attnres plot-weights` / `python -m examples.train_lm` end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from attnres_compile.analysis import record_sites, schedules_from_layout, site_sources
from attnres_compile.ops.depth_attention import depth_attention
from attnres_compile.ops.reference import depth_attention_reference
from examples import train_lm
from examples.plot_results import best_block_setting, plot_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    for variant in train_lm.VARIANTS:
        train_lm.train(train_lm.tiny_config(variant), out, checkpoint=False)
    cfg = train_lm.tiny_config("block4")
    cfg.attnres_lr_mult, cfg.attnres_wd = 0.3, 0.1
    train_lm.train(cfg, out, checkpoint=False)
    return out


@pytest.mark.parametrize("variant", train_lm.VARIANTS)
def test_tiny_run_writes_finite_decreasing_measurements(tiny_runs, variant):
    rec = json.loads((tiny_runs / f"L2d32_{variant}_s0.json").read_text())
    val = rec["curve"]["val_loss"]
    assert all(math.isfinite(v) for v in val)
    assert val[-1] < val[0] - 0.05, f"validation loss did not decrease: {val}"
    assert math.isfinite(rec["final_val_loss"]) and rec["final_val_loss"] < math.log(256)
    n_sub = 2 * rec["config"]["n_layer"]
    assert len(rec["grad_norms"]) == n_sub and all(g > 0 for g in rec["grad_norms"])
    assert math.isfinite(rec["grad_norm_cv"])
    assert len(rec["input_rms"]) == n_sub and all(r > 0 and math.isfinite(r) for r in rec["input_rms"])
    assert rec["ms_per_step_median"] > 0
    if variant == "baseline":
        assert rec["depth_weights"] is None and rec["attnres_parameters"] == 0
    else:
        assert rec["attnres_parameters"] > 0
        # 4 sublayers: sites 1..3 and the final one run the op (site 0 reads the embedding alone)
        assert [w["sublayer"] for w in rec["depth_weights"]] == [1, 2, 3, None]
        for w in rec["depth_weights"]:
            assert len(w["weights"]) == len(w["sources"]) and w["sources"][0] == "b0"
            assert sum(w["weights"]) == pytest.approx(1.0, abs=1e-5)


def test_attnres_group_gets_its_own_lr_and_weight_decay():
    cfg = train_lm.tiny_config("block4")
    cfg.attnres_lr_mult, cfg.attnres_wd = 0.1, 0.05
    model, _ = train_lm.build_model(cfg)
    opt = train_lm.make_optimizer(model, cfg)
    import attnres_compile

    new = {id(p) for p in attnres_compile.attnres_parameters(model).values()}
    groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} & new]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == new
    assert groups[0]["lr_mult"] == 0.1 and groups[0]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_same_initial_weights_and_batches_across_variants():
    base, _ = train_lm.build_model(train_lm.tiny_config("baseline"))
    conv, _ = train_lm.build_model(train_lm.tiny_config("full"))
    sd = conv.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_plots_and_summary(tiny_runs, tmp_path):
    summ = plot_all(tiny_runs, tmp_path)
    for name in ("val_loss.png", "input_rms.png", "grad_norms.png", "depth_weights_L2d32_full.png",
                 "depth_weights_L2d32_block4.png", "ablation.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert len(summ) == 4 and {s["variant"] for s in summ.values()} == set(train_lm.VARIANTS)
    assert best_block_setting(tiny_runs, "L2d32") in {(1.0, 0.0), (0.3, 0.1)}


class _OneSite(nn.Module):
    """A module with one site's parameters under the converted-model names, running the op."""

    def __init__(self, d: int):
        super().__init__()
        self.attnres = nn.Module()
        chain = nn.Module()
        site = nn.Module()
        site.query = nn.Parameter(torch.randn(d))
        site.norm_weight = nn.Parameter(torch.rand(d) + 0.5)
        chain.add_module("site2", site)
        self.attnres.add_module("chain0", chain)

    def forward(self, *sources):
        s = self.attnres.chain0.site2
        return depth_attention(list(sources), s.query, s.norm_weight, eps=1e-6)


def test_recorded_weights_reproduce_the_reference_mixture():
    """With one token, the recorded weights are that token's: sum_j w_j v_j must be the reference output."""
    torch.manual_seed(0)
    m = _OneSite(16).double()
    sources = [torch.randn(1, 16, dtype=torch.float64) * (j + 1) for j in range(3)]
    rec = record_sites(m, tuple(sources), schedules={(0, "site2"): (2, ["b0", "b1", "partial"])})
    assert [r.key for r in rec] == ["chain0.site2"] and rec[0].sources == ["b0", "b1", "partial"]
    mix = sum(w * v for w, v in zip(rec[0].weights, sources))
    ref = depth_attention_reference(sources, m.attnres.chain0.site2.query, m.attnres.chain0.site2.norm_weight, eps=1e-6)
    torch.testing.assert_close(mix, ref, rtol=1e-10, atol=1e-12)
    assert rec[0].input_rms == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-12)


def test_record_sites_refuses_an_unconverted_model():
    with pytest.raises(ValueError, match="not a converted model"):
        record_sites(nn.Linear(3, 3), (torch.randn(2, 3),))


def test_schedule_labels_from_layout():
    layout = {"chains": [{"block_size": 2, "num_sublayers": 4, "sites": {}}]}
    s = schedules_from_layout(layout)
    assert s[(0, "site2")] == (2, ["b0", "b1"]) and s[(0, "site3")] == (3, ["b0", "b1", "partial"])
    assert s[(0, "final")] == (None, ["b0", "b1", "b2"]) == site_sources(4, 2)["final"]


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "attnres_compile", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_plot_weights_on_a_hugging_face_program(tmp_path):
    """A program whose outputs are Hugging Face ModelOutputs loads: their module is imported."""
    ck = tmp_path / "llama.pt2"
    r = _cli("convert", "examples.cli_models:hf_llama", "-o", str(ck))
    assert r.returncode == 0, r.stderr
    r = _cli("plot-weights", str(ck), "-o", str(tmp_path / "w.png"))
    assert r.returncode == 0, r.stderr
    assert "4 sites" in r.stdout and (tmp_path / "w.png").is_file()


def test_cli_plot_weights_on_a_converted_checkpoint(tmp_path):
    ck = tmp_path / "gpt.pt2"
    r = _cli("convert", "examples.gpt:default_model", "-o", str(ck), "--num-blocks", "2")
    assert r.returncode == 0, r.stderr
    r = _cli("plot-weights", str(ck), "--json", str(tmp_path / "w.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gpt.weights.png").stat().st_size > 10_000
    sites = json.loads((tmp_path / "w.json").read_text())["sites"]
    assert len(sites) == 8 and sites[-1]["site"] == "final" and sites[-1]["sources"] == ["b0", "b1", "b2"]
    # freshly converted: zero queries give uniform weights
    for s in sites:
        assert s["weights"] == pytest.approx([1 / len(s["sources"])] * len(s["sources"]), abs=1e-6)
    assert "most weight on" in r.stdout


def test_cli_plot_weights_bad_input(tmp_path):
    r = _cli("plot-weights", str(tmp_path / "missing.pt2"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a program")
    r = _cli("plot-weights", str(bad))
    assert r.returncode == 2 and "not a program saved with torch.export.save" in r.stderr


def _example(module: str, *args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_train_lm_command_line_tiny(tmp_path):
    r = _example("examples.train_lm", "run", "--tiny", "--variant", "block4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "L2d32_block4_s0.json").read_text())
    assert math.isfinite(rec["final_val_loss"])
    r = _example("examples.train_lm", "run", "--variant", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _example("examples.train_lm", "--help")
    assert r.returncode == 0 and "usage: python -m examples.train_lm" in r.stdout


def test_attnres_train_says_where_the_study_moved():
    """The package's command line imports nothing of examples/: `attnres train` names the module."""
    r = _cli("train", "run", "--tiny")
    assert r.returncode == 2 and "python -m examples.train_lm" in r.stderr and "Traceback" not in r.stderr
