"""One scenario of tests/test_distributed.py, run on 2 gloo ranks by torchrun:

    torchrun --standalone --nproc-per-node 2 tests/distributed/worker.py ddp,fsdp,checkpointing,dcp:gpt <out_dir>

Each rank computes the single-process reference itself (same seed, full batch), runs the
distributed version on its half of the batch, and writes `<out_dir>/<scenario>_<model>.rank<r>.json`
with the measured errors; the test asserts on them. Every collective has a 60 s timeout, so a
rank that dies takes the others down instead of hanging CI.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import attnres_compile as ac  # noqa: E402
from examples.gpt import GPT, GPTConfig, GPTEmbed, GPTHead, loss_fn  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=60)


# -- models ---------------------------------------------------------------------------------------

def gpt_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.0))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    conv = ac.convert(model, (ids[:2],), num_blocks=2)
    return conv, ids, lambda m, x: loss_fn(m(x[:, :-1]), x[:, 1:]), lambda m: list(m.transformer.h)


def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    conv = ac.convert(model, (ids[:2],), kwargs={"use_cache": False}, num_blocks=2)
    return conv, ids, lambda m, x: m(input_ids=x, labels=x, use_cache=False).loss, lambda m: list(m.model.layers)


MODELS = {"gpt": gpt_model, "llama": llama_model}


# -- helpers --------------------------------------------------------------------------------------

def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_error(model, ref) -> tuple[float, str]:
    """Largest relative error of any parameter's gradient (full tensors), and which parameter."""
    worst, name = 0.0, ""
    refs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        n = n.replace("._checkpoint_wrapped_module", "")      # checkpoint_wrapper's extra level
        g, r = full(p.grad), refs[n].grad
        err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-12))
        if err > worst:
            worst, name = err, n
    return worst, name


def reference_grads(model, ids, loss_of, micro: int = 1):
    """Single process, the full batch: `micro` equal micro-batches accumulated (mean of their losses)."""
    ref = copy.deepcopy(model)
    for chunk in ids.chunk(micro):
        (loss_of(ref, chunk) / micro).backward()
    return ref


def my_half(ids, rank):
    return ids.chunk(2)[rank]


def sharded(model, layers_of, **kw):
    """A copy of `model` with `fully_shard` on every decoder layer, then on the root."""
    from torch.distributed.fsdp import fully_shard

    out = copy.deepcopy(model)
    for layer in layers_of(out):
        fully_shard(layer, **kw)
    fully_shard(out, **kw)
    return out


# -- scenarios ------------------------------------------------------------------------------------

def ddp(kind: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, ids, loss_of, _ = MODELS[kind]()
    ref = reference_grads(model, ids, loss_of)
    ddp_model = DDP(copy.deepcopy(model))
    loss_of(ddp_model, my_half(ids, rank)).backward()
    err, where = grad_error(ddp_model.module, ref)
    # gradient accumulation: two micro-batches per rank, no all-reduce on the first
    # (equal-sized micro-batches: the mean of their mean losses is the full batch's mean loss)
    acc = DDP(copy.deepcopy(model))
    mine = [ids.chunk(4)[rank * 2], ids.chunk(4)[rank * 2 + 1]]
    with acc.no_sync():
        (loss_of(acc, mine[0]) / 2).backward()
    (loss_of(acc, mine[1]) / 2).backward()
    err_acc, where_acc = grad_error(acc.module, ref)
    return {"grad_rel_err": err, "worst": where, "no_sync_grad_rel_err": err_acc, "no_sync_worst": where_acc}


def fsdp(kind: str, rank: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model, ids, loss_of, layers_of = MODELS[kind]()
    ref = reference_grads(model, ids, loss_of)
    shards = sharded(model, layers_of)
    loss = loss_of(shards, my_half(ids, rank))
    loss.backward()
    err, where = grad_error(shards, ref)
    ref_loss = loss_of(copy.deepcopy(model), my_half(ids, rank)).item()
    out = {"grad_rel_err": err, "worst": where, "loss_err": abs(loss.item() - ref_loss),
           "attnres_sharded": all(type(p).__name__ == "DTensor" for p in ac.attnres_parameters(shards).values())}

    # bfloat16 parameters, float32 reductions: trains, and stays near the single-process autocast run
    mp = sharded(model, layers_of, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                  reduce_dtype=torch.float32))
    single = copy.deepcopy(model)
    opt = torch.optim.AdamW(mp.parameters(), lr=3e-3)
    opt_single = torch.optim.AdamW(single.parameters(), lr=3e-3)
    losses, single_losses = [], []
    for _ in range(8):
        loss = loss_of(mp, my_half(ids, rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = loss_of(single, ids)
        opt_single.zero_grad()
        s.backward()
        opt_single.step()
        single_losses.append(s.item())
    out.update(bf16_losses=losses, autocast_losses=single_losses)
    return out


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def checkpointing(kind: str, rank: int) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import fully_shard

    model, ids, loss_of, layers_of = MODELS[kind]()
    ref = reference_grads(model, ids, loss_of)
    plain = sharded(model, layers_of)
    loss, plain_bytes = saved_bytes(lambda: loss_of(plain, my_half(ids, rank)))
    loss.backward()
    ckpt = copy.deepcopy(model)
    layer_ids = {id(m) for m in layers_of(ckpt)}
    apply_activation_checkpointing(ckpt, check_fn=lambda m: id(m) in layer_ids)
    for layer in layers_of_wrapped(ckpt, layer_ids):
        fully_shard(layer)
    fully_shard(ckpt)
    loss2, ckpt_bytes = saved_bytes(lambda: loss_of(ckpt, my_half(ids, rank)))
    loss2.backward()
    err, where = grad_error(ckpt, ref)
    return {"grad_rel_err": err, "worst": where, "saved_bytes_plain": plain_bytes, "saved_bytes_checkpointed": ckpt_bytes,
            "loss_err": abs(loss.item() - loss2.item())}


def layers_of_wrapped(model, layer_ids):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return [m for m in model.modules() if isinstance(m, CheckpointWrapper) and id(m._checkpoint_wrapped_module) in layer_ids]


def dcp_save(kind: str, rank: int, out: Path) -> dict:
    """Train one step sharded, save with torch.distributed.checkpoint, reload into fresh 2-rank shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model, ids, loss_of, layers_of = MODELS[kind]()
    shards = sharded(model, layers_of)
    opt = torch.optim.SGD(shards.parameters(), lr=0.5)
    loss_of(shards, my_half(ids, rank)).backward()
    opt.step()      # the AttnRes queries move off zero, so a lost query would show in the outputs
    dcp.save(get_model_state_dict(shards), checkpoint_id=str(out / f"dcp_{kind}"))
    with torch.no_grad():
        shards.eval()
        expected = shards(ids[:, :-1]) if kind == "gpt" else shards(input_ids=ids, use_cache=False).logits
    fresh = sharded(model, layers_of)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=str(out / f"dcp_{kind}"))
    set_model_state_dict(fresh, state)
    with torch.no_grad():
        fresh.eval()
        got = fresh(ids[:, :-1]) if kind == "gpt" else fresh(input_ids=ids, use_cache=False).logits
    query_norm = sum(float(full(p).detach().norm()) for n, p in ac.attnres_parameters(fresh).items() if n.endswith("query"))
    if rank == 0:
        torch.save(expected, out / f"dcp_{kind}_expected.pt")
    return {"reload_max_abs_err": float((got - expected).abs().max()), "query_norm": query_norm}


def pipeline_gpt(num_blocks: int):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.0))
    ids = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    return ac.convert(model, (ids[:2, :-1],), num_blocks=num_blocks), ids


def pipeline(kind: str, rank: int) -> dict:
    """GPipe and 1F1B on 2 stages, interleaved 1F1B on 2 x 2 virtual stages, every cache policy."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from attnres_compile.parallel.pipeline import pipeline_stages

    results = {}
    for schedule, virtual, cache, num_blocks in [("gpipe", 1, "none", 2), ("1f1b", 1, "none", 2),
                                                 ("interleaved", 2, "none", 4), ("interleaved", 2, "received", 4),
                                                 ("interleaved", 2, "held", 4), ("interleaved", 2, "held", 2)]:
        conv, ids = pipeline_gpt(num_blocks)
        x, y = ids[:, :-1], ids[:, 1:]
        ref = copy.deepcopy(conv)
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        model = copy.deepcopy(conv)
        n_stages = 2 * virtual
        bounds = [0, 2, 4] if virtual == 1 else [0, 1, 2, 3, 4]
        mine = [rank + 2 * v for v in range(virtual)]
        stages = pipeline_stages(model, model.transformer.h, bounds, embed=GPTEmbed(model), head=GPTHead(model),
                                 ranks=2, cache=cache, stages=mine)
        pstages = [PipelineStage(st, st.index, n_stages, torch.device("cpu")) for st in stages]
        if schedule == "gpipe":
            sched = ScheduleGPipe(pstages[0], n_microbatches=4, loss_fn=loss_fn)
        elif schedule == "1f1b":
            sched = Schedule1F1B(pstages[0], n_microbatches=4, loss_fn=loss_fn)
        else:
            sched = ScheduleInterleaved1F1B(pstages, n_microbatches=4, loss_fn=loss_fn)
        losses: list = []
        for step in range(2):   # the second step runs with shapes known: its counts are the steady ones
            for p in model.parameters():
                p.grad = None
            losses = []
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=losses)
        # every parameter's gradient, summed over ranks (each is used on one rank, the tied
        # embedding on both: its gradient is the sum)
        worst, where = 0.0, ""
        refs = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            err = float((g - refs[n].grad).abs().max() / refs[n].grad.abs().max().clamp_min(1e-12))
            if err > worst:
                worst, where = err, n
        loss = torch.tensor(float(torch.stack(losses).detach().mean()) if losses else 0.0)
        dist.all_reduce(loss)
        key = f"{schedule}_v{virtual}_{cache}_blocks{num_blocks}"
        results[key] = {"loss_err": abs(loss.item() - ref_loss.item()), "grad_rel_err": worst, "worst": where,
                        "blocks_sent": {st.index: st.blocks_sent[-1] for st in stages if st.blocks_sent},
                        "bytes_sent": {st.index: st.bytes_sent[-1] for st in stages if st.bytes_sent},
                        "microbatch_tokens": 2 * 16, "d": 32}
    return results


SCENARIOS = {"ddp": ddp, "fsdp": fsdp, "checkpointing": checkpointing, "dcp": dcp_save, "pipeline": pipeline}


def main(scenarios: dict = SCENARIOS) -> int:
    """argv: `<scenario>[,<scenario>...]:<model> <out_dir>`, e.g. `ddp,fsdp:gpt /tmp/out`; each
    scenario's result goes to `<out_dir>/<scenario>_<model>.rank<r>.json` (parallel_worker.py
    runs its own table through this too)."""
    spec, out = sys.argv[1], Path(sys.argv[2])
    names, kind = spec.split(":")
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    for name in names.split(","):
        fn = scenarios[name]
        result = fn(kind, rank, out) if name == "dcp" else fn(kind, rank)
        (out / f"{name}_{kind}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
