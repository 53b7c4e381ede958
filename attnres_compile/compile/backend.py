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

Options: `weights`, and the fields of AttnResConfig (plan/config.py): `preserve` ("exact" by
default here), `num_blocks`, `block_size`, `eps`, `two_phase` (the two-phase schedule under
no_grad on CPU too; it is always used on CUDA), `decompose` (CPU: let Inductor generate the
sites; default True), `fuse` (CUDA: fuse each site with the partial-sum add before it or the
norm after it; default True). The graph passes are compile/passes/.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ..api import convert, is_converted, load_attnres_state_dict, read_attnres_file
from ..plan.config import AttnResConfig
from ..runtime import is_planned
from .passes import PassContext, is_depth_attention, run_passes

log = logging.getLogger("attnres_compile")

def _config(options: dict) -> AttnResConfig:
    """The backend's options (all but `weights`) as one AttnResConfig; exact mode by default."""
    known = sorted((*AttnResConfig.names(), "weights"))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) for the attnres backend: {unknown}; known: {known}")
    return AttnResConfig.from_options({k: v for k, v in options.items() if k != "weights"}, preserve="exact")


def _has_depth_attention(gm: torch.fx.GraphModule) -> bool:
    return any(is_depth_attention(n) for n in gm.graph.nodes)


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _layout_from_weights(weights) -> dict | None:
    """The layout saved with a weights file (validated: plan/format.py), None for a dict or none."""
    if isinstance(weights, dict) or weights is None:
        return None
    return read_attnres_file(weights, tensors=False)[1]


def _convert_unconverted(gm, example_inputs, options: dict):
    weights = options.get("weights")
    layout = _layout_from_weights(weights)
    config = _config(options)
    if layout and "preserve" not in options:
        config = config.replace(preserve=layout["preserve"])
    if layout and config.num_blocks is None and config.block_size is None and layout["chains"]:
        config = config.replace(block_size=layout["chains"][0]["block_size"])
    # Fresh tensors: capture marks its inputs' dynamic dims, which would break Dynamo's guards
    # on the caller's own tensors.
    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    # symbolic capture inside a backend breaks Dynamo's guards on the caller's frame; Dynamo
    # recompiles (and we reconvert) for new shapes
    converted = convert(gm, inputs, config=config.replace(dynamic=False))
    if weights is not None:
        load_attnres_state_dict(converted, weights)
    for p in converted.attnres.parameters():
        p.requires_grad_(False)  # constants of the compiled artefact
    log.info("attnres backend converted the captured graph:\n%s", converted.attnres_report)
    return converted


_FIX = ("the attnres backend converts one whole graph, and frame by frame each frame would become a stream of "
        "its own. Compile with fullgraph=True (and remove the break), or call attnres_compile.convert() first "
        "and compile the converted model")


