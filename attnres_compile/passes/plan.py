"""The conversion plan: what `convert()` decided, fixed once and served at every call.

The match step (find_chains.py) runs on a captured graph; the plan it leads to names
everything by things that outlive that graph:

* each residual add by where it runs: the module whose forward runs it (its path in the
  model), the code location (file, line, and the line's text, checked when a plan is installed
  again), and which operand carries the stream;
* each chain by the module that owns it (the innermost module on the call stack of every
  link), its block size, feature axis and width;
* each site by its sources, eps, scale and parameter name.

So one plan serves every call structure of the model (other keywords, shapes, modes, dtypes,
caches), every later capture of it (torch.export, torch.compile, ONNX) and a saved model
loaded in another process (`to_dict` / `from_dict`: JSON, stored in a Hugging Face config).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch
from torch.fx import Node

from .find_chains import Chain
from .graph_utils import COPY_OPS, call_site, module_path, static_int, tensor_meta
from .schedule import SiteSchedule, block_schedule

PLAN_VERSION = 1


@dataclass
class SitePlan:
    """One depth-attention site of a chain (reported, and used to build its parameters)."""

    chain: int
    name: str                 # "site3" or "final"
    schedule: SiteSchedule
    eps: float
    scale: float
    module: str               # sublayer module path ("" for final)
    dim: int
    dtype: torch.dtype
    device: torch.device
    param_prefix: str | None  # "attnres.chain0.site3" or None for an identity site
    reads: list[str] = field(default_factory=list)  # captured nodes that read the site's output


def plan_chain(chain: Chain, chain_index: int, block_size: int, *, preserve: str,
               eps: float | None) -> list[SitePlan]:
    """Sites of a chain with their eps and scale."""
    val = tensor_meta(chain.start)
    dim = static_int(val.shape[chain.feature_axis])
    plans = []
    for sched in block_schedule(len(chain.links), block_size):
        if sched.sublayer is None:
            name, module, found = "final", "", chain.final.eps if chain.final else None
        else:
            link = chain.links[sched.sublayer]
            name, module = f"site{sched.sublayer}", link.module
            found = link.prenorm.eps if link.prenorm else None
        site_eps = eps if eps is not None else (found if found else 1e-6)
        m = sched.num_sources
        plans.append(SitePlan(
            chain=chain_index, name=name, schedule=sched, eps=float(site_eps),
            scale=float(m) if preserve == "exact" else 1.0, module=module, dim=dim,
            dtype=val.dtype, device=val.device,
            param_prefix=None if m == 1 else f"attnres.chain{chain_index}.{name}",
        ))
    return plans


@dataclass(frozen=True)
class AddSite:
    """Where one add of a residual link runs, as the converted model meets it at call time."""

    container: str            # path of the module whose forward (or a helper it calls) runs it
    file: str                 # code file relative to its module's folder (never an absolute path:
    #                           plans travel in checkpoints); runtime/replay.py finds it again
    module_name: str | None   # the Python module of that file, to find it in another process
    line: int
    func: str
    code: str                 # the line's text: a plan installed on other code is refused
    stream_arg: int           # 0 or 1: the operand that carries the stream
    inplace: bool
    lasti: int | None = None  # bytecode offset of the add (a line may hold several); None: any
    cols: tuple[int, int] | None = None  # its column span, for Dynamo (whose offsets differ)

    def where(self) -> str:
        short = "/".join(self.file.split("/")[-2:])
        return f"{short}:{self.line} in {self.func}: {self.code}"


@dataclass(frozen=True)
class LinkPlan:
    add: AddSite                       # produces the next stream value
    absorbed: tuple[AddSite, ...] = ()  # inner adds of a parallel residual, in run order
    sublayer: str = ""                 # the sublayer's module path (for messages)


@dataclass
class ChainPlan:
    index: int
    owner: str                 # module path whose forward runs the whole chain
    block_size: int
    feature_axis: int          # -1, or 1 for channels-first (NCHW) streams
    dim: int
    links: list[LinkPlan]
    sites: list[SitePlan]

    def site_for(self, sublayer: int | None) -> SitePlan:
        """The site that feeds sublayer `sublayer` (None: the final consumer)."""
        return self.sites[-1] if sublayer is None else self.sites[sublayer]


@dataclass
class ConversionPlan:
    model: str                 # class name of the converted model
    preserve: str
    chains: list[ChainPlan]
    version: int = PLAN_VERSION
    python: str = f"{sys.version_info[0]}.{sys.version_info[1]}"  # bytecode offsets are per version
    # What a re-derivation needs when the model's code moved (runtime/replay.py): convert()'s
    # options, the example inputs' structure (tensor shapes and dtypes, plain values), and the
    # versions the plan was made under (for messages).
    options: dict = field(default_factory=dict)
    inputs: dict | None = None
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form (dtypes and devices as strings)."""
        chains = []
        for c in self.chains:
            sites = []
            for s in c.sites:
                sd = asdict(s)
                sd["schedule"] = asdict(s.schedule)
                sd["dtype"] = str(s.dtype).replace("torch.", "")
                sd["device"] = str(s.device)
                sd.pop("reads", None)
                sites.append(sd)
            chains.append({
                "index": c.index, "owner": c.owner, "block_size": c.block_size,
                "feature_axis": c.feature_axis, "dim": c.dim,
                "links": [asdict(lk) for lk in c.links], "sites": sites,
            })
        return {"version": self.version, "model": self.model, "preserve": self.preserve, "python": self.python,
                "options": dict(self.options), "inputs": self.inputs, "versions": dict(self.versions),
                "chains": chains}

    @classmethod
    def from_dict(cls, d: dict) -> ConversionPlan:
        if not isinstance(d, dict) or "chains" not in d:
            raise ValueError("not an attnres conversion plan (expected a dict with 'chains')")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"attnres plan version {d.get('version')!r} is not supported "
                             f"(this attnres_compile reads version {PLAN_VERSION})")
        chains = []
        for c in d["chains"]:
            links = [LinkPlan(add=_add_site(lk["add"]), absorbed=tuple(_add_site(a) for a in lk["absorbed"]),
                              sublayer=lk.get("sublayer", "")) for lk in c["links"]]
            sites = []
            for s in c["sites"]:
                sched = s["schedule"]
                sites.append(SitePlan(
                    chain=s["chain"], name=s["name"],
                    schedule=SiteSchedule(sched["sublayer"], sched["block"], tuple(sched["sources"])),
                    eps=float(s["eps"]), scale=float(s["scale"]), module=s["module"], dim=int(s["dim"]),
                    dtype=getattr(torch, s["dtype"]), device=torch.device(s["device"]),
                    param_prefix=s["param_prefix"],
                ))
            chains.append(ChainPlan(index=c["index"], owner=c["owner"], block_size=c["block_size"],
                                    feature_axis=c["feature_axis"], dim=c["dim"], links=links, sites=sites))
        return cls(model=d["model"], preserve=d["preserve"], chains=chains, python=d.get("python", ""),
                   options=dict(d.get("options") or {}), inputs=d.get("inputs"),
                   versions=dict(d.get("versions") or {}))


