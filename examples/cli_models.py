"""Small models for the `attnres` command line: its tests, its docs and the CI example.

Each factory takes no arguments and returns `(model, example_inputs)` or
`(model, example_inputs, kwargs)`, the form `attnres <command> package.module:attr` expects:

    attnres check examples.cli_models:gpt_small --expect-sites 9 --onnx
    attnres check examples.cli_models:hf_llama --expect-sites 5
    attnres inspect examples.cli_models:postnorm        # no eligible chain: exit 2

`gpt_module` is a bare module instance (no example inputs), for `--input-shape`:

    attnres inspect examples.cli_models:gpt_module --input-shape 2,16 --input-dtype long

Everything is built from a fixed seed and a config: no downloads.
"""

from __future__ import annotations

import torch
from torch import nn

from examples.gpt import GPT, GPTConfig

vocab_size = 256  # not a model: `attnres inspect examples.cli_models:vocab_size` exits 2


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _gpt_config() -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.0)


def gpt_small():
    """The examples GPT, small: 4 layers (8 sublayers, so 8 + 1 final = 9 sites), d 32, context 16."""
    model = _seeded(0, lambda: GPT(_gpt_config()))
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, (idx,)


class CheckedGPT(GPT):
    """nanoGPT's length check: a dynamic sequence needs a maximum (`--max-seq 16`)."""

    def forward(self, idx):
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the context of {self.config.block_size}")
        return super().forward(idx)


def gpt_checked():
    """The examples GPT with a length check, on 8 of its 16 positions."""
    model = _seeded(0, lambda: CheckedGPT(_gpt_config()))
    return model, (torch.randint(0, vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)),)


# A bare instance: the tool needs --input-shape 2,16 --input-dtype long to run it.
gpt_module = _seeded(0, lambda: GPT(_gpt_config()))


def hf_llama():
    """A tiny Hugging Face LLaMA (2 layers: 4 sublayers + final = 5 sites), from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = _seeded(0, lambda: LlamaForCausalLM(config))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, (ids,), {"use_cache": False}


# -- models the tool refuses, each for its own reason --------------------------------------------

class PostNormNet(nn.Module):
    """x = LayerNorm(x + Linear(x)) per layer: the norm between links breaks every chain."""

    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])

    def forward(self, x):
        for lin, norm in zip(self.lins, self.norms):
            x = norm(x + lin(x))
        return x


class NoResidualNet(nn.Module):
    """An MLP without any residual connection."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class DataDependentNet(nn.Module):
    """Branches on a tensor value in Python, which torch.export cannot capture."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.a(x)
        return x


def _x(d: int = 16):
    return torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0))


def postnorm():
    """PostNorm residual blocks: no eligible chain (exit 2 from every command)."""
    return _seeded(0, PostNormNet), (_x(),)


def no_residual():
    """No residual adds at all: no eligible chain."""
    return _seeded(0, NoResidualNet), (_x(),)


def data_dependent():
    """Python control flow on tensor values: cannot be captured (exit 2)."""
    return _seeded(0, DataDependentNet), (_x(),)
