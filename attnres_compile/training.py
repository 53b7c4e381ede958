"""Training a converted model: the optimizer groups of the AttnRes parameters.

The defaults are the retrofit recipe study's (examples/retrofit.py, docs/results.md "A retrofit
recipe"): a trained L16d96 GPT continued for 500 steps after `convert(preserve="exact")`, 3
seeds, in arms that each change one thing.
"""

from __future__ import annotations

from torch import nn

from .runtime.params import attnres_parameters, find_params
from .ops.site import DepthAttentionSite

__all__ = ["param_groups", "sites"]

# AttnRes learning-rate multiplier over the base rate. docs/results.md, "A retrofit recipe": after
# an exact retrofit of a trained L16d96 GPT (500 steps, 3 seeds, paired against continuing the
# plain model) x1 gained 0.0073 +- 0.0019 nats/byte, x10 0.0072 +- 0.0015, x30 0.0048 (seed 0),
# x100 left the pretrained function (+0.041 at step 200, stopped); from scratch, x1 was also the
# setting to keep among x0.1-x3 (x3 not reliably better; docs/results.md, "Optimizer settings for
# the new parameters").
DEFAULT_ATTNRES_LR_MULT = 1.0


def sites(model: nn.Module) -> dict[str, DepthAttentionSite]:
    """Every depth-attention site with parameters, by its module name under the AttnRes container."""
    own = find_params(model)
    if own is None:
        raise TypeError(f"expected a model converted by attnres_compile.convert(), got {type(model).__name__}")
    return {n: m for n, m in own.named_modules() if isinstance(m, DepthAttentionSite)}


def param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                 attnres_lr_mult: float = DEFAULT_ATTNRES_LR_MULT, attnres_weight_decay: float = 0.0,
                 decay_filter=None) -> list[dict]:
    """Optimizer parameter groups for a converted model (or a PEFT / DDP wrapper of one).

    Args:
        model: the model whose trainable parameters (requires_grad) are grouped.
        lr: the base learning rate.
        weight_decay: for the model's own parameters that `decay_filter` selects.
        attnres_lr_mult: the AttnRes parameters (queries, key-norm gains) get lr * mult; default 1,
            the retrofit recipe study's best (higher rates move the queries faster and gain less).
        attnres_weight_decay: their weight decay; default 0 (decay pulls a query back toward
            uniform weights, and hurt on both seeds of docs/results.md's ablation).
        decay_filter: (name, parameter) -> bool, which of the model's own parameters decay;
            default: those with 2 or more dimensions (matrices and embeddings, as nanoGPT).

    Returns:
        Up to three groups (empty ones dropped), each with its own "lr", "weight_decay" and
        "lr_mult", for any torch optimizer. torch's LR schedulers scale each group's own initial
        lr, so the multiplier is kept; a hand-written schedule sets g["lr"] = lr * g["lr_mult"].
    """
    decay_filter = decay_filter or (lambda n, p: p.dim() >= 2)
    added = {id(p) for p in attnres_parameters(model).values()}
    decay, no_decay, extra = [], [], []
    seen = set()
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in added:
            extra.append(p)
        elif decay_filter(n, p):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": extra, "lr": lr * attnres_lr_mult, "weight_decay": attnres_weight_decay,
               "lr_mult": attnres_lr_mult}]
    return [g for g in groups if g["params"]]
