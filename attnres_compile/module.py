"""The module `convert()` returns: rewritten graphs plus the parameters they read.

Mode-dependent behaviour (dropout, batch-norm statistics, `if self.training:` in the model's
code) is baked into a captured graph, so conversion captures the model in train *and* eval
mode and this module runs the graph matching `self.training`. Both graphs read one set of
parameters and buffers, laid out under the original module paths, so `state_dict()` keys are
the original model's plus `attnres.*`.

A captured graph also bakes in the capture's floating dtype and device (casts such as Hugging
Face's `hidden_states.to(input_dtype)`, `dtype=`/`device=` arguments of mask and position
tensors, `torch.finfo(dtype).min` fill values). `.to(dtype)`, `.half()`, `.cuda()` and the like
retarget those values in both graphs (see `_retarget`), always starting from the values as
captured, so round trips give the captured graphs back.
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


_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CAST_OPS = None


def _cast_ops():
    global _CAST_OPS
    if _CAST_OPS is None:
        aten = torch.ops.aten
        _CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}
    return _CAST_OPS


def _float_constants(dtype: torch.dtype) -> dict[float, str]:
    fi = torch.finfo(dtype)
    return {float(fi.min): "min", float(fi.max): "max"}


def _retargetable(value, dtype, device) -> bool:
    if isinstance(value, torch.dtype):
        return value == dtype
    if isinstance(value, torch.device):
        return value == device
    if isinstance(value, float) and dtype is not None:
        return value in _float_constants(dtype)
    return False


def _dominant(tensors) -> tuple[torch.dtype | None, bool, torch.device | None, bool]:
    """(floating dtype, whether it is the only one, device, whether it is the only one)."""
    dtypes, devices = {}, {}
    for t in tensors:
        if t.is_floating_point():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel()
        devices[t.device] = devices.get(t.device, 0) + t.numel()
    dtype = max(dtypes, key=dtypes.get) if dtypes else None
    device = max(devices, key=devices.get) if devices else None
    return dtype, len(dtypes) <= 1, device, len(devices) <= 1


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
        tensors = [*self.parameters(), *self.buffers()]
        dtype, one_dtype, device, _ = _dominant(tensors)
        # Values captured: the graphs are retargeted from these on every dtype or device change.
        self._capture_dtype = dtype if dtype in _FLOAT_RANK else None
        self._capture_mixed = None if one_dtype else sorted(
            {str(t.dtype).replace("torch.", "") for t in tensors if t.is_floating_point()})
        self._capture_device = device
        self._graph_dtype, self._graph_device = self._capture_dtype, device
        self._record_captured_values()
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

    def _distinct_graphs(self) -> list[Graph]:
        """Both graphs, and those of nested graph modules (higher-order ops such as
        `wrap_with_set_grad_enabled` around Hugging Face's rotary embedding)."""
        out = []
        for g in [*self._graphs.values(), *(m.graph for m in self._nested_graph_modules())]:
            if all(g is not o for o in out):
                out.append(g)
        return out

    def _nested_graph_modules(self) -> list[GraphModule]:
        return [m for m in self.modules() if isinstance(m, GraphModule)]

    def _record_captured_values(self) -> None:
        """Remember, on each node, the dtype/device/finfo arguments as captured."""
        dtype, device = self._capture_dtype, self._capture_device
        for graph in self._distinct_graphs():
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                found = {}
                for i, a in enumerate(node.args):
                    if _retargetable(a, dtype, device):
                        found[("args", i)] = a
                for k, a in node.kwargs.items():
                    if _retargetable(a, dtype, device):
                        found[("kwargs", k)] = a
                if found:
                    node.meta["attnres_captured"] = found

    def _target_of(self, fn) -> tuple[torch.dtype | None, torch.device | None]:
        """The floating dtype and device `fn` (what `_apply` maps over tensors) moves us to."""
        if self._graph_dtype is None and self._graph_device is None:
            return None, None
        probe = torch.empty(0, dtype=self._graph_dtype or torch.float32, device=self._graph_device)
        try:
            out = fn(probe)
        except Exception:  # not a conversion we can read; nothing to retarget
            return self._graph_dtype, self._graph_device
        if not isinstance(out, torch.Tensor):
            return self._graph_dtype, self._graph_device
        dtype = out.dtype if self._graph_dtype is not None else None
        return dtype, out.device

    def _apply(self, fn, recurse=True):
        dtype, device = self._target_of(fn)
        if dtype != self._graph_dtype:
            self._check_dtype_change(dtype)
        out = super()._apply(fn, recurse)
        if dtype != self._graph_dtype or device != self._graph_device:
            self._retarget(dtype, device)
        return out

    def _check_dtype_change(self, dtype) -> None:
        name, cap = self._model_name, self._capture_dtype
        fix = (f"call model.to({dtype}) on the original model before attnres_compile.convert() "
               f"instead of converting first")
        if self._capture_mixed is not None:
            raise TypeError(
                f"cannot change the dtype of the converted {name} to {dtype}: its parameters and buffers had "
                f"several floating dtypes at conversion ({', '.join(self._capture_mixed)}), so the captured "
                f"graphs' casts cannot be mapped to one new dtype; {fix}"
            )
        if dtype not in _FLOAT_RANK or cap is None:
            raise TypeError(f"cannot change the dtype of the converted {name} from {cap} to {dtype}: "
                            f"only float16, bfloat16, float32 and float64 are supported; {fix}")

    def _retarget(self, dtype, device) -> None:
        """Rewrite the captured dtype/device values of both graphs for the module's new ones.

        Mapping from the captured values (capture dtype C, device D) to the new ones (N, E):
        every `torch.dtype` argument equal to C becomes N (casts to the model's dtype, `dtype=`
        of masks), `torch.finfo(C).min/max` fill values become those of N, every device D
        becomes E. One exception keeps numerics: a cast of an integer tensor to float32
        (`position.float()`: relative-position buckets, rotary angles) stays float32, since
        low-precision floats cannot hold large positions. The captured metadata asserts
        (`_assert_tensor_metadata`) stop checking a dtype/device that changed.
        """
        cap, cap_dev = self._capture_dtype, self._capture_device
        new_dtype = dtype if dtype is not None else cap
        new_dev = device if device is not None else cap_dev
        casts = _cast_ops()
        for graph in self._distinct_graphs():
            for node in graph.nodes:
                found = node.meta.get("attnres_captured")
                if not found:
                    continue
                for (where, key), old in found.items():
                    if isinstance(old, torch.dtype):
                        new = new_dtype
                        if (old == torch.float32 and node.target in casts and node.args
                                and isinstance(node.args[0], torch.fx.Node)):
                            src = node.args[0].meta.get("val")
                            if isinstance(src, torch.Tensor) and not src.is_floating_point() \
                                    and src.dtype != torch.bool:
                                new = old
                    elif isinstance(old, torch.device):
                        new = new_dev
                    else:  # finfo(C).min / max
                        which = _float_constants(cap)[old]
                        new = float(getattr(torch.finfo(new_dtype), which))
                    if node.target is torch.ops.aten._assert_tensor_metadata.default and new != old:
                        new = None  # a check of the capture's dtype/device: off once they change
                    if where == "args":
                        node.update_arg(key, new)
                    else:
                        node.update_kwarg(key, new)
        for gm in self._nested_graph_modules():
            gm.recompile()
        self._graph_dtype, self._graph_device = (dtype, device)
        self._compile()

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