def _add_site(d: dict) -> AddSite:
    d = dict(d)
    if d.get("cols") is not None:
        d["cols"] = tuple(d["cols"])  # JSON has lists
    return AddSite(**d)


# -- from a captured chain ---------------------------------------------------------------------

def _module_of_file(path: str) -> str | None:
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and f == path:
            return name
    return None


def portable_file(path: str, module_name: str | None) -> str:
    """`path` as a plan stores it: relative to the folder of its module (`modeling_llama.py`
    for transformers.models.llama.modeling_llama), or to the working directory; generated code
    ("<...>") as it is. Never absolute: a checkpoint must not carry the converting machine's paths."""
    import os

    if path.startswith("<") or not os.path.isabs(path):
        return path
    if module_name:
        return os.path.basename(path)
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.basename(path)


def add_site(add: Node, branch: Node, calls: dict | None = None) -> AddSite:
    """The AddSite of a residual add node whose sublayer-output operand is `branch`.

    `calls` maps add nodes to the calls recorded at capture (capture.add_calls): where the code
    really ran. Without one, the node's stack trace and module stack say it (lines only).
    """
    site = call_site(add)
    call = (calls or {}).get(add)
    if site is None and call is None:
        raise RuntimeError(f"internal error: residual add {add.name} carries no stack trace to find it at call time")
    path, line, func, code = site if site is not None else (call.file, call.line, "", "")
    container, lasti = module_path(add), None
    if call is not None:
        if (call.file, call.line) != (path, line):  # e.g. a GraphModule's code, whose nodes quote the original
            import linecache

            path, line, code = call.file, call.line, linecache.getline(call.file, call.line).strip()
        container = call.container if call.container is not None else container
        lasti, cols = call.lasti, call.cols
    else:
        cols = None
    first = add.args[0]
    branch_first = first is branch or (isinstance(first, Node) and first.target in COPY_OPS and first.args
                                       and first.args[0] is branch)  # `y = f(x).clone(); y += x`
    module_name = _module_of_file(path)
    return AddSite(container=container, file=portable_file(path, module_name), module_name=module_name, line=line,
                   func=func, code=code, stream_arg=1 if branch_first else 0,
                   inplace="add_" in str(add.target), lasti=lasti, cols=cols)


def _call_stack(node: Node) -> list[str]:
    from .graph_utils import _clean_path

    return [_clean_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def chain_owner(chain: Chain) -> str:
    """The innermost module on the call stack of every link's add: its forward runs the chain."""
    stacks = [_call_stack(a) for link in chain.links for a in link.adds]
    common = stacks[0] if stacks else []
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def link_plan(link, calls: dict | None = None) -> LinkPlan:
    """The LinkPlan of a find_chains Link: a parallel link's k-th add adds branch k."""
    adds = link.adds  # absorbed inner adds first, the outer add last
    sites = [add_site(a, b, calls) for a, b in zip(adds, link.branches)]
    return LinkPlan(add=sites[-1], absorbed=tuple(sites[:-1]), sublayer=link.module)


def chain_plan(chain: Chain, index: int, block_size: int, sites: list[SitePlan],
               calls: dict | None = None, root=None) -> ChainPlan:
    """`root`: the captured module; an owner path it lacks (a graph module's nodes quote the
    original model's module paths) falls back to the root."""
    owner = chain_owner(chain)
    if root is not None and owner:
        try:
            root.get_submodule(owner)
        except AttributeError:
            owner = ""
    return ChainPlan(index=index, owner=owner, block_size=block_size,
                     feature_axis=chain.feature_axis, dim=sites[0].dim,
                     links=[link_plan(lk, calls) for lk in chain.links], sites=sites)
