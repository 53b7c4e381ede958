"""Small models for the tests, built from configs (no downloads)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int = 2, norm: str = "layer"):
        super().__init__()
        Norm = nn.LayerNorm if norm == "layer" else nn.RMSNorm
        self.ln_1 = Norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = Norm(d)
        self.fc = nn.Linear(d, 3 * d)
        self.out = nn.Linear(3 * d, d)
        self.heads = heads

    def attn(self, h):
        B, T, D = h.shape
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def mlp(self, h):
        return self.out(F.gelu(self.fc(h)))

    def sublayers(self):
        """The block's two sublayers f(a) = branch(norm(a)), as the SPEC counts them."""
        return [lambda a: self.attn(self.ln_1(a)), lambda a: self.mlp(self.ln_2(a))]

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TinyPreNormLM(nn.Module):
    """A nanoGPT-shaped PreNorm LM whose sublayers the tests can call one by one."""

    def __init__(self, vocab=37, d=24, layers=3, ctx=16, norm="layer", dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TinyBlock(d, norm=norm) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():  # O(1) activations so eps is negligible in scale mode
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
        nn.init.normal_(self.wte.weight, std=1.0)

    def embed(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def sublayers(self):
        return [f for b in self.blocks for f in b.sublayers()]

    def readout(self, h):
        return self.head(self.ln_f(h))

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.readout(x)


class PostNormBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x + self.lin(x))


class PostNormNet(nn.Module):
    def __init__(self, d=16, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList([PostNormBlock(d) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class NoResidualNet(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class DataDependentNet(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value: untraceable by torch.export
            return self.a(x)
        return x


def hf_configs():
    """name -> (model factory, example args, kwargs, layers). Small eps: see test_convert."""
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel,
    )

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                          layer_norm_epsilon=1e-12, bos_token_id=0, eos_token_id=0))

    def llama():
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=32, rms_norm_eps=1e-12))

    def vit():
        return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, image_size=16, patch_size=4, layer_norm_eps=1e-12))

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {
        "hf_gpt2": (gpt2, (ids,), {"use_cache": False}, 3),
        "hf_llama": (llama, (ids,), {"use_cache": False}, 3),
        "hf_vit": (vit, (img,), {}, 3),
    }


def main_output(out):
    """The tensor to compare from a model's output (logits, last hidden state, or the tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(type(out))
