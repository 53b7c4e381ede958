"""A small nanoGPT-style PreNorm GPT, written plainly (no attnres code in here).

This is the model the demo, the tests and the command-line tool convert. It follows
Karpathy's nanoGPT: token + position embeddings, `Block` = pre-LayerNorm causal
self-attention and pre-LayerNorm MLP on a residual stream, a final LayerNorm and a
weight-tied LM head. It is byte-level by default (vocab_size 256).

`GPT.forward(idx)` returns the logits only, so `torch.export` (non-strict) traces it with no
data-dependent control flow; the loss is the separate `loss_fn(logits, targets)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256       # bytes
    block_size: int = 128       # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True           # bias in Linear and LayerNorm layers, as GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

        # nanoGPT init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [B, T] int64 token ids with T <= block_size. Returns logits [B, T, vocab]."""
        T = idx.shape[1]
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)


class GPTEmbed(nn.Module):
    """The GPT's stream start (token + position embeddings): the first pipeline stage's `embed`
    (attnres_compile.pipeline_stages)."""

    def __init__(self, gpt):
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.drop

    def forward(self, idx):
        return self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))


class GPTHead(nn.Module):
    """Final norm and LM head: the last pipeline stage's `head`."""

    def __init__(self, gpt):
        super().__init__()
        self.ln_f, self.lm_head = gpt.transformer.ln_f, gpt.lm_head

    def forward(self, h):
        return self.lm_head(self.ln_f(h))


def parallel_plans(mode: str) -> tuple[dict, dict]:
    """`parallelize_module` plans for tensor ("tp") or sequence ("sp") parallelism: (the plan of
    the whole model, the plan of each Block).

    The attention's fused qkv projection is split by position into q, k and v, which a column
    split would cut across, so the attention runs replicated and only the MLP is sharded
    (column-wise in, row-wise out). "sp" also shards the residual stream on the sequence (dim 1)
    between sublayers: the norms run on each rank's tokens, each sublayer gathers its input, the
    MLP reduce-scatters its output back. The stream starts in GPT.forward (token plus position
    embedding, the token table tied to lm_head), so the first Block shards it; lm_head gathers it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel)

    if mode == "tp":
        return {}, {"mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    if mode != "sp":
        raise ValueError(f"mode must be 'tp' or 'sp', got {mode!r}")
    gather = (Shard(1),), (Replicate(),)
    outer = {"transformer.h.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                   use_local_output=False),
             "transformer.ln_f": SequenceParallel(),
             "lm_head": PrepareModuleInput(input_layouts=gather[0], desired_input_layouts=gather[1],
                                           use_local_output=True)}
    layer = {"ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
             "attn": PrepareModuleInput(input_layouts=gather[0], desired_input_layouts=gather[1], use_local_output=True),
             "attn.c_proj": PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
                                                use_local_output=False),
             "mlp": PrepareModuleInput(input_layouts=gather[0], desired_input_layouts=gather[1]),
             "mlp.c_fc": ColwiseParallel(),
             "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    return outer, layer


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets [B, T] int64 (-1 is ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def param_groups(params, weight_decay: float) -> list[dict]:
    """nanoGPT's AdamW groups: decay matrices and embeddings, not biases or norm gains."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, lr: float, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """nanoGPT's schedule: linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def default_config() -> GPTConfig:
    return GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)


def default_model(seed: int = 0, batch_size: int = 2) -> tuple[GPT, tuple[torch.Tensor]]:
    """The demo-sized GPT (4 layers, d 128, 4 heads, context 128) and example inputs for it.

    For the command-line tool: `attnres inspect examples.gpt:default_model`.
    """
    cfg = default_config()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=g)
    return model, (idx,)
