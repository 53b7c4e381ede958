"""The module `convert()` returns: rewritten graphs plus the parameters they read.

Mode-dependent behaviour (dropout, batch-norm statistics, `if self.training:` in the model's
code) is baked into a captured graph, so conversion captures the model in train *and* eval
mode and this module runs the graph matching `self.training`. Both graphs read one set of
parameters and buffers, laid out under the original module paths, so `state_dict()` keys are
the original model's plus `attnres.*`.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from .report import ConversionReport


def _resolve(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has(root: nn.Module, target: str) -> bool:
    try:
        _resolve(root, target)
        return True
    except AttributeError:
        return False


def _with_forward_signature(cls, generated_forward, constant_kwargs: dict):
    """A subclass whose forward advertises the model's own argument names.

    torch.export and the ONNX exporter match `dynamic_shapes` against inspect.signature(forward);
    with the model's names (`input_ids`, `use_cache=False`) they work as on the original model.
    """
    params = list(inspect.signature(generated_forward).parameters.values())
    out = [params[0]]
    for p in params[1:]:
        if p.name in constant_kwargs:
            p = p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=constant_kwargs[p.name])
        out.append(p)
    out.sort(key=lambda p: p.kind)  # positional first, then keyword-only (stable)

    def forward(self, *args, **kwargs):
        return AttnResModule.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(out)
    forward.__doc__ = AttnResModule.forward.__doc__
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


class _Specs:
    def __init__(self, in_spec, out_spec):
        self.in_spec, self.out_spec = in_spec, out_spec

    def __deepcopy__(self, memo):
        return self


class AttnResModule(nn.Module):
    """A model converted to Block Attention Residuals. Train, save and load it like any module.

    Attributes:
        attnres: the new parameters, `attnres.chain<c>.<site>.{query,norm_weight}`.
        attnres_report: the ConversionReport (print it, or `.to_dict()`).
    """

    def __init__(self, train_gm: GraphModule, eval_gm: GraphModule | None,
                 report: ConversionReport, constant_kwargs: dict, model_name: str):
        super().__init__()
        # Adopt the captured module tree: same objects, so both graphs share parameters.
        for name, child in train_gm.named_children():
            self.add_module(name, child)
        for name, p in train_gm._parameters.items():
            self.register_parameter(name, p)
        for name, b in train_gm._buffers.items():
            self.register_buffer(name, b, persistent=name not in train_gm._non_persistent_buffers_set)
        self._specs = _Specs(train_gm._in_spec, train_gm._out_spec)
        self._constant_kwargs = constant_kwargs
        self._model_name = model_name
        self.attnres_report = report

        train_graph = self._adopt_graph(train_gm, "train")
        graphs = {"train": train_graph}
        if eval_gm is not None:
            if eval_gm._in_spec != train_gm._in_spec or eval_gm._out_spec != train_gm._out_spec:
                raise RuntimeError("internal error: train and eval captures disagree on input/output structure")
            graphs["eval"] = self._adopt_graph(eval_gm, "eval")
        else:
            graphs["eval"] = train_graph
        self._graphs = graphs
        self._compile()
        self.__class__ = _with_forward_signature(type(self), self._forward_fns["train"], constant_kwargs)

    # The generated forward reads self._in_spec / self._out_spec (pytree structure of inputs
    # and outputs); they are immutable, so copies of this module share them.
    @property
    def _in_spec(self):
        return self._specs.in_spec

    @property
    def _out_spec(self):
        return self._specs.out_spec

    # -- graphs ----------------------------------------------------------------------------
    def _adopt_graph(self, gm: GraphModule, mode: str) -> Graph:
        """Make every attribute `gm`'s graph reads resolve on self to the very same object."""
        graph = gm.graph
        for node in graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            obj = _resolve(gm, node.target)
            if _has(self, node.target) and _resolve(self, node.target) is obj:
                continue
            new = f"_{mode}_" + node.target.replace(".", "_")
            if isinstance(obj, nn.Module):
                self.add_module(new, obj)
            elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
                # tensor constants: buffers so .to() moves them, non-persistent so state_dict skips them
                self.register_buffer(new, obj, persistent=False)
            else:
                setattr(self, new, obj)
            node.target = new

        return graph

    def _compile(self) -> None:
        fns = {}
        for mode, graph in self._graphs.items():
            if mode == "eval" and graph is self._graphs["train"]:
                fns[mode] = fns["train"]
                continue
            # GraphModule generates forward(self, ...) from the graph; we run it with self = this
            # module, whose attributes are the ones the graph reads.
            fns[mode] = type(GraphModule(self, graph, class_name=f"AttnRes{mode.title()}Graph")).forward
        self._forward_fns = fns

    def _no_grad_forward(self, mode: str):
        """The mode's graph with its sites in the two-phase schedule (built on first use)."""
        key = f"{mode}_no_grad"
        fn = self._forward_fns.get(key)
        if fn is None:
            from .passes.two_phase import to_two_phase

            gm = GraphModule(self, copy.deepcopy(self._graphs[mode]), class_name=f"AttnRes{mode.title()}NoGrad")
            fn = type(gm).forward if to_two_phase(gm) else self._forward_fns[mode]
            self._forward_fns[key] = fn
        return fn

    @property
    def graph(self) -> Graph:
        """The rewritten graph for the current mode."""
        return self._graphs["train" if self.training else "eval"]

    @property
    def code(self) -> str:
        return self.graph.python_code(root_module="self").src

    def forward(self, *args, **kwargs):
        """Run the rewritten graph of the current mode; arguments as the original model's."""
        for key, value in self._constant_kwargs.items():
            if key not in kwargs:
                kwargs[key] = value
            elif kwargs[key] != value:
                raise ValueError(
                    f"keyword argument {key}={kwargs[key]!r} differs from the value {value!r} the model "
                    f"was converted with; non-tensor arguments are fixed at conversion"
                )
        mode = "train" if self.training else "eval"
        if (not torch.is_grad_enabled() and _on_cuda(args)
                and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())):
            # Gradients off in eager on CUDA: serve the two-phase schedule (SPEC section 3). On
            # CPU the fused single-pass op is faster (docs/performance.md). Graph capture keeps
            # the plain op: the backend applies two-phase itself, and exported programs (ONNX)
            # stay one node per site.
            return self._no_grad_forward(mode)(self, *args, **kwargs)
        return self._forward_fns[mode](self, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_forward_fns", None)  # generated code: rebuilt from the graphs on load
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def extra_repr(self) -> str:
        r = self.attnres_report
        return f"model={self._model_name}, chains={len(r.chains)}, sites={r.num_sites}, preserve={r.preserve!r}"
