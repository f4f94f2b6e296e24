"""Dynamic sparse training under FSDP2 (``fully_shard``): a small transformer.

Run on CPU with 4 processes (gloo)::

    torchrun --standalone --nproc_per_node=4 examples/fsdp.py
    python examples/fsdp.py                    # one process, unsharded: the baseline

The recipe: build the model whole, ``sparsify`` it, ``fully_shard`` each block and
the root, build the optimizer, attach it. Each mask is then sharded like its
weight; RigL's updates select on the shards exactly what one process would. The
script prints, per rank, what sparsetorch holds and sends (the numbers in
``docs/distributed.md``), then saves a ``torch.distributed.checkpoint`` and checks
that loading it restores every rank's masks and weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import sparsetorch as st
from sparsetorch import _fsdp  # (only to read its traffic counter)


class TinyLM(nn.Module):
    """Token embedding, ``layers`` pre-norm transformer blocks, a linear head."""

    def __init__(self, vocab: int, d_model: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                nhead=4,
                dim_feedforward=4 * d_model,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            h = block(h, src_mask=causal, is_causal=True)
        return self.head(h)  # type: ignore[no-any-return]


def batch(step: int, rank: int, world: int, args: argparse.Namespace):
    """This rank's slice of the global batch of ``step``: counting sequences."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    seq = (start + torch.arange(args.seq + 1)) % args.vocab
    n = args.batch // world
    seq = seq[rank * n : (rank + 1) * n]
    return seq[:, :-1], seq[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else 0
    world = dist.get_world_size() if sharded else 1
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.d_model, args.layers)
    sparsifier = st.sparsify(
        model,
        policy="rigl",
        sparsity=args.sparsity,
        total_steps=args.steps,
        update_interval=10,
    )
    if sharded:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sparsifier.attach_optimizer(optimizer)

    held = {"masks": 0, "dense_grads": 0}
    for step in range(args.steps):
        tokens, targets = batch(step, rank, world, args)
        optimizer.zero_grad()
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        if sparsifier.next_update_step() == step + 1:  # captured for this update
            held["dense_grads"] = sum(
                p.dense_grad.numel() * p.dense_grad.element_size()
                for p in sparsifier.topology.parametrizations.values()
                if p.dense_grad is not None
            )
        optimizer.step()
    held["masks"] = sum(
        _local(m).numel() * _local(m).element_size() for m in sparsifier.masks.values()
    )
    per_update = _fsdp.TRAFFIC["bytes"] / max(1, sparsifier.update_count)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() for p in sparsifier.topology.params.values())
    stats = {
        "rank": rank,
        "loss": float(loss),
        "updates": sparsifier.update_count,
        "mask_bytes": held["masks"],
        "dense_grad_bytes": held["dense_grads"],
        "update_bytes_sent": per_update,
        "update_calls": _fsdp.TRAFFIC["calls"] / max(1, sparsifier.update_count),
    }
    gathered = [stats] * world
    if sharded:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
    if rank == 0:
        # FSDP's own traffic per step: all-gather in forward and in backward, and
        # a reduce-scatter of the gradients, each (world-1)/world of the fp32 model.
        fsdp_step = 3 * 4 * params * (world - 1) / world if sharded else 0
        print(sparsifier.summary())
        print(f"\nworld size {world}: {params} parameters, {weights} masked")
        print(f"FSDP's traffic per step (per rank): {fsdp_step / 2**10:.1f} KiB")
        print("rank  local loss  updates  masks KiB  dense grads KiB  sent/update KiB")
        for s in gathered:
            kib = [s[k] / 2**10 for k in ("mask_bytes", "dense_grad_bytes")]
            print(
                f"{s['rank']:>4}  {s['loss']:>10.3f}  {s['updates']:>7}  "
                f"{kib[0]:>9.1f}  {kib[1]:>15.1f}  "
                f"{s['update_bytes_sent'] / 2**10:>15.1f}"
            )
        print(f"collectives per update: {gathered[0]['update_calls']:.0f}")
    check_checkpoint(model, optimizer, sparsifier, sharded)
    if sharded:
        dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def check_checkpoint(model, optimizer, sparsifier, sharded: bool) -> None:
    """Save with DCP and load it back: every rank's mask shards come back."""
    path = tempfile.mkdtemp() if not sharded or dist.get_rank() == 0 else None
    if sharded:
        holder = [path]
        dist.broadcast_object_list(holder)
        path = holder[0]

    def state():
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "sparsity": sparsifier.state_dict(sharded=True),
        }

    dcp.save(state(), checkpoint_id=path)
    before = {fqn: _local(m).clone() for fqn, m in sparsifier.masks.items()}
    loaded = state()
    dcp.load(loaded, checkpoint_id=path)
    set_model_state_dict(model, loaded["model"])
    set_optimizer_state_dict(model, optimizer, loaded["optim"])
    sparsifier.load_state_dict(loaded["sparsity"])
    same = all(torch.equal(_local(m), before[f]) for f, m in sparsifier.masks.items())
    if not sharded or dist.get_rank() == 0:
        print(f"checkpoint {path}: masks restored on every shard: {same}")


if __name__ == "__main__":
    main()
