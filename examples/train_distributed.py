"""Train a converted GPT on several processes with PyTorch's own engines (DDP, FSDP2, TP, PP).

    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode ddp
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode fsdp --bf16 --checkpointing
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode fsdp --save ckpt_dir
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode pp --stages-per-rank 2 --cache held
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode tp        # or --mode sp
    torchrun --standalone --nproc-per-node 4 -m examples.train_distributed --mode fsdp_tp   # a (2, 2) mesh

The model is examples/gpt.py converted with `attnres_compile.convert(num_blocks=4)`; the data
is the byte corpus of examples/data.py, each rank drawing its own batches. `--mode fsdp` calls
`fully_shard` on every decoder layer (the converted model keeps them as modules whose forward
runs) and on the root, which shards the AttnRes parameters with the model's embedding and final
norm. `--bf16` adds `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`,
`--checkpointing` wraps every layer with `checkpoint_wrapper`, `--save` writes a
`torch.distributed.checkpoint` of the model (AttnRes parameters included) that loads into any
number of ranks. `--mode pp` cuts the layers into ranks x `--stages-per-rank` stages
(`attnres_compile.pipeline_stages`, cross-stage block caching per `--cache`) and runs
1F1B (`--stages-per-rank 1`) or interleaved 1F1B from torch.distributed.pipelining over `--microbatches`
micro-batches of the batch (one batch, the same on every rank); the tied embedding's gradient is
summed over the ranks that use it. `--mode tp` / `--mode sp` shard every layer's MLP over all
ranks with `parallelize_module` (examples/gpt.py `parallel_plans`; sp also shards the residual
stream on the sequence between sublayers, and the depth-attention sites run on each rank's
tokens); all ranks see the same batches. `--mode fsdp_tp` runs that tensor-parallel plan inside
FSDP2 on a (ranks / 2, 2) mesh, each data-parallel rank on its own batches. CPU runs use gloo, GPU runs nccl. What was verified is in
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch
import torch.distributed as dist

import attnres_compile
from examples.data import get_batch, load_corpus
from examples.gpt import GPT, GPTConfig, GPTEmbed, GPTHead, cosine_lr, loss_fn, param_groups


def build(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)      # the same initial weights on every rank
    gpt = GPT(GPTConfig(vocab_size=256, block_size=args.context, n_layer=args.layers, n_head=4,
                        n_embd=args.d_model, dropout=0.0))
    example = torch.randint(0, 256, (2, args.context), generator=torch.Generator().manual_seed(args.seed))
    return attnres_compile.convert(gpt, (example,), num_blocks=4)


def parallelize(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    layers = list(model.transformer.h)
    if args.checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        ids = {id(m) for m in layers}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)
        layers = [m for m in model.modules() if getattr(m, "_checkpoint_wrapped_module", None) is not None]
    model.to(device)
    if args.mode in ("tp", "sp", "fsdp_tp"):
        return tensor_parallel(model, args, device)
    if args.mode == "ddp":
        if args.bf16:
            raise SystemExit("--bf16 goes with --mode fsdp (its MixedPrecisionPolicy); under DDP use torch.autocast")
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else \
        MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def tensor_parallel(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    """TP or SP over all ranks, or TP inside FSDP2 on a (world / 2, 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from examples.gpt import parallel_plans

    if args.bf16 or args.checkpointing:
        raise SystemExit("--bf16 and --checkpointing go with --mode ddp/fsdp")
    world = dist.get_world_size()
    if args.mode == "fsdp_tp":
        if world % 2:
            raise SystemExit(f"--mode fsdp_tp needs an even number of ranks (a (ranks / 2, 2) mesh), got {world}")
        mesh = init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tp_mesh = mesh["tp"]
    else:
        tp_mesh = init_device_mesh(device.type, (world,))
    outer, per_layer = parallel_plans("sp" if args.mode == "sp" else "tp")
    if outer:
        parallelize_module(model, tp_mesh, outer)
    for layer in model.transformer.h:
        parallelize_module(layer, tp_mesh, per_layer)
    if args.mode == "fsdp_tp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.transformer.h:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def data_rank(args) -> int:
    """Which batches this rank draws: its own under ddp/fsdp, its data-parallel group's under
    fsdp_tp, the same everywhere under tp/sp (the ranks split the layers, not the batch)."""
    if args.mode in ("tp", "sp"):
        return 0
    return dist.get_rank() // 2 if args.mode == "fsdp_tp" else dist.get_rank()


def clip_grad_norm(params, max_norm: float) -> None:
    """clip_grad_norm_ over plain and DTensor gradients together (the norm of a sharded gradient
    is reduced over its ranks first). torch.nn.utils.clip_grad_norm_ refuses the mix under
    tp/sp ("aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor")."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), device=grads[0].device) if grads else torch.zeros(())
    for g in grads:
        n = g.detach().norm()
        total = total + (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    coef = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0).item()
    if coef < 1.0:
        for g in grads:
            g.detach().mul_(coef)


def train_pipeline(args, corpus, rank: int, world: int, device: torch.device) -> int:
    """Pipeline parallelism: this rank's stages, a torch.distributed.pipelining schedule."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    if args.bf16 or args.checkpointing or args.save:
        raise SystemExit("--bf16, --checkpointing and --save go with --mode ddp/fsdp")
    model = build(args).to(device)
    n_stages = world * args.virtual
    if args.layers < n_stages:
        raise SystemExit(f"--layers {args.layers} cannot fill {n_stages} stages ({world} ranks x {args.virtual})")
    bounds = [round(i * args.layers / n_stages) for i in range(n_stages + 1)]
    mine = [rank + world * v for v in range(args.virtual)]
    stages = attnres_compile.pipeline_stages(model, model.transformer.h, bounds, embed=GPTEmbed(model),
                                             head=GPTHead(model), ranks=world, cache=args.cache, stages=mine)
    pstages = [PipelineStage(st, st.index, n_stages, device) for st in stages]
    schedule = (Schedule1F1B(pstages[0], args.microbatches, loss_fn=loss_fn) if args.virtual == 1 else
                ScheduleInterleaved1F1B(pstages, args.microbatches, loss_fn=loss_fn))
    params = list({id(p): p for st in stages for p in st.parameters()}.values())
    tied = model.lm_head.weight          # the embedding's weight: used by the first and the last stage
    opt = torch.optim.AdamW(param_groups(params, 0.1), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1000)      # the same batch on every rank: the schedule splits it
    first, last = 0 in mine, n_stages - 1 in mine
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.lr, min(20, args.steps // 10 + 1), args.steps, 0.1)
        x, y = (t.to(device) for t in get_batch("train", args.batch_size, args.context, gen, corpus))
        opt.zero_grad(set_to_none=True)
        losses: list = []
        schedule.step(*((x,) if first else ()), **({"target": y, "losses": losses} if last else {}))
        grad = tied.grad if tied.grad is not None else torch.zeros_like(tied)
        dist.all_reduce(grad)                      # first + last stage's parts of the tied weight
        if first or last:
            tied.grad = grad
        opt.step()
        mean = torch.stack(losses).detach().float().mean() if last else torch.zeros((), device=device)
        dist.all_reduce(mean)                      # only the last stage's rank has the losses
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean.item():.4f}  ({time.perf_counter() - t0:.0f} s, {world} ranks, pp, "
                  f"{n_stages} stages, cache {args.cache})", flush=True)
    sent = {st.index: st.bytes_sent[-1] for st in stages if st.bytes_sent}
    every: list = [None] * world              # one printer: two ranks writing one pipe interleave mid-line
    dist.all_gather_object(every, sent)
    if rank == 0:
        merged = dict(sorted(kv for d in every for kv in d.items()))
        print(f"bytes sent per micro-batch by stage {merged}", flush=True)
    shutdown()
    return 0


def shutdown() -> None:
    """Leave together: a rank that tears gloo down while another still talks to it can abort
    ("terminate called without an active exception", about 1 run in 6 here without the barrier)."""
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun ... -m examples.train_distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("ddp", "fsdp", "pp", "tp", "sp", "fsdp_tp"), default="fsdp")
    ap.add_argument("--stages-per-rank", dest="virtual", type=int, default=1, help="pp: virtual stages per rank (2+: interleaved 1F1B)")
    ap.add_argument("--cache", choices=("held", "received", "none"), default="held",
                    help="pp: cross-stage block caching (docs/distributed.md)")
    ap.add_argument("--microbatches", type=int, default=4, help="pp: micro-batches per batch")
    ap.add_argument("--bf16", action="store_true", help="FSDP2 bfloat16 parameters, float32 gradient reduction")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every layer")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="folder for a torch.distributed.checkpoint of the model")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    corpus = load_corpus()
    if args.mode == "pp":
        return train_pipeline(args, corpus, rank, world, device)
    model = parallelize(build(args), args, device)
    opt = torch.optim.AdamW(param_groups(model.parameters(), 0.1), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1000 + data_rank(args))
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.lr, min(20, args.steps // 10 + 1), args.steps, 0.1)
        x, y = (t.to(device) for t in get_batch("train", args.batch_size, args.context, gen, corpus))
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean = mean.item() / world             # under tp/sp every rank holds the same loss
        if not math.isfinite(mean):
            raise FloatingPointError(f"loss {mean} at step {step}")
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean:.4f}  ({time.perf_counter() - t0:.0f} s, {world} ranks, {args.mode}"
                  f"{', bf16' if args.bf16 else ''}{', checkpointing' if args.checkpointing else ''})", flush=True)
    if args.save:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save(get_model_state_dict(model), checkpoint_id=args.save)
        if rank == 0:
            print(f"saved a torch.distributed.checkpoint to {args.save}", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
