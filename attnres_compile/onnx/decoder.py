"""Generation in ONNX Runtime: a decoder with past, and the loop that drives it.

Depth attention is per token, so a converted causal LM needs no cache of its own: only the
model's ordinary key/value cache crosses the export boundary. `export_decoder` exports one
graph that serves the prefill (past length 0) and every decode step:

    inputs   input_ids [batch, sequence] (int64), attention_mask [batch, total_sequence],
             position_ids [batch, sequence] (where forward takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_size]
    outputs  logits [batch, sequence, vocab], present.{i}.key / .value
             [batch, kv_heads, total_sequence, head_size]

with the names optimum and onnxruntime-genai use, dynamic batch, sequence and past length, and
one `attnres::DepthAttention` node per site (SPEC section 6). The model is exported through a
thin wrapper that takes the past as flat tensors and builds the model's own cache object
(`DynamicCache`) from them, so no cache pytree has to be registered with torch.export.

`ort_generate` is the generation loop over an onnxruntime session (stock, or with the fused
kernel): greedy or sampling (temperature, top-k, top-p through transformers' own warpers, in
`generate()`'s order and with its RNG calls, so a seeded run draws the same tokens), EOS and
padding as `generate()` does them, a streamer. `write_genai_config` writes the
`genai_config.json` onnxruntime-genai reads next to the model (`export_for_generation` does
both).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..api import is_converted
from ..errors import AttnResError
from .node import ONNX_OPSET, finish_proto, translation_table
from .session import ort_session


class GenerationExportError(AttnResError, ValueError):
    """The model cannot be exported as a decoder with past; the message says why and what to do."""


@dataclass
class DecoderSpec:
    """What the exported decoder takes and returns (also what genai_config.json describes)."""

    num_layers: int
    kv_heads: list[int]
    head_size: list[int]
    cache_arg: str                  # the forward keyword that takes the cache
    position_ids: bool              # whether forward takes position_ids
    dtype: torch.dtype
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


def _cache_arg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise GenerationExportError(
        f"{type(model).__name__}.forward takes no cache argument (`past_key_values` or `cache`), so it cannot be "
        "exported as a decoder with past; generation without a cache still works: export_onnx() the full-sequence "
        "model and call ort_generate() on it, which then recomputes the whole prefix at every step")


def _output_cache(out):
    for name in ("past_key_values", "cache"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise GenerationExportError("the model returned no cache with use_cache=True; it cannot be exported with past")


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise GenerationExportError(f"the model's cache ({type(cache).__name__}) has no per-layer key/value tensors")
    flat = []
    for layer in layers:
        flat += [layer.keys, layer.values]
    return flat


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """Probe `model` once (two tokens, use_cache=True) for its layer count and cache shapes."""
    cache_arg = _cache_arg(model)
    params = inspect.signature(model.forward).parameters
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    flat = _cache_tensors(_output_cache(out))
    spec = DecoderSpec(num_layers=len(flat) // 2, kv_heads=[t.shape[1] for t in flat[::2]],
                       head_size=[t.shape[-1] for t in flat[::2]], cache_arg=cache_arg,
                       position_ids="position_ids" in params, dtype=flat[0].dtype)
    spec.inputs = ["input_ids", "attention_mask", *(["position_ids"] if spec.position_ids else []), *spec.past_names]
    spec.outputs = ["logits", *spec.present_names]
    return spec


class _DecoderWithPast(nn.Module):
    """The model with its past as flat tensors: builds a DynamicCache, returns logits + present."""

    def __init__(self, model: nn.Module, spec: DecoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        spec = self.spec
        position_ids, past = (rest[0], rest[1:]) if spec.position_ids else (None, rest)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(spec.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=getattr(self.model, "config", None))
        kwargs = {"position_ids": position_ids} if spec.position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{spec.cache_arg: cache}, **kwargs)
        return (out.logits, *_cache_tensors(_output_cache(out)))


def export_decoder(model: nn.Module, path: str | os.PathLike | None = None, *, inline: bool = False):
    """Export a converted causal LM as one decoder with past (prefill and decode); returns the
    onnx.ModelProto (also saved to `path`). Raises GenerationExportError naming what is missing."""
    if not is_converted(model):
        raise TypeError(f"export_decoder expects a model converted by attnres_compile.convert(), got "
                        f"{type(model).__name__}")
    return _export_decoder(model, path, inline=inline)


def _export_decoder(model: nn.Module, path=None, *, inline: bool = False):
    """export_decoder without the converted-model check (benchmarks export the original too)."""
    from torch.export import Dim

    was_training = model.training
    model.eval()
    try:
        spec = decoder_spec(model)
        wrapper = _DecoderWithPast(model, spec).eval()
        ref = next(p for p in model.parameters() if p.is_floating_point())
        b, t, p_len = 2, 3, 4  # sample sizes >= 2: no 0/1 specialisation
        ids = torch.ones(b, t, dtype=torch.long, device=ref.device)
        mask = torch.ones(b, p_len + t, dtype=torch.long, device=ref.device)
        args = [ids, mask]
        if spec.position_ids:
            args.append(torch.arange(p_len, p_len + t, device=ref.device).expand(b, t))
        args += [torch.zeros(b, h, p_len, d, dtype=spec.dtype, device=ref.device)
                 for h, d in zip(spec.kv_heads, spec.head_size) for _ in ("key", "value")]
        batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence", min=0), Dim("total_sequence")
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                  "rest": (*([{0: batch, 1: seq}] if spec.position_ids else []),
                           *({0: batch, 2: past} for _ in spec.past_names))}
        program = torch.onnx.export(
            wrapper, tuple(args), dynamo=True, dynamic_shapes=shapes, input_names=spec.inputs,
            output_names=spec.outputs, custom_translation_table=translation_table(), opset_version=ONNX_OPSET,
            verbose=False)
    finally:
        model.train(was_training)
    return finish_proto(program.model_proto, path, inline=inline)


def write_genai_config(model: nn.Module, folder: str | os.PathLike, *, filename: str = "model.onnx",
                       spec: DecoderSpec | None = None) -> Path:
    """Write the genai_config.json onnxruntime-genai reads for a decoder exported by `export_decoder`."""
    config = getattr(model, "config", None)
    if config is None:
        raise GenerationExportError(f"{type(model).__name__} has no Hugging Face config: genai_config.json "
                                    "needs its vocabulary, token ids and context length")
    spec = spec or decoder_spec(model)
    if len(set(spec.kv_heads)) != 1 or len(set(spec.head_size)) != 1:
        raise GenerationExportError("onnxruntime-genai needs one kv-head count and one head size for all layers")
    gen = getattr(model, "generation_config", None)

    def token(name):
        value = getattr(gen, name, None) if gen is not None else None
        value = value if value is not None else getattr(config, name, None)
        return value if value is not None else 0

    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    data = {
        "model": {
            "bos_token_id": token("bos_token_id"),
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(spec.head_size[0]),
                "hidden_size": int(hidden),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if spec.position_ids else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(heads),
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": int(spec.kv_heads[0]),
            },
            "eos_token_id": token("eos_token_id"),
            "pad_token_id": token("pad_token_id"),
            "type": getattr(config, "model_type", "decoder"),
            "vocab_size": int(config.vocab_size),
        },
        "search": {"do_sample": False, "max_length": int(context), "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    out = Path(folder) / "genai_config.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def export_for_generation(model: nn.Module, folder: str | os.PathLike) -> Path:
    """`folder/model.onnx` (decoder with past) and `folder/genai_config.json`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = decoder_spec(model)
    export_decoder(model, folder / "model.onnx")
    write_genai_config(model, folder, spec=spec)
    return folder


# -- the generation loop -------------------------------------------------------------------------

def _session(model, fused: bool):
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if fused:
        return ort_session(model, fused=True)
    if not isinstance(model, (str, bytes, os.PathLike)):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _warpers(temperature: float, top_k: int | None, top_p: float | None):
    """transformers' sampling warpers, in generate()'s order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if temperature is not None and temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return out


def _position_ids(mask: torch.Tensor, new: int) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)  # as transformers' prepare_inputs_for_generation
    return pos[:, -new:]


@torch.no_grad()
def ort_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float | None = 1.0, eos_token_id=None,
                 pad_token_id: int | None = None, fused: bool = False, streamer=None) -> torch.Tensor:
    """Generate with an onnxruntime session of an exported decoder; returns [batch, prompt + new].

    Args:
        model: a session, a path, bytes or a ModelProto of `export_decoder` (with past), or of
            `export_onnx` (no past: the whole prefix is recomputed at every step).
        input_ids, attention_mask: the prompt [batch, prompt] (left padding, as for generate()).
        max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id: as
            transformers' generate(); sampling draws from torch's global generator, so
            ``torch.manual_seed(s)`` before both gives the same tokens.
        fused: build the session with the fused DepthAttention kernel (`ort_session`).
        streamer: an object with put(tokens) and end(), as transformers' TextStreamer.
    """
    session = _session(model, fused)
    names = [i.name for i in session.get_inputs()]
    with_past = any(n.startswith("past_key_values.") for n in names)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    warpers = _warpers(temperature, top_k, top_p) if do_sample else []
    batch = input_ids.shape[0]
    tokens, mask = input_ids.clone(), attention_mask.clone()
    past = {}
    if with_past:
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                shape = [batch, i.shape[1], 0, i.shape[3]]
                past[i.name] = torch.zeros(shape, dtype=_np_dtype(i.type)).numpy()
    if streamer is not None:
        streamer.put(tokens.cpu())
    step_ids = tokens
    unfinished = torch.ones(batch, dtype=torch.bool)
    present_names = [o.name for o in session.get_outputs()][1:]
    for _ in range(max_new_tokens):
        feed_ids = step_ids if with_past else tokens
        feed = {"input_ids": feed_ids.numpy(), "attention_mask": mask.numpy()}
        if "position_ids" in names:
            feed["position_ids"] = _position_ids(mask, feed_ids.shape[1]).numpy()
        feed.update(past)
        outs = session.run(None, feed)
        scores = torch.from_numpy(outs[0][:, -1, :]).float()
        if do_sample:
            for w in warpers:
                scores = w(tokens, scores)
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        if eos:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        tokens = torch.cat([tokens, nxt[:, None]], dim=-1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos:
            unfinished &= ~torch.isin(nxt, torch.tensor(eos))
            if not unfinished.any():
                break
        step_ids = nxt[:, None]
        if with_past:
            past = dict(zip((n.replace("present.", "past_key_values.") for n in present_names), outs[1:]))
    if streamer is not None:
        streamer.end()
    return tokens


def _np_dtype(ort_type: str) -> torch.dtype:
    return {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
            "tensor(bfloat16)": torch.bfloat16}.get(ort_type, torch.float32)
