"""Fine-tuning tasks on which LoRA, LoFT and full fine-tuning are compared.

    task = build_task("digits", seed=0)
    batches = task.batches(0)
    loss = task.loss(task.model, next(batches))
    metrics = task.evaluate(task.model)  # {"loss": ..., "accuracy": ...}

Tasks:
    matfact           rank-8 matrix factorisation from the LoFT paper (one Linear, weight from zero)
    digits            an MLP pretrained on digits 0–4 and fine-tuned on 5–9 (scikit-learn data)
    minilm-sentiment  MiniLM-L6's first layers plus a head on Rotten Tomatoes snippets (offline weights)
    minilm-plot       the same model on the same corpus: is a text a plot summary or a critic's snippet?
    minilm-convention the same model on the 2012 US convention speeches: a Democrat's sentence or a Republican's?
    minilm-debates    the same model on the 2016 US presidential debates: a Democratic or a Republican candidate's?
"""

from __future__ import annotations

from loft_probe.tasks import convention, debates, digits, matfact, sentiment
from loft_probe.tasks.base import Task

BUILDERS = {"matfact": matfact.build, "digits": digits.build, "minilm-sentiment": sentiment.build,
            "minilm-plot": sentiment.build_plot, "minilm-convention": convention.build,
            "minilm-debates": debates.build}
TASKS = tuple(BUILDERS)

__all__ = ["TASKS", "Task", "build_task"]


def build_task(name: str, seed: int = 0, **options) -> Task:
    """Build task `name` (one of TASKS); everything random in it is drawn from `seed`.

    Options are the fields of the task's config (`MatFactConfig`, `DigitsConfig`, `SentimentConfig`,
    `PlotConfig`, `ConventionConfig`, `DebatesConfig`).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return BUILDERS[name](seed, **options)
