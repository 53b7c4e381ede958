"""A converted model for vLLM to serve (`make serve`): a small Llama trained briefly on bytes.

    python -m examples.serve_vllm --out build/serve-model [--steps 200]

Builds a Hugging Face `LlamaForCausalLM` from a config (3 layers, d 128, heads of 32: vLLM's
CPU attention takes head sizes 32, 64, ...), trains it for `--steps` AdamW steps on the byte
corpus of examples/data.py (Python source), converts it with `attnres_compile.convert(
preserve="exact", num_blocks=2)`, trains the converted model a few more steps (so its queries
are not at their zero start), and writes `converted.save_pretrained(out)` with a byte-level
tokenizer (256 tokens, one per byte; nothing downloaded). It prints the model's own greedy
`generate()` completion of a prompt, and the curl command that asks the server for the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROMPT = "def main("


def byte_tokenizer():
    """A byte-level tokenizer whose 256 ids are the 256 byte values (GPT-2's byte-to-unicode table)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_of = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tok = Tokenizer(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False))


def train(model, steps: int, corpus, seed: int) -> float:
    from examples.data import get_batch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x, y = get_batch("train", 16, 64, gen, corpus)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def main(argv: list[str] | None = None) -> int:
    import attnres_compile as ac
    from examples.data import load_corpus

    ap = argparse.ArgumentParser(prog="python -m examples.serve_vllm", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/serve-model")
    ap.add_argument("--steps", type=int, default=200, help="training steps before the conversion")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    corpus = load_corpus()
    t0 = time.perf_counter()
    model = build()
    plain_loss = train(model, args.steps, corpus, seed=1)
    example = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    converted = ac.convert(model, (example,), kwargs={"use_cache": False}, preserve="exact", num_blocks=2)
    conv_loss = train(converted, max(args.steps // 4, 1), corpus, seed=2)
    out = Path(args.out)
    converted.save_pretrained(out)
    tok = byte_tokenizer()
    tok.save_pretrained(out)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        gen = converted.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    completion = tok.decode(gen[0, len(ids):].tolist())
    print(f"trained {args.steps} steps (loss {plain_loss:.3f}), converted, {max(args.steps // 4, 1)} more "
          f"(loss {conv_loss:.3f}) in {time.perf_counter() - t0:.0f} s; saved to {out}")
    print(f"generate() completion of {PROMPT!r}: {completion!r}")
    body = json.dumps({"model": str(out), "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    print("when the server is up, ask it for the same:\n"
          f"  curl -s http://127.0.0.1:{args.port}/v1/completions -H 'Content-Type: application/json' -d '{body}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
