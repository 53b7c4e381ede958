"""The example model, the stdlib corpus, the quick-start demo and the CLI entry point."""

from __future__ import annotations

import io
import math

import pytest
import torch

from examples import data
from examples.gpt import GPT, GPTConfig, default_model, loss_fn


def test_corpus_splits_are_disjoint_nonempty_and_deterministic():
    c = data.load_corpus()
    assert c.train.dtype == torch.uint8 and c.val.dtype == torch.uint8
    assert c.train.numel() > 100_000 and c.val.numel() > 10_000
    assert c.train_files > c.val_files > 0
    files = data.stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts for p in files)
    val = [p for p in files if data.is_validation(p)]
    assert 0.03 < len(val) / len(files) < 0.2


def test_get_batch_is_a_function_of_the_generator():
    x1, y1 = data.get_batch("train", 4, 32, torch.Generator().manual_seed(5))
    x2, y2 = data.get_batch("train", 4, 32, torch.Generator().manual_seed(5))
    x3, _ = data.get_batch("train", 4, 32, torch.Generator().manual_seed(6))
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    xv, _ = data.get_batch("val", 2, 32, torch.Generator().manual_seed(5))
    assert xv.max() < 256
    with pytest.raises(ValueError):
        data.get_batch("test", 1, 8, torch.Generator())


def test_gpt_shapes_init_and_loss():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.2)
    idx = torch.randint(0, 256, (3, 16))
    logits = m(idx)
    assert logits.shape == (3, 16, 256)
    targets = torch.randint(0, 256, (3, 16))
    assert loss_fn(logits, targets).item() == pytest.approx(math.log(256), rel=0.05)
    assert m(idx[:, :5]).shape == (3, 5, 256)


def test_gpt_exports_non_strict():
    model, (idx,) = default_model()
    assert idx.shape == (2, model.config.block_size)
    ep = torch.export.export(model, (idx,), strict=False)
    torch.testing.assert_close(ep.module()(idx), model(idx))


def test_demo_quick_trains_both_models(tmp_path):
    from rich.console import Console

    from examples.demo import parse_args, run

    cfg = parse_args(["--quick", "--steps", "6", "--out", str(tmp_path)])
    assert cfg.steps == 6
    text = io.StringIO()
    out = run(cfg, Console(file=text, width=160))
    for key in ("baseline_val_loss", "attnres_val_loss", "step_time_ratio", "baseline_input_rms_ratio",
                "attnres_input_rms_ratio", "baseline_grad_norm_cv", "attnres_grad_norm_cv"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    printed = text.getvalue()
    for row in ("input RMS, last sublayer / 2nd", "grad-norm CV across sublayers", "verdict", str(tmp_path)):
        assert row in printed, row
    assert (tmp_path / "demo_depth_weights.png").stat().st_size > 0
    assert out["baseline_val_loss"] < math.log(256) + 0.5
    assert out["report"]["chains"]


def test_cli_without_command_prints_usage_and_exits_2(capsys):
    from attnres_compile.cli import main

    assert main([]) == 2
    assert "usage: attnres" in capsys.readouterr().err
    assert main(["--help"]) == 0
