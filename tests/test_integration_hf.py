"""The Hugging Face Trainer callback on a tiny PEFT BERT built from a config (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import loft_probe  # noqa: E402
from loft_probe import LoFT, load_run  # noqa: E402
from loft_probe.integrations.hf import ProbeCallback  # noqa: E402


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


@pytest.mark.parametrize("use_loft", [False, True])
def test_trainer_callback_records_a_run(tmp_path, use_loft):
    model = tiny_peft_bert()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, logging_steps=2, report_to=[], use_cpu=True,
                                          save_strategy="no", learning_rate=1e-3, seed=7, disable_tqdm=True)
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
                                  every=1, capture_grad=True)
        model(input_ids=ids).logits.pow(2).sum().backward()
        captured.append([layer.capture.take().clone() for layer in probe.layers])
        probe.close()
    for plain, checkpointed in zip(*captured, strict=True):
        assert plain.abs().max() > 1e-8  # a real gradient, not zeros that would match anything
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-12)


def test_trainer_timings_are_not_recorded_as_metrics():
    """The Trainer logs eval_runtime and throughputs beside eval_loss: only the loss and the metrics are kept."""
    logged = {}

    class Recorder:
        def log(self, **values):
            logged.update(values)

    callback = ProbeCallback("unused")
    callback.probe = Recorder()
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
