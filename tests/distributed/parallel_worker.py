"""Tensor, sequence, 2-D and pipeline x tensor parallelism of converted models, one scenario per
torchrun launch (tests/test_parallel.py, benchmarks/parallel_bytes.py):

    torchrun --standalone --nproc-per-node 2 tests/distributed/parallel_worker.py tp,sp:llama <out_dir>
    torchrun --standalone --nproc-per-node 4 tests/distributed/parallel_worker.py fsdp_tp,pp_tp:gpt <out_dir>

Every scenario runs twice, on the converted model (queries and gains moved off their init, so
the mixtures are not uniform) and on the unconverted one (the control: a failure only in the
converted run is the conversion's), each against the single-process run on the same batch
computed on every rank. Each rank writes `<out_dir>/<scenario>_<model>.rank<r>.json`; the test
asserts. Every collective times out after 60 s (worker.py's runner, which this one uses).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import attnres_compile as ac  # noqa: E402
from examples.gpt import GPT, GPTConfig, GPTEmbed, GPTHead, loss_fn, parallel_plans  # noqa: E402
from tests.models import perturb  # noqa: E402

VARIANTS = ("converted", "control")


# -- models ---------------------------------------------------------------------------------------

def gpt_model(converted: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.0))
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    if converted:
        model = perturb(ac.convert(model, (ids[:2, :-1],), num_blocks=2))
    return model, ids, lambda m, x: loss_fn(m(x[:, :-1]), x[:, 1:])


def hf_model(kind: str, converted: bool):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    if converted:
        model = perturb(ac.convert(model, (ids[:2],), kwargs={"use_cache": False}, num_blocks=2))
    return model, ids, lambda m, x: m(input_ids=x, labels=x, use_cache=False).loss


def build(kind: str, converted: bool):
    return gpt_model(converted) if kind == "gpt" else hf_model(kind, converted)


def layers_of(model, kind):
    return list(model.transformer.h) if kind == "gpt" else list(model.model.layers)


# -- parallel plans (torch.distributed.tensor.parallel) --------------------------------------------

def tp_layer_plan(kind: str) -> dict:
    """Tensor parallel per layer: column-wise in, row-wise out, the stream replicated between
    (the examples GPT: its MLP only, examples/gpt.py parallel_plans says why)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if kind == "gpt":
        return parallel_plans("tp")[1]
    return {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
            **head_norms(kind)}


def head_norms(kind: str) -> dict:
    """Qwen3's per-head q/k RMSNorms see only the rank's heads: their (replicated) gains need
    the gradient summed over ranks, which SequenceParallel on the heads dimension provides (the
    gain becomes a Replicate DTensor, the input a Shard(2) one). Without it even the unconverted
    model's gains get each rank's partial gradient."""
    from torch.distributed.tensor.parallel import SequenceParallel

    if kind != "qwen3":
        return {}
    return {f"self_attn.{n}": SequenceParallel(sequence_dim=2, use_local_output=True) for n in ("q_norm", "k_norm")}


def sp_layer_plan(kind: str, stream_dim: int = 1) -> dict:
    """Sequence parallel between the sublayers: the stream is a DTensor sharded on the sequence
    (dim 1), the norms run on each rank's tokens, each sublayer gathers its input and its output
    projection reduce-scatters back to the sequence shards."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    scatter = RowwiseParallel(output_layouts=Shard(stream_dim), use_local_output=False)
    if kind == "gpt":
        if stream_dim != 1:
            raise ValueError("the examples GPT's plan keeps the stream on dim 1")
        return parallel_plans("sp")[1]
    return {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": scatter,
            "mlp": gather, "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": scatter,
            **head_norms(kind)}


def sp_outer_plan(kind: str) -> dict:
    """Where the sequence-parallel region starts (the stream, sharded on the sequence) and ends."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    if kind == "gpt":
        return parallel_plans("sp")[0]
    return {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                  use_local_output=False),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}


def parallelize(model, kind: str, mode: str, mesh, layers=None):
    from torch.distributed.tensor.parallel import parallelize_module

    if mode == "sp":
        parallelize_module(model, mesh, sp_outer_plan(kind))
    plan = sp_layer_plan(kind) if mode == "sp" else tp_layer_plan(kind)
    for layer in layers if layers is not None else layers_of(model, kind):
        parallelize_module(layer, mesh, plan)
    return model


# -- measuring ------------------------------------------------------------------------------------

def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def float64_run(model, loss_of, ids):
    """The single-process run in float64 on the same batch: the reference (SPEC section 7)."""
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    loss_of(ref, ids).backward()
    return ref


