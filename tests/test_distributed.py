"""LoFT and the probe under torch.distributed (gloo, 2 CPU processes, file:// rendezvous). Both tests' workers
run, in turn, on one pair of processes spawned once for the session (conftest's ``distributed``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import train
from torch.testing import assert_close

from loft_probe import LoFT, add_lora, attach, load_run, lora_pairs

pytestmark = pytest.mark.forks  # starts processes from the tests' fork server

STEPS, BATCH = 6, 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).double()
    add_lora(model, rank=3, targets=["0", "2"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in lora_pairs(model):
            pair.B.copy_(0.2 * torch.randn(pair.B.shape, generator=gen, dtype=torch.float64))
    return model


def data():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 10, generator=gen, dtype=torch.float64),
             torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def ddp_worker(rank: int, init_file: str, run_dir: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = LoFT.from_model(model, lr=1e-2, weight_decay=0.01)
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)  # each rank sees half of every batch
    probe = attach(ddp, optimizer, run_dir, every=2, shadow=True)
    train(ddp, optimizer, [(x[half], y[half]) for x, y in data()], probe)
    probe.close()
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


def fsdp_worker(rank: int, init_file: str, errors_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, hsdp, dense = make_model(), make_model(), torch.nn.Sequential(torch.nn.Linear(10, 12)).double()
    fully_shard(model)  # FSDP2's default: LoFT steps it, the probe measures it (tests/test_fsdp.py)
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))  # HSDP: refused
    fully_shard(dense)  # full fine-tuning under FSDP2: the probe refuses it
    messages = []
    optimizer = LoFT.from_model(model)
    for build in (lambda: LoFT.from_model(hsdp), lambda: optimizer.full_space_moments(optimizer.param_groups[0]),
                  lambda: attach(dense, torch.optim.AdamW(dense.parameters()), f"{errors_file}.run{rank}"),
                  lambda: attach(hsdp, torch.optim.AdamW(hsdp.parameters()), f"{errors_file}.hsdp{rank}")):
        try:
            build()
        except ValueError as exc:
            messages.append(str(exc))
    torch.save(messages, f"{errors_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


# The workers above, run by conftest's ``distributed``.
DISTRIBUTED_JOBS = {"ddp": (ddp_worker, ("ddp", "params")), "fsdp_refusals": (fsdp_worker, ("errors",))}


@pytest.mark.slow
def test_loft_and_probe_under_ddp_equal_one_process_on_the_whole_batch(distributed, tmp_path):
    folder = distributed.require("ddp")
    ranks = [torch.load(folder / f"params.{r}", weights_only=True) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical on both ranks

    model = make_model()
    optimizer = LoFT.from_model(model, lr=1e-2, weight_decay=0.01)
    probe = attach(model, optimizer, tmp_path / "single", every=2, shadow=True)
    train(model, optimizer, data(), probe)
    probe.close()
    for key, value in model.state_dict().items():
        assert_close(ranks[0][key], value, rtol=1e-10, atol=1e-12)

    ddp_run, single_run = load_run(folder / "ddp"), load_run(tmp_path / "single")
    assert ddp_run.meta["world_size"] == 2
    ddp_rows = ddp_run.metrics.query("layer != ''").sort_values(["step", "layer", "metric"]).reset_index(drop=True)
    single_rows = single_run.metrics.query("layer != ''").sort_values(["step", "layer", "metric"])
    single_rows = single_rows.reset_index(drop=True)
    assert ddp_rows[["step", "layer", "metric"]].equals(single_rows[["step", "layer", "metric"]])
    assert_close(torch.tensor(ddp_rows.value.to_numpy()), torch.tensor(single_rows.value.to_numpy()),
                 rtol=1e-7, atol=1e-9)
    assert ddp_run.snapshot_steps == single_run.snapshot_steps


@pytest.mark.slow
def test_what_fsdp2_layouts_are_refused(distributed):
    folder = distributed.require("fsdp_refusals")
    for rank in range(2):
        messages = torch.load(folder / f"errors.{rank}", weights_only=True)
        assert len(messages) == 4
        assert "LoFT steps DTensors sharded by FSDP2 on a 1-D mesh" in messages[0] and "of 2 dims" in messages[0]
        assert "full_space_moments needs a whole pair" in messages[1]
        assert "the probe measures FSDP2-sharded LoRA pairs, not sharded dense weights" in messages[2]
        assert "LoFT steps FSDP2 pairs on a 1-D mesh" in messages[3]  # the probe refuses what LoFT does not step
