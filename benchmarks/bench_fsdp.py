"""What LoFT exchanges per step on FSDP2, against what FSDP2 itself moves for the same LoRA pair (gloo, CPU ranks).

    python benchmarks/bench_fsdp.py [--size 4096,4096,16] [--world 2] [--steps 4]

One adapted layer W0 + s·B·A (W0 frozen and left out of FSDP2, so that every collective FSDP2 issues is the
pair's), sharded as a non-root FSDP2 module (all-gathered in forward and again in backward, gradients
reduce-scattered), once per layout of A: ``Shard(1)`` (``lora_shard_placement``) and ``Shard(0)`` (FSDP2's
default). Every collective is counted at the dispatcher (c10d and functional collectives alike) by its logical
size: an all-gather's gathered tensor, a reduce-scatter's input, an all-reduce's tensor. Per step and rank also:
the share of the m×n reconstruction this rank computes (its rows of W on a B-step, its columns on an A-step), the
bytes of LoFT state it holds and its step time, next to one process stepping the same pair. (Peak resident memory
is not shown: on the CPU its growth over the steps, ~25 MiB, is allocator and BLAS workspace, not LoFT's.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from loft_probe import LoFT, add_lora, lora_pairs

BATCH = 8


class CollectiveBytes(TorchDispatchMode):
    """Sums the logical size in bytes of every collective dispatched while active."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world, self.bytes, self.calls = world, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func._opname}"
        if "c10d" in func.namespace and "wait" not in name and "wrap" not in name:
            tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
            size = max(t.numel() * t.element_size() for t in tensors)
            if name == "_c10d_functional.all_gather_into_tensor":  # its output is made by the op: world × input
                size *= self.world
            self.bytes += size
            self.calls += 1
        return func(*args, **(kwargs or {}))


def make_model(m: int, n: int, r: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n, m))
    add_lora(model, rank=r, alpha=2 * r, targets=["0"])
    with torch.no_grad():
        lora_pairs(model)[0].B.normal_(0, 0.01)  # a B-step then an A-step with a non-zero partner
    return model


def state_bytes(optimizer: LoFT) -> int:
    """Bytes of optimizer state this process holds (a DTensor's local shard only)."""
    from loft_probe.optim.sharding import local

    return sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values())


def worker(rank: int, world: int, init_file: str, size: tuple[int, int, int], steps: int, on_columns: bool,
           out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    from loft_probe.optim.sharding import lora_shard_placement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m, n, r = size
    model = make_model(m, n, r)
    layer = model[0]
    placement = lora_shard_placement(model) if on_columns else None
    fully_shard(layer, shard_placement_fn=placement, ignored_params={layer.base_layer.weight, layer.base_layer.bias})
    fully_shard(model)
    optimizer = LoFT.from_model(model, lr=1e-3, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, n, generator=gen)
    rows = []
    for t in range(steps):
        optimizer.zero_grad()
        fsdp = CollectiveBytes(world)
        with fsdp:
            model(x).pow(2).mean().backward()
        moving = optimizer.moving_sides(optimizer.param_groups[0])
        loft = CollectiveBytes(world)
        with loft:
            optimizer.step()
        share = (optimizer.param_groups[0]["params"][0].to_local().shape[0] / m if moving == (0,)
                 else torch.arange(n).chunk(world)[rank].numel() / n)
        rows.append((t, "BA"[moving[0]], fsdp.bytes, fsdp.calls, loft.bytes, loft.calls, share))
    out[(on_columns, rank)] = (rows, state_bytes(optimizer), step_seconds(model, optimizer, x))
    dist.destroy_process_group()


def step_seconds(model: torch.nn.Module, optimizer: LoFT, x: torch.Tensor, repeats: int = 4) -> float:
    """The fastest of ``repeats`` optimizer steps, timed outside the counting mode (it costs a Python call per op)."""
    times = []
    for _ in range(repeats):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times)


def one_process(size: tuple[int, int, int], steps: int, world: int) -> tuple[float, int]:
    torch.set_num_threads(1)
    m, n, r = size
    model = make_model(m, n, r)
    optimizer = LoFT.from_model(model, lr=1e-3, max_grad_norm=1.0)
    x = torch.randn(BATCH * world, n)
    seconds = step_seconds(model, optimizer, x, steps)  # the first step creates the state: not the fastest
    return seconds, state_bytes(optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4096,4096,16", help="m,n,r")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    m, n, r = size = tuple(int(v) for v in args.size.split(","))
    bound = 2 * (m + n) * r * 4
    print(f"pair {m}x{n} r={r} float32 on {args.world} gloo ranks; bound 2*(m+n)*r*4 = {bound} bytes;"
          f" the pair itself is {(m + n) * r * 4} bytes")
    with mp.Manager() as manager:
        out = manager.dict()
        for on_columns in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(worker, args=(args.world, os.path.join(tmp, "init"), size, args.steps, on_columns, out),
                         nprocs=args.world, join=True)
        results = dict(out)
    print("layout of A  step side  FSDP2 fwd+bwd bytes (calls)  LoFT step bytes (calls)  LoFT/bound  "
          "rank-0 m×n share")
    for on_columns in (True, False):
        rows = results[(on_columns, 0)][0]
        for t, side, fsdp_bytes, fsdp_calls, loft_bytes, loft_calls, share in rows:
            print(f"{'Shard(1)' if on_columns else 'Shard(0)':>12} {t:4d} {side:>4}  {fsdp_bytes:>18} ({fsdp_calls})"
                  f"  {loft_bytes:>16} ({loft_calls})  {loft_bytes / bound:10.3f}  {share:16.3f}")
        held = [results[(on_columns, rank)][1] for rank in range(args.world)]
        seconds = [round(results[(on_columns, rank)][2], 3) for rank in range(args.world)]
        print(f"{'':>12} LoFT state bytes per rank: {held}; fastest step per rank (s): {seconds}")
    seconds, held = one_process(size, args.steps, args.world)
    print(f"one process, batch {args.world * BATCH}: fastest step {seconds:.3f} s, LoFT state bytes {held}")


if __name__ == "__main__":
    main()
