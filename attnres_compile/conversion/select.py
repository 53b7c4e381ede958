"""Which captured chains a conversion takes: the user's filter, PreNorm, and the pairing of the
train and eval captures (one set of AttnRes parameters serves both modes)."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan.config import AttnResConfig
from .blocks import layer_structure, resolve_block_size
from .build import chain_owner, plan_chain
from .find_chains import StreamAnalysis
from .graph_utils import module_path, source_line


@dataclass(frozen=True)
class ChainInfo:
    """What `convert(filter_fn=...)` sees of a residual chain."""

    owner: str                  # module path whose forward runs the chain ('' for the root)
    sublayers: tuple[str, ...]  # module path of each sublayer, in order
    start: str                  # where the stream starts (source line)

    @classmethod
    def of(cls, chain) -> ChainInfo:
        return cls(owner=chain_owner(chain), sublayers=tuple(lk.module for lk in chain.links),
                   start=source_line(chain.start) or chain.start.name)


def select_chains(analysis: StreamAnalysis, config: AttnResConfig, *, skip=(), pairs=None, graph=False):
    """(chains with their block size, the sites of each, refused chains with the reason) of a
    capture's streams under `config`; `skip` chains are already refused (mode mismatch), `pairs`
    maps a train chain to its eval twin, `graph`: the conversion rewrites a graph module."""
    preserve, filter_fn = config.preserve, config.filter_fn
    skip_ids = {id(c) for c, _ in skip}
    chains, plans, refused = [], [], []
    for chain in analysis.chains:
        if id(chain) in skip_ids:
            continue
        if graph and chain.reshaped:
            refused.append((chain, "the stream changes its token layout between sublayers (a reshape of the "
                                   "tokens); a converted module follows that, a graph rewrite does not: "
                                   "convert() the model, then torch.compile it"))
            continue
        if filter_fn is not None and not filter_fn(ChainInfo.of(chain)):
            refused.append((chain, "not selected (filter_fn returned False)"))
            continue
        if not chain.is_prenorm and preserve != "exact":
            refused.append((chain, f"not PreNorm: {chain.prenorm_reason}; convert it with preserve='exact'"))
            continue
        other = pairs.get(id(chain)) if pairs else None
        if other is not None and not other.is_prenorm and preserve != "exact":
            refused.append((chain, f"not PreNorm in eval mode: {other.prenorm_reason}; "
                                   f"convert it with preserve='exact'"))
            continue
        s = chain_block_size(chain, config)
        chains.append((chain, s))
        plans.append(plan_chain(chain, len(plans), s, preserve=preserve, eps=config.eps))
    return chains, plans, refused


def chain_block_size(chain, config: AttnResConfig) -> int:
    """S of a captured chain under `config` (SPEC section 2, conversion/blocks.py)."""
    return resolve_block_size(len(chain.links), config.num_blocks, config.block_size, chain_layers(chain))


def chain_layers(chain) -> tuple[int, int] | None:
    """(layers, sublayers per layer) of a captured chain (blocks.layer_structure)."""
    return layer_structure([module_path(a) for link in chain.links for a in link.adds[-1:]])


def _chain_key(chain) -> tuple:
    """What identifies a chain across the train and eval captures: its sublayers' modules and
    source lines (node names differ between captures)."""
    return tuple((link.module, source_line(link.add)) for link in chain.links)


def _describe_chain(chain) -> str:
    mods = [link.module or link.add.name for link in chain.links]
    span = mods[0] if len(mods) == 1 else f"{mods[0]} .. {mods[-1]}"
    return f"a chain of {len(mods)} sublayer(s) ({span})"


def match_modes(train_an: StreamAnalysis, eval_an: StreamAnalysis, config: AttnResConfig):
    """Pair each train chain with the eval chain of the same sublayers and block layout.

    Returns (train chains refused, eval chains refused, {id(train chain): eval chain}). A chain
    found in one mode only, or laid out differently in the other, is refused in both: one set
    of AttnRes parameters serves both graphs.
    """
    def layout(chain):
        sites = plan_chain(chain, 0, chain_block_size(chain, config), preserve=config.preserve, eps=config.eps)
        return [(p.chain, p.name, p.schedule.sources, p.dim, p.eps, p.scale, p.dtype) for p in sites]

    by_key: dict[tuple, list] = {}
    for c in eval_an.chains:
        by_key.setdefault(_chain_key(c), []).append(c)
    pairs, train_refused, matched = {}, [], set()
    for c in train_an.chains:
        cands = by_key.get(_chain_key(c), [])
        other = cands.pop(0) if cands else None
        if other is not None and layout(other) == layout(c):
            pairs[id(c)] = other
            matched.add(id(other))
            continue
        first = c.links[0].module or c.links[0].add.name
        if other is not None:
            matched.add(id(other))
            why = "the sites get a different layout or eps in eval mode"
        else:
            why = _where_in_other_mode(c, eval_an, "eval")
        train_refused.append((c, f"the residual stream differs between train and eval mode at {first}: "
                                 f"in train mode {_describe_chain(c)}, {why}; one set of AttnRes parameters "
                                 f"must serve both modes"))
    eval_refused = []
    for c in eval_an.chains:
        if id(c) in matched:
            continue
        first = c.links[0].module or c.links[0].add.name
        eval_refused.append((c, f"the residual stream differs between train and eval mode at {first}: "
                                f"in eval mode {_describe_chain(c)}, {_where_in_other_mode(c, train_an, 'train')}"))
    return train_refused, eval_refused, pairs


def _where_in_other_mode(chain, other: StreamAnalysis, mode: str) -> str:
    mods = {link.module for link in chain.links if link.module}
    for o in other.chains:
        if mods & {link.module for link in o.links}:
            return f"in {mode} mode {_describe_chain(o)}"
    return f"no such chain in {mode} mode"