def _worst(grads: dict, ref) -> tuple[float, str, float]:
    """(largest error, its parameter, largest error of an AttnRes parameter) of `grads` (name ->
    full gradient or None) against `ref`'s gradients."""
    refs = dict(ref.named_parameters())
    worst, name, attnres = 0.0, "", 0.0
    for n, g in grads.items():
        r = refs[n].grad.double()
        g = g.double() if g is not None else torch.zeros_like(r)
        err = float((g - r).norm() / r.norm().clamp_min(1e-30))       # SPEC section 7's measure
        if err > worst:
            worst, name = err, n
        if n.startswith("attnres."):
            attnres = max(attnres, err)
    return worst, name, attnres


def full_grads(model) -> dict:
    return {n.replace("._checkpoint_wrapped_module", ""): full(p.grad) if p.grad is not None else None
            for n, p in model.named_parameters()}


def grad_errors(model, ref, ref64=None, grads=None) -> dict:
    """Largest relative gradient error ||g - g_ref|| / ||g_ref|| over all parameters (and over
    the AttnRes ones) against the single-process float32 run `ref`, and, given `ref64` (the
    float64 run), against it too, beside the single-process float32 run's own error against it."""
    grads = full_grads(model) if grads is None else grads
    worst, name, attnres = _worst(grads, ref)
    out = {"grad_rel_err": worst, "worst": name, "attnres_grad_rel_err": attnres}
    if ref64 is not None:
        out["grad_rel_err_f64"], out["worst_f64"], _ = _worst(grads, ref64)
        out["single_process_rel_err_f64"], _, _ = _worst(full_grads(ref), ref64)
    return out


def full_bytes(name: str, args) -> int:
    """Bytes of the whole tensor a collective works on (the gathered output of an all-gather,
    the input of a reduce-scatter, the tensor of an all-reduce), whichever API issued it."""
    def nbytes(t):
        return t.numel() * t.element_size()

    if name == "all_gather_into_tensor":            # functional: (shard, group_size, group)
        return nbytes(args[0]) * args[1]
    if name == "_reduce_scatter_base_":             # c10d: (output shard, input, ...)
        return nbytes(args[1])
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    return max(nbytes(t) for t in tensors)


class CollectiveCounter:
    """torch's CommDebugMode, plus the bytes of each collective (`full_bytes`), split into
    forward and backward."""

    def __init__(self):
        from torch.distributed.tensor.debug import CommDebugMode

        counter = self

        class _Mode(CommDebugMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                before = self.get_total_counts()
                out = super().__torch_dispatch__(func, types, args, kwargs)
                if out is not NotImplemented and self.get_total_counts() > before:
                    phase = "backward" if self.advanced_module_tracker.is_bw else "forward"
                    name = str(func._overloadpacket).split(".")[-1]
                    counter.counts[phase][name] += 1
                    counter.bytes[phase] += full_bytes(name, args)
                return out

        self.mode = _Mode()
        self.counts = {"forward": defaultdict(int), "backward": defaultdict(int)}
        self.bytes = {"forward": 0, "backward": 0}

    def result(self) -> dict:
        return {"counts": {k: dict(v) for k, v in self.counts.items()}, "bytes": dict(self.bytes)}


def site_count(model, kind: str, variant: str) -> dict:
    """The parameterised depth-attention sites (a query and a gain of D values each) and D."""
    return {"attnres_sites": len(ac.attnres_parameters(model)) // 2 if variant == "converted" else 0,
            "dim": model.config.hidden_size if kind != "gpt" else model.config.n_embd}


def replicated_drift(model) -> float:
    """Largest difference between ranks of any parameter every rank holds whole (plain, or a
    Replicate DTensor's local value): an optimizer step must keep them equal."""
    from torch.distributed.tensor import DTensor, Replicate

    worst = 0.0
    for _, p in sorted(model.named_parameters()):
        if isinstance(p, DTensor):
            if not all(isinstance(q, Replicate) for q in p.placements):
                continue
            p = p.to_local()
        mine = p.detach().clone()
        top = mine.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        worst = max(worst, float((top - mine).abs().max()))
    return worst


# -- scenarios ------------------------------------------------------------------------------------

def tensor_parallel(kind: str, mode: str, rank: int) -> dict:
    """TP or SP on 2 ranks: every rank sees the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for variant in VARIANTS:
        model, ids, loss_of = build(kind, variant == "converted")
        ref = copy.deepcopy(model)
        ref_loss = loss_of(ref, ids)
        ref_loss.backward()
        par = parallelize(copy.deepcopy(model), kind, mode, mesh)
        counter = CollectiveCounter()
        with counter.mode:
            loss = loss_of(par, ids)
            loss.backward()
        r = {"loss_err": abs(loss.item() - ref_loss.item()), **grad_errors(par, ref, float64_run(model, loss_of, ids)),
             "collectives": counter.result()}
        # two AdamW steps on both: the replicated parameters stay equal across ranks, and the
        # parallel model keeps tracking the single-process one
        opt, opt_ref = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (par, ref))
        for _ in range(2):
            opt.step()
            opt_ref.step()
            opt.zero_grad()
            opt_ref.zero_grad()
            loss_of(par, ids).backward()
            loss_of(ref, ids).backward()
        with torch.no_grad():
            r["stepped_loss_err"] = abs(loss_of(par, ids).item() - loss_of(ref, ids).item())
        r["replicated_drift"] = replicated_drift(par)
        r.update(site_count(model, kind, variant))
        out[variant] = r
    if mode == "sp" and kind != "gpt":
        out["feature_sharded_error"] = feature_sharded_error(kind, mesh)
    return out


def feature_sharded_error(kind: str, mesh) -> str:
    """Bad input: a plan whose MLP output projection reduce-scatters onto the features
    (`output_layouts=Shard(-1)` where the stream wants Shard(1)): the converted model names the
    site, the source, the module and the placement on its first forward."""
    from torch.distributed.tensor.parallel import parallelize_module

    model, ids, loss_of = build(kind, True)
    parallelize_module(model, mesh, sp_outer_plan(kind))
    for i, layer in enumerate(layers_of(model, kind)):
        parallelize_module(layer, mesh, sp_layer_plan(kind, stream_dim=-1 if i == 1 else 1))
    try:
        loss_of(model, ids)
    except ac.errors.ParallelPlanError as exc:
        return f"ParallelPlanError: {exc}"
    except Exception as exc:      # noqa: BLE001 - the test asserts on what was raised
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def tp(kind, rank):
    return tensor_parallel(kind, "tp", rank)


def sp(kind, rank):
    return tensor_parallel(kind, "sp", rank)


def fsdp_tp(kind: str, rank: int) -> dict:
    """FSDP2 x TP on a (2, 2) mesh: dp shards the batch and the parameters, tp the layers
    (sequence parallel for the HF models, tensor parallel for the examples GPT)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    out = {}
    for variant in VARIANTS:
        model, ids, loss_of = build(kind, variant == "converted")
        ref = copy.deepcopy(model)
        loss_of(ref, ids).backward()
        par = parallelize(copy.deepcopy(model), kind, "tp" if kind == "gpt" else "sp", mesh["tp"])
        for layer in layers_of(par, kind):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(par, mesh=mesh["dp"])
        mine = ids.chunk(2)[dp_rank]
        counter = CollectiveCounter()
        with counter.mode:
            loss = loss_of(par, mine)
            loss.backward()
        ref_loss = loss_of(copy.deepcopy(model), mine).item()
        out[variant] = {"loss_err": abs(loss.item() - ref_loss), **grad_errors(par, ref, float64_run(model, loss_of, ids)),
                        "collectives": counter.result(), **site_count(model, kind, variant)}
    return out


def pp_tp(kind: str, rank: int) -> dict:
    """pipeline_stages on 2 stages (pp), tensor parallel inside each stage (tp), a (2, 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    assert kind == "gpt", "pipeline stages are cut from the examples GPT"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    stage = mesh.get_local_rank("pp")
    out = {}
    for cache in ("none", "held"):
        model, ids, _ = gpt_model(True)
        pristine = copy.deepcopy(model)
        x, y = ids[:, :-1], ids[:, 1:]
        ref = copy.deepcopy(model)
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        bounds = [0, 2, 4]
        parallelize(model, kind, "tp", mesh["tp"], layers=model.transformer.h[bounds[stage]:bounds[stage + 1]])
        stages = ac.pipeline_stages(model, model.transformer.h, bounds, embed=GPTEmbed(model), head=GPTHead(model),
                                    ranks=2, cache=cache, stages=[stage])
        pstage = PipelineStage(stages[0], stage, 2, torch.device("cpu"), group=mesh["pp"].get_group())
        schedule = Schedule1F1B(pstage, n_microbatches=2, loss_fn=loss_fn)
        losses: list = []
        if stage == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        grads = {}
        for n, p in model.named_parameters():    # the same order on every rank
            g = (full(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype)).clone()
            dist.all_reduce(g, group=mesh["pp"].get_group())     # each parameter lives on one stage; the tied embedding on both
            grads[n] = g
        loss = torch.tensor(float(torch.stack(losses).mean()) if losses else 0.0)
        dist.all_reduce(loss, group=mesh["pp"].get_group())
        out[cache] = {"loss_err": abs(loss.item() - ref_loss.item()),
                      **grad_errors(None, ref, float64_run(pristine, lambda m, t: loss_fn(m(t[:, :-1]), t[:, 1:]), ids),
                                    grads=grads)}
    return out


def hf_tp(kind: str, rank: int) -> dict:
    """Hugging Face's own tensor parallelism: `from_pretrained(..., tp_plan="auto")` of a
    converted checkpoint (attnres_compile.from_pretrained) and, as the control, of the
    unconverted one (transformers' from_pretrained)."""
    import transformers

    out = {}
    folder = Path(tempfile.gettempdir()) / f"attnres_hf_tp_{kind}_{dist.get_world_size()}"
    for variant in VARIANTS:
        model, ids, loss_of = build(kind, variant == "converted")
        path = folder / variant
        if rank == 0:
            model.save_pretrained(path)
        dist.barrier()
        load = ac.from_pretrained if variant == "converted" else \
            (lambda p, **kw: getattr(transformers, type(model).__name__).from_pretrained(p, **kw))
        ref = load(path)
        ref_loss = loss_of(ref, ids)
        ref_loss.backward()
        par = load(path, tp_plan="auto")
        sharded = type(layers_of(par, kind)[0].self_attn.q_proj.weight).__name__
        loss = loss_of(par, ids)
        loss.backward()
        out[variant] = {"loss_err": abs(loss.item() - ref_loss.item()),
                        **grad_errors(par, ref, float64_run(ref, loss_of, ids)), "q_proj_weight": sharded}
    return out


def site(kind: str, rank: int) -> dict:
    """The sharded site itself (ops/sharded.py) against the float64 site on whole tensors: sources
    sharded on tokens, mixed placements (Shard, Replicate, Partial), a Replicate DTensor query,
    and the inputs it refuses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from attnres_compile.ops.reference import depth_attention_reference
    from attnres_compile.ops.sharded import sharded_depth_attention

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(3)
    whole = [torch.randn(2, 6, 16, generator=g) for _ in range(3)]
    q, w = torch.randn(16, generator=g), 1 + 0.1 * torch.randn(16, generator=g)
    grad_out = torch.randn(2, 6, 16, generator=g)

    def reference():
        leaves = [t.double().requires_grad_() for t in (*whole, q, w)]
        out = depth_attention_reference(leaves[:3], leaves[3], leaves[4], eps=1e-6)
        out.backward(grad_out.double())
        return out, [t.grad for t in leaves]

    ref_out, ref_grads = reference()

    def run(placements, query_dtensor=False):
        srcs = []
        for t, pl in zip(whole, placements):
            if isinstance(pl, Partial):    # each rank holds half the value
                d = DTensor.from_local(t / dist.get_world_size(), mesh, [Partial()], run_check=False)
            else:
                d = distribute_tensor(t, mesh, [pl])
            srcs.append(d.detach().requires_grad_())
        qq = (distribute_tensor(q, mesh, [Replicate()]) if query_dtensor else q.clone()).requires_grad_()
        ww = w.clone().requires_grad_()
        out = sharded_depth_attention(srcs, qq, ww, 1e-6, 1.0, describe=lambda k: f"source {k}" if k is not None else "site")
        out.backward(distribute_tensor(grad_out, mesh, list(out.placements)))
        def rel(a, b):
            return float((full(a).double() - b).norm() / b.norm())
        return {"out": rel(out, ref_out), "placements": str(out.placements),
                "grads": max(rel(t.grad, r) for t, r in zip([*srcs, qq, ww], ref_grads)),
                "query_grad_type": type(qq.grad).__name__}

    def refused(fn) -> str:
        try:
            fn()
        except ac.errors.ParallelPlanError as exc:
            return f"ParallelPlanError: {exc}"
        return "no error"

    sharded = [distribute_tensor(t, mesh, [Shard(1)]) for t in whole]

    def named(k):
        return f"source {k}" if k is not None else "the site"

    return {
        "shard1": run([Shard(1)] * 3),
        "shard0": run([Shard(0)] * 3),
        "mixed": run([Shard(1), Replicate(), Partial()]),
        "replicate_query": run([Shard(1)] * 3, query_dtensor=True),
        "plain_source": refused(lambda: sharded_depth_attention([sharded[0], whole[1], sharded[2]], q, w, 1e-6, 1.0,
                                                                describe=named)),
        "sharded_query": refused(lambda: sharded_depth_attention(sharded, distribute_tensor(q, mesh, [Shard(0)]), w, 1e-6,
                                                                 1.0, describe=named)),
        "feature_source": refused(lambda: sharded_depth_attention([*sharded[:2], distribute_tensor(whole[2], mesh, [Shard(2)])],
                                                                  q, w, 1e-6, 1.0, describe=named)),
    }


SCENARIOS = {"site": site, "tp": tp, "sp": sp, "fsdp_tp": fsdp_tp, "pp_tp": pp_tp, "hf_tp": hf_tp}


if __name__ == "__main__":
    from worker import main      # the same runner as tests/distributed/worker.py (this folder is on sys.path)

    sys.exit(main(SCENARIOS))
