"""LoFT on FSDP2 (``fully_shard``; gloo, 2 CPU processes, file:// rendezvous) against one process stepping the
unsharded model on the concatenated batch; a NaN on one rank; distributed checkpoints; mixed precision; a PEFT model;
the probe's run directory against one process's, and a probe failing on rank 0.

The small model exercises both layouts of A that LoFT steps: layer "0" (W 7×6) has n = 6, so
``lora_shard_placement`` shards its A on columns; layers "2" (W 9×7) and "4" (the head, W 1×9) have odd n, where
FSDP2 refuses ``Shard(1)`` and A stays on its rows. Every other dimension is odd (m = 7, 9, 1, r = 3, 1), so those
shards are uneven, and the head's are empty on rank 1 (r = 1, B has one row): rank 1 steps a pair, and AdamW on
the head's bias, without a row of its own. Two biases get AdamW on DTensors. Every test's worker runs, in turn, on
one pair of processes spawned once for the session (conftest's ``distributed``, with tests/test_distributed.py's):
a spawn costs seconds, a worker a fraction of that. The workers write what they saw; the tests check it against one
process.
"""

from __future__ import annotations

import importlib.util
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from loft_probe import LoFT, Snapshots, add_lora, attach, load_run, lora_pairs
from loft_probe.probe import ProbeWarning, every
from loft_probe.run import RUN_LAYER

pytestmark = pytest.mark.forks  # starts processes from the tests' fork server

STEPS, BATCH, WORLD = 10, 8, 2
OPTIONS = {"lr": 1e-2, "eps": 1e-6, "weight_decay": 0.01, "max_grad_norm": 0.05}
# (name, dtype, PEFT's B = 0 or a non-zero B, options): the cases of the equality test. foreach=True: torch's
# multi-tensor AdamW on the shards (sharded pairs still step one by one). Both factors moving at every step, and
# the factor-space ablation (transport against raw partners), exercise the other paths of the sharded step.
CASES = [("f64-peft", torch.float64, False, {}), ("f64-nonzero", torch.float64, True, {}),
         ("f32-nonzero", torch.float32, True, {"foreach": True}),
         ("f64-both-move", torch.float64, True, {"alternating": False}),
         ("f64-factor-space", torch.float64, True, {"second_moment": "simple", "projected_update": False})]
TOLERANCE = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


def make_model(dtype: torch.dtype, nonzero_B: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 1)).to(dtype)
    add_lora(model, rank=3, alpha=6, targets=["0", "2"])
    add_lora(model, rank=1, alpha=2, targets=["4"])  # r ≤ min(m, n) = 1
    for layer in ("2", "4"):  # AdamW on DTensors: 9 entries split 5 + 4, and 1 entry split 1 + 0
        model.get_submodule(layer).base_layer.bias.requires_grad_(True)
    if nonzero_B:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pair in lora_pairs(model):
                pair.B.copy_(0.3 * torch.randn(pair.B.shape, generator=gen, dtype=torch.float64))
    return model


def data(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 6, generator=gen).to(dtype), torch.randn(BATCH, 1, generator=gen).to(dtype))
            for _ in range(STEPS)]


