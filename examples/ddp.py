"""Sparse training with DistributedDataParallel, launched by torchrun.

RigL on a synthetic classification task (no download), one process per device:
NCCL on CUDA, gloo on CPU. The same script runs on one machine or many::

    # one machine, 2 processes
    torchrun --standalone --nproc_per_node=2 examples/ddp.py

    # 2 machines x 8 GPUs: run on each, with its own --node_rank
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/ddp.py

    # gradient accumulation (no_sync on all micro-batches but the last) and AMP
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --accumulate 4 --amp

    # what sparsetorch and DDP send, measured (see docs/distributed.md)
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --hidden 1024 --comm

The order that matters: ``sparsify`` first, then ``DistributedDataParallel``.
Rank 0 saves the checkpoint (``--save``); every rank resumes from it
(``--resume``, with the same settings)::

    torchrun --standalone --nproc_per_node=2 examples/ddp.py --stop-at 150 --save ck.pt
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --resume ck.pt
 At the end the script checks that every rank holds the same masks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import sparsetorch as st


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--policy", default="rigl", choices=["rigl", "set", "static"])
    p.add_argument("--update-interval", type=int, default=50)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    p.add_argument("--amp", action="store_true", help="autocast (+ GradScaler on CUDA)")
    p.add_argument("--comm", action="store_true", help="measure bytes communicated")
    p.add_argument("--stop-at", type=int, help="stop early at this step (preempted)")
    p.add_argument("--save", help="rank 0 writes the checkpoint here at the end")
    p.add_argument("--resume", help="every rank loads this checkpoint first")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def batch_at(
    step: int, rank: int, world: int, batch: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor]:
    """Step ``step``'s slice of a synthetic task: labels from a random teacher.

    Every rank draws the same global batch and keeps its own slice, as a
    ``DistributedSampler`` would; a function of the step, so a resumed run sees
    the data it would have seen.
    """
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(world * batch, 64, generator=g)
    y = (x @ teacher).argmax(dim=1)
    mine = slice(rank * batch, (rank + 1) * batch)
    return x[mine].to(device), y[mine].to(device)


class CommMeter:
    """Count the bytes each side sends, by wrapping their entry points.

    sparsetorch all-reduces through ``torch.distributed.all_reduce`` (only at
    updates); DDP's gradient buckets are counted by a communication hook that
    then does DDP's default averaging.
    """

    def __init__(self) -> None:
        self.sparsetorch = 0
        self.ddp = 0
        self._all_reduce = dist.all_reduce

        def all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sparsetorch += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce

    def hook(self, state, bucket):  # type: ignore[no-untyped-def]
        # (No annotations: DDP checks them against dist.GradBucket.)
        buffer = bucket.buffer()
        self.ddp += buffer.numel() * buffer.element_size()
        buffer.div_(dist.get_world_size())
        work = self._all_reduce(buffer, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup()
    torch.manual_seed(args.seed)
    model = mlp(args.hidden).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # 1. sparsify (on every rank: rank 0's masks and generator state win) ...
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=args.policy,
        sparsity=args.sparsity,
        total_steps=args.steps,
        update_interval=args.update_interval,
        seed=args.seed,
    )
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        sparsifier.load_state_dict(checkpoint["sparsity"])
    # 2. ... then wrap. The masks stay out of DDP's per-forward buffer broadcast.
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )
    meter = CommMeter() if args.comm else None
    if meter is not None:
        ddp.register_comm_hook(None, meter.hook)
    amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    start, first = time.perf_counter(), sparsifier.step_count
    loss = torch.zeros(())
    for _ in range(sparsifier.step_count, args.stop_at or args.steps):
        optimizer.zero_grad(set_to_none=True)
        step = sparsifier.step_count + 1
        x, y = batch_at(step, rank, world, args.batch, device, args.seed + 1)
        for i, (xs, ys) in enumerate(
            zip(x.chunk(args.accumulate), y.chunk(args.accumulate), strict=True)
        ):
            last = i == args.accumulate - 1
            sync = contextlib.nullcontext() if last else ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
                    loss = F.cross_entropy(ddp(xs), ys) / args.accumulate
                scaler.scale(loss).backward()
        scaler.step(optimizer)  # the topology updates inside, on schedule
        scaler.update()
        if rank == 0 and sparsifier.step_count % 50 == 0:
            total = loss.item() * args.accumulate
            step, updates = sparsifier.step_count, sparsifier.update_count
            print(f"step {step:4d}  loss {total:.3f}  updates {updates}")
    seconds = time.perf_counter() - start
    sent = meter.sparsetorch if meter is not None else 0

    same = masks_identical(sparsifier, device)
    if rank == 0:
        print(f"masks identical on {world} ranks: {'yes' if same else 'NO'}")
        print(sparsifier.summary())
        steps = sparsifier.step_count - first
        print(f"{steps} steps in {seconds:.1f} s on {world} x {device.type}")
    if meter is not None:
        report_comm(sent, meter.ddp, sparsifier, model, rank)
    if args.save and rank == 0:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sparsity": sparsifier.state_dict(),
            },
            args.save,
        )
    del ddp  # its reducer's threads end before the process group does
    dist.barrier()
    dist.destroy_process_group()


def masks_identical(sparsifier: st.Sparsifier, device: torch.device) -> bool:
    """Compare every rank's masks with rank 0's (one broadcast, for the check)."""
    ok = True
    for mask in sparsifier.masks.values():
        theirs = mask.to(torch.uint8).clone()
        dist.broadcast(theirs, 0)
        ok &= bool(torch.equal(theirs.bool(), mask))
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def report_comm(
    by_sparsetorch: int,
    by_ddp: int,
    sparsifier: st.Sparsifier,
    model: nn.Module,
    rank: int,
) -> None:
    masked = sum(m.numel() for m in sparsifier.masks.values())
    params = sum(p.numel() for p in model.parameters())
    steps, updates = sparsifier.step_count, sparsifier.update_count
    if rank != 0 or updates == 0:
        return
    print(f"masked weights: {masked:,}  parameters: {params:,}")
    print(
        f"sparsetorch all-reduce: {by_sparsetorch:,} B over {updates} updates = "
        f"{by_sparsetorch / updates:,.0f} B per update = "
        f"{by_sparsetorch / updates / masked:.2f} B per masked weight per update"
    )
    print(
        f"DDP gradient all-reduce: {by_ddp:,} B over {steps} steps = "
        f"{by_ddp / steps:,.0f} B per step = {by_ddp / steps / params:.2f} B "
        "per parameter per step"
    )
    interval = sparsifier.schedule.update_interval
    print(
        f"sparsetorch adds {by_sparsetorch / by_ddp:.2%} to DDP's gradient "
        f"traffic (one dense fp32 gradient every {interval} steps)"
    )


if __name__ == "__main__":
    main()