def _compiled_frame():
    """(module, code name) of the frame Dynamo is compiling; (None, "") when unknown."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return (tx.f_locals.get("self"), tx.f_code.co_name) if tx is not None else (None, "")
    except Exception:  # noqa: BLE001 - Dynamo internals of another torch
        return None, ""


def _in_converted_model() -> bool:
    """Whether the frame being compiled belongs to a model converted by attnres_compile."""
    import sys


    child, _ = _compiled_frame()
    if isinstance(child, torch.nn.Module) and (is_planned(child) or is_converted(child)):
        return True
    f = sys._getframe(1)
    while f is not None:
        owner = f.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and is_planned(owner):
            return True
        f = f.f_back
    return False


def _refuse_split_model(gm) -> None:
    """An unconverted model that Dynamo split into frames would be converted frame by frame (a
    layer's frame compiled once and reused for every layer): refuse, naming the split."""
    import sys

    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        where = ""
        stack = getattr(reason, "user_stack", None) or []
        if stack:
            f = stack[-1]
            where = f" at {'/'.join(f.filename.split('/')[-2:])}:{f.lineno}"
        text = " ".join(str(reason.reason).split())[:200]
        raise ValueError(f"torch.compile split the unconverted model at a graph break{where} ({text}); {_FIX}")
    # A frame Dynamo could not trace runs eagerly and each module it calls is compiled on its own:
    # the compiled frame's module then sits inside a module whose forward is running right now.
    child, code = _compiled_frame()
    if not isinstance(child, torch.nn.Module):
        return
    f = sys._getframe(1)
    while f is not None:
        file = f.f_code.co_filename
        parent = f.f_locals.get("self") if f.f_code.co_name == "forward" else None
        if isinstance(parent, torch.nn.Module) and "/torch/" not in file and "attnres_compile" not in file:
            path = "" if parent is child else next((n for n, m in parent.named_modules() if m is child), None)
            if path is not None and (parent is not child or code != "forward"):
                what = f"{type(child).__name__}.{code}" + (f" ({path})" if path else "")
                raise ValueError(
                    f"torch.compile split the unconverted model into frames: it compiles {what} on its own, "
                    f"called from {type(parent).__name__}.forward at {'/'.join(file.split('/')[-2:])}:{f.f_lineno}, "
                    f"which runs eagerly (a graph break Dynamo could not handle in place); {_FIX}")
        f = f.f_back


def attnres_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None, **_):
    """Dynamo backend: lower depth attention and compile the rest with Inductor."""
    options = dict(options or {})
    if _has_depth_attention(gm):
        # The converted graph's sites, through the passes that apply (compile/passes/):
        # two-phase where gradients are off (a win with the CUDA kernels; on CPU the fused
        # single-pass op measured faster, docs/performance.md), the fused epilogues on CUDA,
        # Inductor-generated sites on CPU.
        on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        run_passes(gm, PassContext(cuda=on_cuda, grad=torch.is_grad_enabled(), config=_config(options)))
        return _inductor(gm, example_inputs)

    if _in_converted_model():
        # A frame of a converted model without sites (its embedding, its head, or a piece Dynamo
        # split off): its streams are converted already, it compiles as it is.
        return _inductor(gm, example_inputs)
    _refuse_split_model(gm)
    _config(options)  # an unknown or invalid option is refused now, not at the first call
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn(
            "torch.compile(backend='attnres') on an unconverted model holds the AttnRes parameters as "
            "constants: they do not train. To train AttnRes, call attnres_compile.convert(model, ...) "
            "and compile the converted module.",
            stacklevel=2,
        )
    if not any(isinstance(x, torch.SymInt) for x in example_inputs):
        _ShapeSpecialised(gm, options).converted_for(list(example_inputs))  # refuse now, not at the first call
    return _ShapeSpecialised(gm, options)


class _ShapeSpecialised:
    """Compiled artefacts of an unconverted Dynamo graph, one per concrete input signature.

    Dynamo may hand us a graph with dynamic sizes (SymInt inputs, after a recompile for a new
    shape); a capture needs concrete inputs, so the graph is converted at call time for each new
    (shapes, sizes, dtypes, grad mode) signature: converted with the real inputs (static capture),
    traced to one ATen graph in which the AttnRes weights are constants, and compiled by this
    backend's converted-graph branch. Nothing is captured inside Dynamo's own trace, so no guard
    of the caller's frame (or of a later compile) depends on it.
    """

    def __init__(self, gm, options: dict):
        self.gm, self.options = gm, options
        self.converted = {}
        self.cache = {}

    @staticmethod
    def _key(args):
        return (torch.is_grad_enabled(),) + tuple(
            (tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)

    def converted_for(self, args):
        key = self._key(args)
        conv = self.converted.get(key)
        if conv is None:
            conv = self.converted[key] = _convert_unconverted(self.gm, args, self.options)
        return conv

    def __call__(self, *args):
        key = self._key(args)
        fn = self.cache.get(key)
        if fn is None:
            from torch.fx.experimental.proxy_tensor import make_fx

            converted = self.converted_for(list(args))
            flat = make_fx(converted, tracing_mode="real", pre_dispatch=True)(*args)
            fn = self.cache[key] = attnres_backend(flat, list(args))
        return fn(*args)
