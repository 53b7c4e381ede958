"""Train a converted GPT on several processes with PyTorch's own engines (DDP or FSDP2).

    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode ddp
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode fsdp --bf16 --checkpointing
    torchrun --standalone --nproc-per-node 2 -m examples.train_distributed --mode fsdp --save ckpt_dir

The model is examples/gpt.py converted with `attnres_compile.convert(num_blocks=4)`; the data
is the byte corpus of examples/data.py, each rank drawing its own batches. `--mode fsdp` calls
`fully_shard` on every decoder layer (the converted model keeps them as modules whose forward
runs) and on the root, which shards the AttnRes parameters with the model's embedding and final
norm. `--bf16` adds `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`,
`--checkpointing` wraps every layer with `checkpoint_wrapper`, `--save` writes a
`torch.distributed.checkpoint` of the model (AttnRes parameters included) that loads into any
number of ranks. CPU runs use gloo, GPU runs nccl. What was verified is in docs/distributed.md.
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
from examples.gpt import GPT, GPTConfig, cosine_lr, loss_fn, param_groups


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun ... -m examples.train_distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
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
    model = parallelize(build(args), args, device)
    opt = torch.optim.AdamW(param_groups(model.parameters(), 0.1), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1000 + rank)          # each rank its own batches
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.lr, min(20, args.steps // 10 + 1), args.steps, 0.1)
        x, y = (t.to(device) for t in get_batch("train", args.batch_size, args.context, gen, corpus))
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean = mean.item() / world
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
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
