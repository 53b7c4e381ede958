"""The retrofit study (examples/retrofit.py) in a tiny configuration: every arm runs a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from examples import retrofit


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrofit")
    states = out / "states"
    cfg = retrofit.tiny_config("continue")
    retrofit.pretrain(cfg, out, states, run_cfg=retrofit._tiny_pretrain(cfg))
    records = {arm: retrofit.run_arm(retrofit.tiny_config(arm), out, states) for arm in retrofit.ARMS}
    return out, states, records


def test_every_arm_starts_from_the_same_function(tiny_study):
    """Exact retrofit: at the retrofit point every arm's validation loss is the baseline's."""
    _, _, records = tiny_study
    ref = records["continue"]["retrofit_val_loss"]
    for arm, r in records.items():
        assert math.isclose(r["retrofit_val_loss"], ref, rel_tol=1e-5), arm


@pytest.mark.parametrize("arm", retrofit.ARMS)
def test_arm_trains_what_it_says(tiny_study, arm):
    out, _, records = tiny_study
    r = records[arm]
    assert json.loads((out / f"{r['name']}.json").read_text())["final_val_loss"] == r["final_val_loss"]
    assert all(math.isfinite(v) for v in r["curve"]["val_loss"])
    assert r["final_val_loss"] < r["retrofit_val_loss"]          # a few steps already help, in every arm
    frozen = arm not in ("continue", "exact")
    assert (r["base_max_abs_change"] == 0.0) == frozen           # frozen arms never touch a pretrained weight
    n_sub = 2 * r["config"]["n_layer"]
    assert len(r["grad_norms"]) == n_sub and all(g > 0 for g in r["grad_norms"])  # measured where frozen too
    assert len(r["input_rms"]) == n_sub and all(v > 0 for v in r["input_rms"])
    assert (r["depth_weights"] is not None) == (arm in ("exact", "adapter", "adapter_lora"))


def test_adapter_and_lora_have_as_many_trainable_parameters(tiny_study):
    _, _, records = tiny_study
    n = {arm: r["trainable_parameters"] for arm, r in records.items()}
    assert n["adapter"] == n["lora"] > 0
    assert n["adapter_lora"] == n["adapter"] + n["lora"]
    assert n["continue"] < n["exact"]                             # exact adds the AttnRes parameters


def test_lora_alone_keeps_the_plain_model(tiny_study):
    """(d) is PEFT on the unconverted base: no AttnRes parameters anywhere."""
    _, states, _ = tiny_study
    cfg = retrofit.tiny_config("lora")
    model, inner, trainable, _ = retrofit.build_arm(cfg, torch.load(retrofit.state_path(cfg, states), weights_only=True))
    assert not any("attnres" in n for n, _ in model.named_parameters())
    assert all("lora_" in n for n in trainable)


def test_summary_and_figures(tiny_study, tmp_path):
    out, _, _ = tiny_study
    summary = retrofit.plot(out, tmp_path)
    assert set(summary["arms"]) == set(retrofit.ARMS)
    assert summary["arms"]["continue"]["delta_vs_continue"] == [0.0]
    assert (tmp_path / "retrofit.png").stat().st_size > 0
    assert {p.name for p in tmp_path.glob("retrofit_depth_weights_*.png")} == {
        f"retrofit_depth_weights_{a}.png" for a in ("exact", "adapter", "adapter_lora")}


# -- the recipe study (issue 22) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_recipe(tiny_study):
    out, states, first = tiny_study
    recipe = out / "recipe"
    records = {arm: retrofit.run_arm(retrofit.tiny_config(arm), recipe, states) for arm in retrofit.RECIPE_ARMS}
    return recipe, out, first, records


def test_recipe_arms_start_from_the_same_function_and_train_in_full(tiny_recipe):
    _, _, first, records = tiny_recipe
    ref = first["continue"]["retrofit_val_loss"]
    for arm, r in records.items():
        assert math.isclose(r["retrofit_val_loss"], ref, rel_tol=1e-5), arm
        assert r["final_val_loss"] < r["retrofit_val_loss"] and r["base_max_abs_change"] > 0, arm
        assert r["depth_weights"] and len(r["attnres_log"]) == r["config"]["steps"], arm


def test_recipe_lr_multiplier_moves_the_queries_that_much_further(tiny_recipe):
    """Adam moves a parameter by about its lr per step: 10x the rate, about 10x the distance."""
    _, _, first, records = tiny_recipe
    q = {arm: records[arm]["attnres_log"][-1]["query_norm"] for arm in ("lr10", "lr30", "lr100")}
    exact_q = first["exact"]["attnres_log"][-1]["query_norm"]
    assert 5 * exact_q < q["lr10"] < q["lr30"] < q["lr100"]


def test_recipe_gated_arm_starts_biased_to_recency_and_its_gates_learn(tiny_recipe):
    _, _, _, records = tiny_recipe
    log = records["gated_recency"]["attnres_log"]
    assert log[0]["gate"] == 0.0 and log[0]["query_norm"] > 0 and log[0]["query_grad_norm"] == 0.0
    assert log[-1]["gate_abs_max"] > 0 and log[-1]["query_grad_norm"] > 0


def test_recipe_schedule_ends_at_the_papers_scale(tiny_recipe):
    _, _, _, records = tiny_recipe
    assert set(records["to_paper"]["site_scales"].values()) == {1.0}
    assert max(records["lr10"]["site_scales"].values()) > 1.0          # the others stay exact


def test_recipe_summary_pairs_each_seed_with_continue(tiny_recipe, tmp_path):
    recipe, out, _, records = tiny_recipe
    summary = retrofit.plot_recipe(recipe, out, tmp_path)
    assert set(summary["arms"]) == {"continue", "exact", *retrofit.RECIPE_ARMS}
    cont = summary["arms"]["continue"]["final_val_loss"][0]
    for arm, r in records.items():
        assert summary["arms"][arm]["delta_vs_continue"][0] == pytest.approx(r["final_val_loss"] - cont)
    assert summary["arms"]["exact"]["from_first_study"] == [True]
    assert (tmp_path / "retrofit_recipe.png").stat().st_size > 0
    assert (recipe / "summary.json").is_file()


def test_arm_without_a_pretrained_baseline_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="examples.retrofit pretrain --seed 0"):
        retrofit.run_arm(retrofit.tiny_config("exact"), tmp_path, tmp_path / "none")


def test_retrofit_command_line_writes_where_it_is_told(tmp_path):
    from tests.test_train_lm import _example

    out, states = tmp_path / "retrofit", tmp_path / "states"
    r = _example("examples.retrofit", "arm", "--arm", "adapter", "--tiny", "--out", str(out), "--states", str(states))
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "L2d32_adapter_s0.json").read_text())
    assert rec["base_max_abs_change"] == 0.0
    assert (states / "L2d32_pretrained_s0.pt").is_file()
    recipe = tmp_path / "retrofit_recipe"   # a recipe arm, from the same pretrained states
    r = _example("examples.retrofit", "arm", "--arm", "lr10", "--tiny", "--out", str(recipe), "--states", str(states))
    assert r.returncode == 0, r.stderr
    rec = json.loads((recipe / "L2d32_lr10_s0.json").read_text())
    assert rec["config"]["attnres_lr_mult"] == 10.0 and rec["base_max_abs_change"] > 0
    r = _example("examples.retrofit", "arm", "--arm", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr
