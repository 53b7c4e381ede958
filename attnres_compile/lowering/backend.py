"""The `attnres` torch.compile backend.

    torch.compile(converted, backend="attnres")                 # a module from convert()
    torch.compile(model, backend="attnres")                     # unconverted: exact, zero weights
    torch.compile(model, backend="attnres", options={"weights": "attnres.safetensors"})

Registered through the `torch_dynamo_backends` entry point, so `"attnres" in
torch._dynamo.list_backends()` after `pip install`.

* **Converted modules** (the graph holds `attnres::depth_attention` nodes): with gradients off
  the sites are rewritten to the two-phase schedule (SPEC section 3) when the two-phase ops
  are available; then Inductor compiles the graph. The depth-attention ops are registered
  with `torch.library.triton_op` where Triton is available, so Inductor sees their kernels on
  CUDA; on CPU they run their compiled CPU path.
* **Unconverted models**: the backend converts the captured graph itself. The new AttnRes
  parameters are constants of the compiled artefact, zero (with `preserve="exact"`, so outputs
  are unchanged) or loaded from `options["weights"]` (a state dict or a safetensors file from
  `save_attnres`). A backend cannot hand new parameters to an optimizer: to *train* AttnRes,
  `convert()` the model first; the backend warns when it sees gradients flowing.

Options: `weights`, `preserve` ("exact" by default), `num_blocks`, `block_size`, `eps`,
`two_phase` (force the two-phase schedule under no_grad on CPU too; it is always used on CUDA).
"""

from __future__ import annotations

import json
import logging
import warnings

import torch

log = logging.getLogger("attnres_compile")

_OPTION_KEYS = {"weights", "preserve", "num_blocks", "block_size", "eps", "two_phase"}


def _has_depth_attention(gm: torch.fx.GraphModule) -> bool:
    from ..passes.two_phase import is_depth_attention

    return any(is_depth_attention(n) for n in gm.graph.nodes)


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _layout_from_weights(weights) -> dict | None:
    if isinstance(weights, dict) or weights is None:
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["attnres_layout"]) if "attnres_layout" in meta else None


def _convert_unconverted(gm, example_inputs, options: dict):
    from ..api import convert, load_attnres_state_dict

    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise ValueError(f"unknown option(s) for the attnres backend: {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
    weights = options.get("weights")
    layout = _layout_from_weights(weights)
    preserve = options.get("preserve", layout["preserve"] if layout else "exact")
    num_blocks, block_size = options.get("num_blocks"), options.get("block_size")
    if layout and num_blocks is None and block_size is None and layout["chains"]:
        block_size = layout["chains"][0]["block_size"]
    # Fresh tensors: capture marks its inputs' dynamic dims, which would break Dynamo's guards
    # on the caller's own tensors.
    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    converted = convert(gm, inputs, preserve=preserve, num_blocks=num_blocks,
                        block_size=block_size, eps=options.get("eps"),
                        # symbolic capture inside a backend breaks Dynamo's guards on the
                        # caller's frame; Dynamo recompiles (and we reconvert) for new shapes
                        dynamic=False)
    if weights is not None:
        load_attnres_state_dict(converted, weights)
    for p in converted.attnres.parameters():
        p.requires_grad_(False)  # constants of the compiled artefact
    log.info("attnres backend converted the captured graph:\n%s", converted.attnres_report)
    return converted


def attnres_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None, **_):
    """Dynamo backend: lower depth attention and compile the rest with Inductor."""
    options = dict(options or {})
    if _has_depth_attention(gm):
        unknown = set(options) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown option(s) for the attnres backend: {sorted(unknown)}")
        on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        if not torch.is_grad_enabled() and (on_cuda or options.get("two_phase", False)):
            # two-phase serves S sites with one read of the completed blocks: a win with the
            # CUDA kernels; on CPU the fused single-pass op measured faster (docs/performance.md)
            from ..passes.two_phase import to_two_phase

            to_two_phase(gm)
        return _inductor(gm, example_inputs)

    converted = _convert_unconverted(gm, example_inputs, options)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn(
            "torch.compile(backend='attnres') on an unconverted model holds the AttnRes parameters as "
            "constants: they do not train. To train AttnRes, call attnres_compile.convert(model, ...) "
            "and compile the converted module.",
            stacklevel=2,
        )
    return _ShapeSpecialised(converted)


class _ShapeSpecialised:
    """Compiled artefacts of a converted graph, one per input signature.

    The converted module is traced to a flat ATen graph (its AttnRes parameters become
    constants of that graph) and compiled by this backend's converted-graph branch. Dynamo
    may call us with inputs of other sizes than the first (dynamic shapes); each new
    (shape, dtype, grad mode) signature is traced and compiled once.
    """

    def __init__(self, converted):
        self.converted = converted
        self.cache = {}

    def __call__(self, *args):
        key = (torch.is_grad_enabled(),) + tuple(
            (tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
        )
        fn = self.cache.get(key)
        if fn is None:
            from torch.fx.experimental.proxy_tensor import make_fx

            flat = make_fx(self.converted, tracing_mode="real", pre_dispatch=True)(*args)
            fn = self.cache[key] = attnres_backend(flat, list(args))
        return fn(*args)
