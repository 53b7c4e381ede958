"""Converted Hugging Face models for the vLLM tests (built here, in the main venv, from configs).

`save_converted(family, folder)` writes what `converted.save_pretrained()` writes, plus a byte-level
tokenizer (examples/serve_vllm.py: 256 tokens, one per byte, no download), and returns the model
for `generate()`.
Heads are 32 wide: vLLM's CPU attention takes head sizes 32, 64, ... only.
"""

from __future__ import annotations

import torch

import attnres_compile as ac
from examples.serve_vllm import byte_tokenizer
from tests.models import perturb

PROMPTS = [[42], [5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(30, 53))]   # 1, 4, 10, 23 tokens
MAX_TOKENS = 8
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def build(family: str):
    import transformers

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **common))
    if family == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
            **common))
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def save_converted(family: str, folder, *, converted: bool = True):
    model = build(family)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    if converted:
        model = perturb(ac.convert(model, (ids,), kwargs={"use_cache": False}, num_blocks=2))   # trained (random) queries
    model.eval()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def reference_tokens(model, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    """Greedy tokens of the model's own generate(), one prompt at a time."""
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
            out.append(g[0, len(p):].tolist())
    return out