def step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    optimizer.step()


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` on layers "0" and "2" and the root, A on columns where n divides by the world size."""
    from torch.distributed.fsdp import fully_shard

    from loft_probe.optim.sharding import lora_shard_placement

    placement = lora_shard_placement(model)
    for layer in ("0", "2"):
        fully_shard(model.get_submodule(layer), shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    return model


def sharded(dtype: torch.dtype, nonzero_B: bool, **options) -> tuple[torch.nn.Module, LoFT]:
    model = shard(make_model(dtype, nonzero_B))
    return model, LoFT.from_model(model, **{**OPTIONS, **options})


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def layout(t) -> tuple:
    """(global shape, local shape, placements) of a DTensor state."""
    return tuple(t.shape), tuple(t.to_local().shape), tuple(str(p) for p in t.placements)


def equality_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results = {}
    for name, dtype, nonzero_B, options in CASES:
        model, optimizer = sharded(dtype, nonzero_B, **options)
        for x, y in data(dtype):
            step(model, optimizer, x[half], y[half])
        names = {p: n for n, p in model.named_parameters()}
        results[name] = {
            "params": {n: whole(p).detach() for n, p in model.named_parameters()},
            "state": {names[p]: {k: whole(v) for k, v in s.items()} for p, s in optimizer.state.items()},
            "layout": {names[p]: {k: layout(v) for k, v in s.items() if hasattr(v, "placements")}
                       for p, s in optimizer.state.items()},
            "a_placements": [str(pair.A.placements) for pair in lora_pairs(model)],
        }
    torch.save(results, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


def one_process(dtype: torch.dtype, nonzero_B: bool, **options) -> tuple[torch.nn.Module, LoFT]:
    model = make_model(dtype, nonzero_B)
    optimizer = LoFT.from_model(model, **{**OPTIONS, **options})
    for x, y in data(dtype):
        step(model, optimizer, x, y)
    return model, optimizer


def chunk_rows(size: int, rank: int) -> int:
    """The rows of ``size`` on ``rank`` under ``Shard``: torch.chunk's split, none beyond its last chunk."""
    chunks = torch.arange(size).chunk(WORLD)
    return chunks[rank].numel() if rank < len(chunks) else 0


@pytest.mark.slow
def test_loft_on_fsdp2_equals_one_process_on_the_concatenated_batch(distributed):
    folder = distributed.require("equality")
    ranks = [torch.load(folder / f"out.{r}", weights_only=True) for r in range(WORLD)]
    for name, dtype, nonzero_B, options in CASES:
        got = ranks[0][name]
        assert got["a_placements"] == ["(Shard(dim=1),)", "(Shard(dim=0),)", "(Shard(dim=0),)"]  # both layouts
        model, optimizer = one_process(dtype, nonzero_B, **options)
        for key, value in model.named_parameters():
            assert torch.equal(got["params"][key], ranks[1][name]["params"][key]), (name, key)
            assert_close(got["params"][key], value.detach(), **TOLERANCE[dtype], msg=f"{name}: {key}")
        names = {p: n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():  # the state too: the frames are SVDs of the same numbers
            for key, value in state.items():
                assert_close(got["state"][names[p]][key], value, **TOLERANCE[dtype], msg=f"{name}: {names[p]}.{key}")
        # every sharded state holds this rank's rows of W (B-side, E_A) or columns of W (A-side, E_B) only
        for rank in range(WORLD):
            for pair in lora_pairs(model):
                B_name, A_name = names[pair.B], names[pair.A]
                (m, r), n = pair.B.shape, pair.A.shape[1]
                states = ranks[rank][name]["layout"]
                assert states[B_name]["exp_avg"][1] == (chunk_rows(m, rank), r)
                assert states[B_name]["frame"][1][0] == chunk_rows(n, rank)
                assert states[A_name]["exp_avg"][1] == (r, chunk_rows(n, rank))
                assert states[A_name]["exp_avg_sq"][1][0] == chunk_rows(n, rank)
                assert states[A_name]["frame"][1][0] == chunk_rows(m, rank)
    # the clip was active: without it one process ends elsewhere
    unclipped, _ = one_process(torch.float64, True, max_grad_norm=None)
    clipped, _ = one_process(torch.float64, True)
    assert (unclipped[0].lora_A.weight - clipped[0].lora_A.weight).abs().max() > 1e-4


def nonfinite_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model, optimizer = sharded(torch.float64, True)
    x, y = data(torch.float64)[0]
    step(model, optimizer, x, y)  # one good step: the states exist
    before = {n: whole(p).detach().clone() for n, p in model.named_parameters()}
    states = {(id(p), k): whole(v).clone() for p, s in optimizer.state.items() for k, v in s.items()}
    optimizer.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    if rank == 1:  # a NaN in one rank's shard only: rank 0's gradients are all finite
        model[2].lora_B.weight.grad.to_local()[0, 0] = float("nan")
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(whole(p), before[n])]
    changed = [k for p, s in optimizer.state.items() for k, v in s.items()
               if not torch.equal(whole(v), states[(id(p), k)])]
    skipped = [group["skipped_steps"] for group in optimizer.param_groups]
    torch.save({"moved": moved, "changed": changed, "skipped": skipped}, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(distributed):
    folder = distributed.require("nonfinite")
    for rank in range(WORLD):
        result = torch.load(folder / f"out.{rank}", weights_only=True)
        assert result["moved"] == [] and result["changed"] == [], (rank, result)
        assert set(result["skipped"]) == {1}, (rank, result)


def train_steps(model, optimizer, batches, half: slice) -> None:
    for x, y in batches:
        step(model, optimizer, x[half], y[half])


def checkpoint_worker(rank: int, init_file: str, ckpt_dir: str, out_file: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    batches = data(torch.float64)
    model, optimizer = sharded(torch.float64, True)
    train_steps(model, optimizer, batches[:5], half)  # odd: the restored run continues with an A-step
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    train_steps(model, optimizer, batches[5:], half)

    restored, restored_optimizer = sharded(torch.float64, True)  # fresh: the initial weights, no state
    model_sd, optim_sd = get_state_dict(restored, restored_optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    set_state_dict(restored, restored_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train_steps(restored, restored_optimizer, batches[5:], half)

    names = {p: n for n, p in model.named_parameters()}
    twins = dict(zip(model.parameters(), restored.parameters(), strict=True))
    differ = [n for p, n in names.items() if not torch.equal(p.to_local(), twins[p].to_local())]
    differ += [f"{names[p]}.{k}" for p, s in optimizer.state.items() for k, v in s.items()
               if not torch.equal(whole(v), whole(restored_optimizer.state[twins[p]][k]))]
    params = {n: whole(p).detach() for n, p in model.named_parameters()}
    torch.save({"differ": differ, "params": params}, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_checkpoint_round_trip_same_world_size_and_onto_one_process(distributed):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = distributed.require("checkpoint")
    ckpt = folder / "ckpt"
    for rank in range(WORLD):  # same world size: the continuation is bit-identical, parameters and state
        assert torch.load(folder / f"out.{rank}", weights_only=True)["differ"] == []
    sharded_run = torch.load(folder / "out.0", weights_only=True)["params"]

    # 2 → 1: the sharded checkpoint restored into one process stepping the unsharded model on the whole batch
    model = make_model(torch.float64, True)
    optimizer = LoFT.from_model(model, **OPTIONS)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert int(optimizer.state[lora_pairs(model)[0].B]["step"]) == 5
    train_steps(model, optimizer, data(torch.float64)[5:], slice(None))
    for key, value in model.named_parameters():
        assert_close(sharded_run[key], value.detach(), rtol=1e-6, atol=1e-6, msg=key)


def mixed_precision_worker(rank: int, init_file: str, out_file: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from loft_probe.optim.sharding import lora_shard_placement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    model = make_model(torch.float32, True)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    placement = lora_shard_placement(model)
    for layer in ("0", "2"):
        fully_shard(model.get_submodule(layer), shard_placement_fn=placement, mp_policy=policy)
    fully_shard(model, shard_placement_fn=placement, mp_policy=policy)
    optimizer = LoFT.from_model(model, **OPTIONS)
    for x, y in data(torch.float32):
        step(model, optimizer, x[half], y[half].bfloat16())
    dtypes = sorted({str(v.dtype) for s in optimizer.state.values() for v in s.values()})
    torch.save({"params": {n: whole(p).detach() for n, p in model.named_parameters()}, "dtypes": dtypes},
               f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_mixed_precision_bf16_compute_fp32_reduce_equals_one_process_doing_the_same(distributed):
    """FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 reduce) against one process that computes each rank's
    half-batch gradient on a bf16 copy of the model and averages them in float32: the same numbers FSDP2 reduces.
    LoFT's state stays float32, as for a float32 model in one process."""
    import copy

    got = torch.load(distributed.require("mixed_precision") / "out.0", weights_only=True)
    assert got["dtypes"] == ["torch.float32"]
    model = make_model(torch.float32, True)
    optimizer = LoFT.from_model(model, **OPTIONS)
    trained = [p for p in model.parameters() if p.requires_grad]
    for x, y in data(torch.float32):
        grads = [torch.zeros_like(p) for p in trained]
        for rank in range(WORLD):
            half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            low = copy.deepcopy(model).to(torch.bfloat16)
            (low(x[half].bfloat16()) - y[half].bfloat16()).pow(2).mean().backward()
            low_trained = [p for p in low.parameters() if p.requires_grad]
            for g, p in zip(grads, low_trained, strict=True):
                g.add_(p.grad.float())
        for p, g in zip(trained, grads, strict=True):
            p.grad = g / WORLD
        optimizer.step()
    for key, value in model.named_parameters():
        assert_close(got["params"][key], value.detach(), rtol=1e-6, atol=1e-6, msg=key)


def peft_bert() -> torch.nn.Module:
    """A tiny PEFT BERT (LoRA r = 4 on query and value, a trainable classifier copy), float64, no dropout (its
    random masks would differ between ranks and one process), B ≠ 0."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=50, num_labels=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config), lora).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in lora_pairs(model):
            pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=gen, dtype=torch.float64))
    return model


def token_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, 50, (STEPS // 2, BATCH, 8), generator=torch.Generator().manual_seed(0))
    return [(i, (i[:, 0] > 25).long()) for i in ids]


def train_bert(model, optimizer, half: slice) -> None:
    for ids, labels in token_batches():
        optimizer.zero_grad()
        model(input_ids=ids[half], labels=labels[half]).loss.backward()
        optimizer.step()


def bert_worker(rank: int, init_file: str, out_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from loft_probe.optim.sharding import lora_shard_placement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = peft_bert()
    placement = lora_shard_placement(model)
    for layer in model.base_model.model.bert.encoder.layer:  # one FSDP2 group per transformer layer
        fully_shard(layer, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    optimizer = LoFT.from_model(model, **OPTIONS)
    train_bert(model, optimizer, slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD))
    torch.save({n: whole(p).detach() for n, p in model.named_parameters() if p.requires_grad}, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_peft_transformer_sharded_per_layer_equals_one_process(distributed):
    pytest.importorskip("peft")
    got = torch.load(distributed.require("bert") / "out.0", weights_only=True)
    model = peft_bert()
    optimizer = LoFT.from_model(model, **OPTIONS)
    assert len(lora_pairs(model)) == 4 and len(got) == 10  # 4 pairs, the classifier's weight and bias
    train_bert(model, optimizer, slice(None))
    for key, value in model.named_parameters():
        if value.requires_grad:
            assert_close(got[key], value.detach(), rtol=1e-10, atol=1e-10, msg=key)


# The probe: LoFT (its full-space moments rebuilt from gathered state) and AdamW (factor moments lifted through
# gathered factors), each with a shadow; records every 2nd step, snapshots every 4th and at close (step 10).
PROBED = {"loft": lambda model: LoFT.from_model(model, **OPTIONS),
          "adamw": lambda model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                                   weight_decay=0.01)}
PROBE_OPTIONS = {"every": 2, "shadow": True, "snapshots": Snapshots(schedule=every(4))}


def train_outputs(model, optimizer, half: slice) -> list[float]:
    """Trains on ``half`` of every batch; returns the model's summed output on the whole first batch after each
    step (that training went on, and alike on every rank)."""
    outputs = []
    for x, y in data(torch.float64):
        step(model, optimizer, x[half], y[half])
        with torch.no_grad():
            outputs.append(float(model(data(torch.float64)[0][0]).sum()))
    return outputs


def probe_worker(rank: int, init_file: str, run_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for name, build in PROBED.items():
        model = shard(make_model(torch.float64, True))
        optimizer = build(model)
        with attach(model, optimizer, f"{run_dir}/{name}", **PROBE_OPTIONS):
            train_outputs(model, optimizer, half)
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


def layer_rows(run):
    """The run's per-layer rows (the run-level ones hold each rank's own loss), in one order."""
    rows = run.metrics.query(f"layer != '{RUN_LAYER}'").sort_values(["step", "layer", "metric"])
    return rows.reset_index(drop=True)


@pytest.mark.slow
def test_the_probe_on_fsdp2_writes_the_run_directory_of_one_process_on_the_concatenated_batch(distributed, tmp_path):
    folder = distributed.require("probe")
    for name, build in PROBED.items():
        model = make_model(torch.float64, True)
        optimizer = build(model)
        with attach(model, optimizer, tmp_path / "one" / name, **PROBE_OPTIONS):
            train_outputs(model, optimizer, slice(None))
        fsdp, one = load_run(folder / "fsdp" / name), load_run(tmp_path / "one" / name)
        assert fsdp.meta["world_size"] == WORLD and fsdp.meta["layers"] == one.meta["layers"]  # fingerprints too
        assert fsdp.snapshot_steps == one.snapshot_steps == [4, 8, 10]
        got, want = layer_rows(fsdp), layer_rows(one)
        assert got[["step", "layer", "metric"]].equals(want[["step", "layer", "metric"]]), name
        assert {"shadow_update_cosine", "factor_grad_norm", "residual_left", "intruders"} <= set(want.metric)
        if name == "loft":  # LoFT's moments, rebuilt on rank 0 from the state gathered whole
            assert {"shadow_m_rel_error", "shadow_v_cosine", "shadow_precond_proj_cosine"} <= set(want.metric)
        assert_close(torch.tensor(got.value.to_numpy()), torch.tensor(want.value.to_numpy()), rtol=1e-6,
                     atol=1e-12, msg=name)
        for t in one.snapshot_steps:
            for layer, tensors in one.snapshot(t).items():
                for what in ("delta.S", "adapter.B", "adapter.A", "shadow_m.S"):
                    assert_close(fsdp.snapshot(t)[layer][what], tensors[what], rtol=1e-6, atol=1e-12,
                                 msg=f"{name} {t} {layer} {what}")


def failing_probe_worker(rank: int, init_file: str, run_dir: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))  # a rank left waiting raises instead of hanging
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    model, optimizer = sharded(torch.float64, True)
    probe = attach(model, optimizer, run_dir, **PROBE_OPTIONS)

    def broken(layer, scratch):
        raise RuntimeError("measuring failed")

    probe.recorder.step_values = broken  # rank 0's measuring fails at step 2; every rank still gathers after it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = train_outputs(model, optimizer, half)
        probe.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, ProbeWarning)]
    torch.save({"outputs": outputs, "warnings": messages}, f"{out_file}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer's last collective is in flight
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_probe_failing_on_rank_0_disables_itself_and_training_goes_on_on_every_rank(distributed):
    folder = distributed.require("failing_probe")  # a rank left waiting fails it (the group's 30 s timeout)
    ranks = [torch.load(folder / f"out.{r}", weights_only=True) for r in range(WORLD)]
    assert len(ranks[0]["warnings"]) == 1 and "probe disabled, training continues" in ranks[0]["warnings"][0]
    assert "measuring failed" in ranks[0]["warnings"][0] and ranks[1]["warnings"] == []
    assert len(ranks[0]["outputs"]) == STEPS and ranks[0]["outputs"] == ranks[1]["outputs"]
    model = make_model(torch.float64, True)  # one process without a probe: the probe did not change training
    unprobed = train_outputs(model, LoFT.from_model(model, **OPTIONS), slice(None))
    assert_close(torch.tensor(ranks[0]["outputs"]), torch.tensor(unprobed), rtol=1e-10, atol=1e-12)


# The workers above, run by conftest's ``distributed`` (the failing probe last: a rank it left waiting would end the
# jobs after it); the PEFT model's only where peft is.
DISTRIBUTED_JOBS = {"equality": (equality_worker, ("out",)), "nonfinite": (nonfinite_worker, ("out",)),
                    "checkpoint": (checkpoint_worker, ("ckpt", "out")),
                    "mixed_precision": (mixed_precision_worker, ("out",)), "probe": (probe_worker, ("fsdp",))}
if importlib.util.find_spec("peft"):
    DISTRIBUTED_JOBS["bert"] = (bert_worker, ("out",))
DISTRIBUTED_JOBS["failing_probe"] = (failing_probe_worker, ("run", "out"))
