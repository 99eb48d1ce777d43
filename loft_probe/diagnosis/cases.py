"""The labelled causes of the diagnosis benchmark: each injects one known fault into a built-in task's run, with
the findings that name it written down before anything was run.

A cause changes one thing against the task's defaults (``Cause`` fields); ``expect`` lists the finding codes
that name the cause (any one of them is a hit), ``allow`` the codes that are true consequences of it without
naming it (a divergence after lr ×100 is allowed, not a hit). A warning outside both is a *wrong cause*.
Healthy runs expect nothing: any warning on them is a false alarm.

The split: thresholds are fitted on CALIBRATION (seeds 0–1 of matfact, digits and MiniLM sentiment, cut to one
encoder layer); EVALUATION holds seeds 2–3 of those tasks (held-out seeds) and tasks no threshold was fitted on
(held-out tasks: MiniLM, the same cut encoder, telling plot summaries from critics' snippets in the same corpus;
telling a Democrat's sentence from a Republican's in the 2012 convention speeches; and a Democratic candidate's
sentence from a Republican one's in the 2016 presidential debates). The debates task was added after a refit of
the rules on the first two held-out tasks had begun, untouched by it: its runs were trained without anyone reading
their diagnosis, so it measures that refit. The first two are now READ_BY_A_REFIT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cause:
    name: str
    about: str  # what was injected, in words
    methods: tuple[str, ...]  # the methods it applies to
    expect: tuple[str, ...]  # finding codes that name the cause (empty: healthy, no warning expected)
    allow: tuple[str, ...] = ()  # true consequences that do not name it
    lr_factor: float = 1.0  # times the task's default lr for the method
    steps_factor: float = 1.0  # times the task's default steps
    rank: int | None = None  # None: the task's default
    alpha_factor: float | None = None  # alpha = rank × this (LoRA's scale α/r); None: the task's default
    loft: dict[str, Any] = field(default_factory=dict)  # LoFT switches turned off
    shadow: bool = True
    fault: str | None = None  # "freeze_A", "freeze_B", "dead_layer": applied to the model before training


CAUSES: tuple[Cause, ...] = (
    Cause("healthy", "the task's defaults", ("full", "lora", "loft"), ()),
    Cause("rank_too_low", "rank 1 where the task needs more", ("lora", "loft"), ("rank_too_low", "gap_from_subspace"),
          rank=1),
    Cause("rank_far_too_high", "rank 8× the default", ("lora", "loft"), ("rank_more_than_needed",), rank=64),
    Cause("lr_x10", "learning rate ×10", ("full", "lora", "loft"), ("lr_too_high", "step_too_large", "diverged"),
          allow=("nonfinite_steps", "overfitting"), lr_factor=10.0),
    Cause("lr_x100", "learning rate ×100", ("full", "lora", "loft"), ("lr_too_high", "step_too_large", "diverged"),
          allow=("nonfinite_steps", "overfitting"), lr_factor=100.0),
    Cause("lr_div100", "learning rate ÷100", ("full", "lora", "loft"), ("undertrained",), lr_factor=0.01),
    Cause("too_few_steps", "a tenth of the steps", ("full", "lora", "loft"), ("undertrained",),
          allow=("diverged",), steps_factor=0.1),  # a run that stops inside an early loss spike ends diverged
    Cause("alpha_too_low", "LoRA α = r/64 (scale 1/64)", ("lora",), ("undertrained",), alpha_factor=1 / 64),
    Cause("alpha_too_high", "LoRA α = 64r (scale 64)", ("lora",), ("step_too_large", "lr_too_high", "diverged"),
          allow=("nonfinite_steps", "overfitting"), alpha_factor=64.0),
    Cause("alpha_high_loft", "LoFT at α = 64r: LoFT is α-invariant, so nothing is wrong", ("loft",), (),
          alpha_factor=64.0),
    Cause("no_alternating", "LoFT with both factors stepping at once", ("loft",), ("optimizer_state",),
          loft={"alternating": False}),
    Cause("no_scale_gradients", "LoFT without its gradient scaling", ("loft",), ("optimizer_state",),
          loft={"scale_gradients": False}),
    Cause("no_transport", "LoFT without moment transport", ("loft",), ("optimizer_state",), loft={"transport": False}),
    Cause("simple_second_moment", "LoFT with the simple second moment", ("loft",), ("optimizer_state",),
          loft={"second_moment": "simple"}),
    Cause("no_projected_update", "LoFT as Adam in factor coordinates (no projected update; it needs the simple "
          "second moment)", ("loft",), ("optimizer_state",), allow=("undertrained",),
          loft={"projected_update": False, "second_moment": "simple"}),
    Cause("frozen_A", "LoRA's A never trains", ("lora",), ("frozen_factor",), allow=("undertrained",),
          fault="freeze_A"),
    Cause("frozen_B", "LoRA's B never trains (B = 0: the adapter is dead)", ("lora",), ("frozen_factor",),
          allow=("undertrained",), fault="freeze_B"),
    Cause("dead_layer", "one adapted layer's input is zeroed: its gradient is 0", ("full", "lora", "loft"),
          ("dead_gradients",), fault="dead_layer"),
    Cause("diverging", "learning rate ×1000", ("full", "lora", "loft"), ("diverged",),
          allow=("lr_too_high", "step_too_large", "nonfinite_steps", "overfitting"), lr_factor=1000.0),
    Cause("no_shadow", "the shadow is off", ("lora", "loft"), ("not_recorded",), shadow=False),
)

CAUSE = {cause.name: cause for cause in CAUSES}


@dataclass(frozen=True)
class Split:
    name: str
    tasks: dict[str, dict[str, Any]]  # task -> its options
    seeds: tuple[int, ...]


MINILM_SMALL = {"layers": 1, "max_length": 32, "n_eval": 1000}  # 1000 held out: a standard error ~0.016
CALIBRATION = Split("calibration", {"matfact": {}, "digits": {}, "minilm-sentiment": MINILM_SMALL}, (0, 1))
EVALUATION = Split("evaluation", {"matfact": {}, "digits": {}, "minilm-sentiment": MINILM_SMALL,
                                  "minilm-plot": MINILM_SMALL, "minilm-convention": MINILM_SMALL,
                                  "minilm-debates": MINILM_SMALL}, (2, 3))
# in EVALUATION only; every other task of EVALUATION is a held-out seed. minilm-convention was added after the
# plot task's misses had been read, with every threshold and check left as they were: an untouched measurement.
# minilm-debates was added after the refit of the thresholds on the plot and convention tasks had begun, and is
# untouched by it: its 74 runs were trained (and its lrs chosen, on seed 0) without anyone reading their diagnosis.
HELD_OUT_TASKS = ("minilm-plot", "minilm-convention", "minilm-debates")
# held-out tasks whose runs a later refit read (and fitted rules on): their figures no longer measure the diagnosis
# untouched, and the benchmark's table says so (benchmark.part_of)
READ_BY_A_REFIT = ("minilm-plot", "minilm-convention")
SPLITS = {split.name: split for split in (CALIBRATION, EVALUATION)}
