"""The Hugging Face Trainer callback on a tiny PEFT BERT built from a config (nothing downloaded)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import loft_probe  # noqa: E402
from loft_probe import LoFT, load_run  # noqa: E402
from loft_probe.integrations.hf import ProbeCallback  # noqa: E402
from loft_probe.probe import Gradients, ProbeWarning  # noqa: E402


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 8), generator=gen)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def tiny_peft_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=50, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    return peft.get_peft_model(model, lora)


def tiny_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    """Six optimizer steps of two micro-batches each, on the CPU, nothing saved or reported."""
    return transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2, "logging_steps": 2, "report_to": [], "use_cpu": True, "save_strategy": "no",
        "learning_rate": 1e-3, "seed": 7, "disable_tqdm": True, **overrides})


@pytest.mark.parametrize("use_loft", [False, True])
def test_trainer_callback_records_a_run(tmp_path, use_loft):
    model = tiny_peft_bert()
    args = tiny_args(tmp_path)
    optimizers = (LoFT.from_model(model, lr=1e-3), None) if use_loft else (None, None)
    callback = ProbeCallback(tmp_path / "run", every=2, shadow=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TinyData(), callbacks=[callback],
                                   optimizers=optimizers)
    trainer.train()
    run = load_run(tmp_path / "run")
    assert run.meta["method"] == ("loft" if use_loft else "lora")
    assert run.meta["seed"] == 7 and run.meta["closed"] is True
    assert [layer["name"] for layer in run.meta["layers"]] == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    metrics = run.metrics
    assert sorted(metrics.query("metric == 'loss'").step) == [2, 4, 6]
    assert sorted(metrics.query("metric == 'shadow_update_cosine'").step.unique()) == [2, 4, 6]
    assert metrics.value.notna().all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_captured_gradient_is_unchanged_by_gradient_checkpointing(tmp_path, reentrant):
    """Checkpointing re-runs forwards during backward: G must be captured once, equal to the plain run's."""
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    captured = []
    for checkpointing in (False, True):
        model = tiny_peft_bert()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        probe = loft_probe.attach(model, LoFT.from_model(model, lr=1e-3), tmp_path / f"run{checkpointing}",
                                  every=1, gradients=Gradients(capture=True))
        model(input_ids=ids).logits.pow(2).sum().backward()
        captured.append([layer.capture.take().clone() for layer in probe.layers])
        probe.close()
    for plain, checkpointed in zip(*captured, strict=True):
        assert plain.abs().max() > 1e-8  # a real gradient, not zeros that would match anything
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-12)


def recording_callback() -> tuple[ProbeCallback, dict]:
    """A ProbeCallback whose probe only collects what the callback logs into the returned dict."""
    logged = {}

    class Recorder:
        def log(self, **values):
            logged.update(values)

    callback = ProbeCallback("unused")
    callback.probe = Recorder()
    return callback, logged


def test_trainer_timings_are_not_recorded_as_metrics():
    """The Trainer logs eval_runtime and throughputs beside eval_loss: only the loss and the metrics are kept."""
    callback, logged = recording_callback()
    callback.on_log(None, None, None, logs={"loss": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.8, "eval_runtime": 1.2,
                                            "eval_samples_per_second": 30.0, "eval_steps_per_second": 4.0,
                                            "learning_rate": 1e-3})
    assert logged == {"loss": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.8}


def test_a_dora_model_is_not_labelled_full_finetuning(tmp_path):
    """DoRA layers are not W0 + s·B·A: the probe reads their weights as dense ones, and must not label the run
    full fine-tuning (it would become the default reference of every comparison)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=50, num_labels=2)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config),
                                peft.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.warns(UserWarning), loft_probe.attach(model, optimizer, tmp_path / "run") as probe:
        assert probe.method == "other"


class LoggedGradNorms(transformers.TrainerCallback):
    """The Trainer's own pre-clip gradient norm (what accelerate's clip_grad_norm_ returned), per logged step."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.norms[state.global_step] = logs["grad_norm"]


def test_trainer_clip_coefficient_is_recorded_every_step(tmp_path):
    """min(1, c/‖g‖) at every optimizer step, ‖g‖ the norm the Trainer clipped by (logged at every step here),
    under gradient accumulation; c sits inside the range of the norms, so that some steps clip and some do not."""
    logged = LoggedGradNorms()
    c = 0.45
    model = tiny_peft_bert()
    trainer = transformers.Trainer(model=model, args=tiny_args(tmp_path, max_grad_norm=c, logging_steps=1),
                                   train_dataset=TinyData(), callbacks=[ProbeCallback(tmp_path / "run", every=3),
                                                                        logged])
    trainer.train()
    rows = load_run(tmp_path / "run").rows("trainer_clip_coefficient").set_index("step")
    assert list(rows.index) == [1, 2, 3, 4, 5, 6] and set(rows.layer) == {""}
    expected = {step: min(1.0, c / norm) for step, norm in logged.norms.items()}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert min(expected.values()) < 1.0 == max(expected.values())  # both regimes are exercised
    for step, value in expected.items():
        assert rows.at[step, "value"] == pytest.approx(value, rel=1e-5, abs=0)


@pytest.mark.parametrize(("trainer_clip", "loft_clip", "shadow", "expected"), [
    (1.0, 1.0, True, ["the Trainer clips gradients to norm 1 and LoFT clips them again to 1; ",
                      "the Trainer clips gradients to norm 1 before optimizer.step, the captured full gradient G "]),
    (1.0, None, True, ["the Trainer clips gradients to norm 1 before optimizer.step, the captured full gradient G "]),
    (1.0, 1.0, False, ["the Trainer clips gradients to norm 1 and LoFT clips them again to 1; "]),
    (0.0, 1.0, True, []),
])
def test_trainer_clipping_warns_once(tmp_path, trainer_clip, loft_clip, shadow, expected):
    model = tiny_peft_bert()
    optimizer = LoFT.from_model(model, lr=1e-3, max_grad_norm=loft_clip)
    trainer = transformers.Trainer(model=model, args=tiny_args(tmp_path, max_grad_norm=trainer_clip),
                                   train_dataset=TinyData(), optimizers=(optimizer, None),
                                   callbacks=[ProbeCallback(tmp_path / "run", every=2, shadow=shadow)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, ProbeWarning)]
    assert len(messages) == len(expected)
    for message, start in zip(messages, expected, strict=True):
        assert message.startswith("loft_probe: " + start) and "max_grad_norm=0" in message and "\n" not in message
    recorded = load_run(tmp_path / "run").rows("trainer_clip_coefficient")
    assert len(recorded) == (6 if trainer_clip else 0)  # no clipping, no coefficient


def test_trainer_clip_coefficient_under_ddp_comes_from_the_logged_norm():
    """Under DDP the gradient hooks would see one rank's gradient: the Trainer's logged grad_norm is used."""
    callback, logged = recording_callback()
    callback._logged_norm = True
    callback.on_log(transformers.TrainingArguments(output_dir="unused", max_grad_norm=0.5), None, None,
                    logs={"loss": 0.5, "grad_norm": 2.0, "learning_rate": 1e-3})
    assert logged == {"loss": 0.5, "trainer_clip_coefficient": 0.25}
    assert math.isnan(loft_probe.integrations.hf.clip_coefficient(1.0, math.nan))
