"""The diagnosis benchmark: train runs with one known cause each (:mod:`loft_probe.diagnosis.cases`), diagnose
them with and without the full fine-tuning reference, and score the findings against the causes.

    from loft_probe.diagnosis.benchmark import run_split, score
    rows = run_split("calibration", "runs/diagnosis", jobs=2)
    print(md_table(parts(rows)))  # one line per part: calibration, held-out seeds, each held-out task; pooled
    print(score(rows, reference=True).markdown())

Every run is an ordinary run directory (``OUT/<split>/<task>/seed<k>/<method>-<cause>``); a rerun reuses the
finished ones. A run *measurably hurt* by its cause has a final held-out loss short of its healthy twin's
(same task, seed and method) by more than ``HURT_SHORTFALL`` of what the twin gained from the start and by
more than the held-out noise (:func:`loft_probe.diagnosis.held_out.margin`), or a non-finite one.
`benchmarks/diagnosis_benchmark.py` is the command line.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from loft_probe.diagnosis.cases import CAUSE, CAUSES, HELD_OUT_TASKS, READ_BY_A_REFIT, SPLITS, Cause
from loft_probe.diagnosis.reading import run_series
from loft_probe.diagnosis.thresholds import GAP_SHORTFALL
from loft_probe.reporting.page import md_table
from loft_probe.run import RunDirError, load_run

HURT_SHORTFALL = 0.05  # a run that misses 5% of its healthy twin's held-out gain was measurably hurt
# Info findings some cause expects (they claim something about the run); other infos are context, not claims.
EXPECTED_INFOS = {"rank_more_than_needed", "not_recorded"}


@dataclass(frozen=True)
class Case:
    split: str
    task: str
    seed: int
    method: str
    cause: str

    def path(self, out: Path) -> Path:
        return out / self.split / self.task / f"seed{self.seed}" / f"{self.method}-{self.cause}"


def cases(split: str, causes: Iterable[Cause] = CAUSES, tasks: Sequence[str] | None = None,
          seeds: Sequence[int] | None = None) -> list[Case]:
    """Every (task, seed, cause, method) of a split; the healthy full run of each (task, seed) comes first,
    since every other run of that seed is diagnosed against it."""
    chosen = SPLITS[split]
    out = []
    for task in tasks or list(chosen.tasks):
        for seed in seeds or chosen.seeds:
            for cause in sorted(causes, key=lambda c: c.name != "healthy"):
                out += [Case(split, task, seed, method, cause.name) for method in cause.methods]
    return out


# ---------------------------------------------------------------------------------------------- running
def train(case: Case, out: Path, steps: int | None = None) -> str:
    """Train one case into its run directory (kept when it already closed); returns "" or the error, one line."""
    try:
        _train(case, out, steps)
        return ""
    except Exception as exc:  # one broken case must not lose the others
        return f"{type(exc).__name__}: {exc}"


def _train(case: Case, out: Path, steps: int | None) -> Path:
    from loft_probe.runner import RunConfig, run  # torch and the tasks: imported in the worker only
    from loft_probe.tasks import build_task

    path = case.path(out)
    if _closed(path):
        return path
    if path.exists():
        import shutil

        shutil.rmtree(path)  # an unfinished run of an earlier benchmark: train it again from the start
    cause = CAUSE[case.cause]
    options = SPLITS[case.split].tasks[case.task]
    task = build_task(case.task, seed=case.seed, **options)
    defaults = task.defaults
    total = max(2, round((steps or defaults["steps"]) * cause.steps_factor))
    rank = cause.rank or defaults["rank"]
    if cause.fault:
        task = replace(task, loss=_faulty_loss(task, cause.fault))
    config = RunConfig(
        task=case.task, method=case.method, out=path, rank=cause.rank if case.method != "full" else None,
        alpha=rank * cause.alpha_factor if cause.alpha_factor and case.method != "full" else None,
        lr=defaults["lr"][case.method] * cause.lr_factor, steps=total, every=max(1, min(10, total // 10)),
        shadow=cause.shadow, seed=case.seed, task_options=options, loft_options=dict(cause.loft),
        name=f"{case.method}-{case.cause}", meta={"benchmark": {"cause": case.cause, "split": case.split}})
    try:
        run(config, task=task)
    except (FloatingPointError, RuntimeError):  # a diverged run that raised: what it recorded stays readable
        pass
    return path


def _closed(path: Path) -> bool:
    try:
        return bool(load_run(path).meta.get("closed"))
    except (RunDirError, OSError):
        return False


def _faulty_loss(task, fault: str):
    """The task's loss, injecting ``fault`` into the model at its first call (after adapters and the probe are
    in place): freeze_A / freeze_B stop a LoRA factor's training; dead_layer zeroes the input of the first
    adapted layer, so its gradient is exactly 0."""
    from loft_probe.lora import lora_pairs, matches_target

    def loss(model, batch):
        if not getattr(model, "_benchmark_fault", False):
            model._benchmark_fault = True
            if fault in ("freeze_A", "freeze_B"):
                for pair in lora_pairs(model):
                    (pair.A if fault == "freeze_A" else pair.B).requires_grad_(False)
            elif fault == "dead_layer":
                name = next(name for name, _ in model.named_modules()
                            if any(matches_target(name, t) for t in task.lora_targets))
                model.get_submodule(name).register_forward_pre_hook(lambda m, args: (args[0] * 0.0,) + args[1:])
            else:
                raise ValueError(f"unknown fault {fault!r}; allowed: freeze_A, freeze_B, dead_layer")
        return task.loss(model, batch)

    return loss


def run_split(split: str, out: str | os.PathLike, jobs: int = 1, causes: Iterable[Cause] = CAUSES,
              tasks: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              steps: int | None = None) -> pd.DataFrame:
    """Train (or reuse) every case of a split, then diagnose each; one row per run (see `diagnose_case`)."""
    out = Path(out)
    todo = cases(split, causes, tasks, seeds)
    references = [c for c in todo if c.cause == "healthy" and c.method == "full"]
    rest = [c for c in todo if c not in references]
    ordered = references + rest
    if jobs <= 1:
        errors = [train(case, out, steps) for case in ordered]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = list(pool.map(train, ordered, [out] * len(ordered), [steps] * len(ordered)))
    failed = {case: error for case, error in zip(ordered, errors, strict=True) if error}
    for case, error in failed.items():
        print(f"failed: {case.path(out)}: {error}")
    return with_loft_twins(pd.DataFrame([diagnose_case(case, out) for case in todo if case not in failed]))


def with_loft_twins(rows: pd.DataFrame) -> pd.DataFrame:
    """Adds ``loft_closes_gap``: a LoRA run short of full fine-tuning (``gap_to_full``) whose LoFT twin (same
    task, seed and cause, so the same rank) is not. There LoRA's optimizer state, not its subspace, made the
    gap: the ground truth of a LoRA ``optimizer_state`` warning."""
    keys = ["split", "task", "seed", "cause"]
    loft = rows[rows["method"] == "loft"].set_index(keys)["gap_to_full"]
    twin_gap = rows.set_index(keys).index.map(lambda key: loft.get(key, True))
    return rows.assign(loft_closes_gap=(rows["method"] == "lora") & rows["gap_to_full"] & ~twin_gap.to_numpy(bool))


# ---------------------------------------------------------------------------------------------- diagnosing
def diagnose_case(case: Case, out: Path) -> dict:
    """One row: the case, whether its cause hurt it, the findings without and with the reference, and the
    signals the checks read (for calibration)."""
    from loft_probe.diagnosis import diagnose, held_out, signals

    run = load_run(case.path(out))
    twin = load_run(Case(case.split, case.task, case.seed, case.method, "healthy").path(out))
    reference = load_run(Case(case.split, case.task, case.seed, "full", "healthy").path(out))
    alone = diagnose(run)
    against = diagnose(run, reference=reference) if run.name != reference.name else alone
    start, last, healthy, full = _eval(run, 0), _eval(run, -1), _eval(twin, -1), _eval(reference, -1)
    shortfall = _shortfall(start, last, healthy)
    noise = held_out.margin(held_out.last_se(twin))
    hurt = shortfall > HURT_SHORTFALL and not last - healthy <= noise  # a non-finite end (NaN) is measurable
    return {"split": case.split, "task": case.task, "seed": case.seed, "method": case.method,
            "cause": case.cause, "eval_start": start, "eval_last": last, "eval_healthy": healthy,
            "shortfall": shortfall, "hurt": bool(case.cause != "healthy" and hurt),
            "gap_to_full": _shortfall(start, last, full) > GAP_SHORTFALL.value,
            "warnings": _codes(alone, "warning"), "infos": _codes(alone, "info"),
            "warnings_ref": _codes(against, "warning"), "infos_ref": _codes(against, "info"),
            **{f"signal_{k}": v for k, v in signals(run).items()}}


def _shortfall(start: float, last: float, target: float) -> float:
    """How much of the gain start → target a run ending at ``last`` misses (inf when it ended non-finite)."""
    gain = start - target
    return (last - target) / gain if math.isfinite(last) and gain > 0 else math.inf


def _eval(run, index: int) -> float:
    curve = run_series(run, "eval_loss")
    return float(curve.iloc[index]) if len(curve) else math.nan


def _codes(findings, severity: str) -> str:
    return " ".join(sorted({f.code for f in findings if f.severity == severity}))


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class Score:
    causes: pd.DataFrame  # per cause: runs, hurt, hits (all / hurt), misses, wrong cause
    findings: pd.DataFrame  # per finding: fired, precision, recall
    summary: dict[str, float]  # the targets' figures

    def markdown(self) -> str:
        lines = [md_table(self.causes), "", md_table(self.findings), ""]
        lines += [f"- {key}: {value:.0%}" if value <= 1 else f"- {key}: {value:g}" for key, value in
                  self.summary.items()]
        return "\n".join(lines)


def score(rows: pd.DataFrame, reference: bool) -> Score:
    """Hits, misses and wrong causes per cause, false alarms on healthy runs, precision and recall per finding,
    for the findings without (``reference=False``) or with the full fine-tuning reference."""
    suffix = "_ref" if reference else ""
    per_cause, fired_rows = [], []
    for row in rows.itertuples():
        cause = CAUSE[row.cause]
        warnings_ = set(getattr(row, "warnings" + suffix).split())
        infos = set(getattr(row, "infos" + suffix).split())
        # loss_gap is a measurement against the reference: true wherever the run really is that far from it;
        # LoRA's optimizer_state is true where LoFT at the same rank closes that gap
        allowed = (set(cause.expect) | set(cause.allow) | ({"loss_gap"} if row.gap_to_full else set())
                   | ({"optimizer_state"} if getattr(row, "loft_closes_gap", False) else set()))
        hit = bool((warnings_ | infos) & set(cause.expect)) if cause.expect else not (warnings_ - allowed)
        wrong = sorted(warnings_ - allowed)
        # named by an info alone, unless that finding is an info by design: a hedge (undertrained where the records
        # cannot tell)
        hedged = hit and bool(cause.expect) and not (warnings_ | (infos & EXPECTED_INFOS)) & set(cause.expect)
        per_cause.append({"cause": row.cause, "hurt": row.hurt, "hit": hit, "wrong": bool(wrong), "hedged": hedged})
        for code in warnings_ | (infos & EXPECTED_INFOS):  # what the diagnosis claims about the run
            fired_rows.append({"code": code, "true": code in allowed})
    frame = pd.DataFrame(per_cause)
    causes = frame.groupby("cause", sort=False).agg(
        runs=("hit", "size"), hurt=("hurt", "sum"), hits=("hit", "sum"),
        hits_when_hurt=("hit", lambda s: int(s[frame.loc[s.index, "hurt"]].sum())),
        wrong_cause=("wrong", "sum")).reset_index()
    causes["misses"] = causes["runs"] - causes["hits"]
    fired = pd.DataFrame(fired_rows, columns=["code", "true"])
    expecting = {code: int((rows["cause"].map(lambda c, code=code: code in CAUSE[c].expect)).sum())
                 for code in sorted(set(fired["code"]) | {c for cause in CAUSES for c in cause.expect})}
    findings = pd.DataFrame([
        {"finding": code, "fired": int((fired["code"] == code).sum()),
         "fired_share": float((fired["code"] == code).sum() / max(1, len(rows))),
         "precision": float(fired.loc[fired["code"] == code, "true"].mean()) if (fired["code"] == code).any()
         else math.nan,
         "recall": _recall(rows, code, suffix) if expecting[code] else math.nan}
        for code in expecting])
    injected = frame[frame["cause"] != "healthy"]
    hurt = injected[injected["hurt"]]
    healthy = frame[frame["cause"] == "healthy"]
    summary = {"hurt runs named correctly": float(hurt["hit"].mean()) if len(hurt) else math.nan,
               "hurt runs named by an info only": float(hurt["hedged"].mean()) if len(hurt) else math.nan,
               "healthy runs without a warning": float(healthy["hit"].mean()) if len(healthy) else math.nan,
               "injected runs with a wrong cause": float(injected["wrong"].mean()) if len(injected) else math.nan,
               "runs": float(len(frame))}
    if reference and "loft_closes_gap" in rows:  # LoRA's optimizer_state warning is decided against the reference
        closed = rows[rows["loft_closes_gap"] & (rows["cause"] == "healthy")]
        summary["healthy LoRA gaps that LoFT at the same rank closes, named optimizer_state"] = (
            float(closed["warnings_ref"].str.split().map(lambda codes: "optimizer_state" in codes).mean())
            if len(closed) else math.nan)
    return Score(causes, findings, summary)


def part_of(split: str, task: str) -> str:
    """The part of the benchmark a run belongs to: calibration, held-out seeds (a calibration task on other
    seeds), a held-out task (one no rule was fitted on) or a held-out task a later refit read."""
    if split == "calibration":
        return "calibration"
    if task in READ_BY_A_REFIT:
        return f"held-out task, read by a refit ({task})"
    return f"held-out task ({task})" if task in HELD_OUT_TASKS else "held-out seeds"


def parts(rows: pd.DataFrame) -> pd.DataFrame:
    """The targets' figures per part of the benchmark (`part_of`), without and with the reference: the share of
    hurt runs named correctly, of healthy runs without a warning, of injected runs with a wrong cause. Where the
    evaluation split has more than one part (held-out seeds, each held-out task), a last line pools them."""
    part = rows.apply(lambda r: part_of(r["split"], r["task"]), axis=1)
    out = [_part_line(name, group) for name, group in rows.groupby(part, sort=False)]
    held_out = part != "calibration"
    if part[held_out].nunique() > 1:
        out.append(_part_line("held-out, pooled", rows[held_out]))
    return pd.DataFrame(out)


def _part_line(part: str, group: pd.DataFrame) -> dict:
    alone, against = score(group, reference=False).summary, score(group, reference=True).summary
    injected = group[group["cause"] != "healthy"]
    return {"part": part, "tasks": ", ".join(dict.fromkeys(group["task"])),
            "seeds": ", ".join(str(s) for s in sorted(set(group["seed"]))), "runs": len(group),
            "hurt": int(injected["hurt"].sum()), "healthy": int((group["cause"] == "healthy").sum()),
            "hurt named": alone["hurt runs named correctly"],
            "hurt named (reference)": against["hurt runs named correctly"],
            "of them by an info only": alone["hurt runs named by an info only"],
            "by an info only (reference)": against["hurt runs named by an info only"],
            "healthy silent": alone["healthy runs without a warning"],
            "healthy silent (reference)": against["healthy runs without a warning"],
            "wrong cause": alone["injected runs with a wrong cause"],
            "wrong cause (reference)": against["injected runs with a wrong cause"]}


def _recall(rows: pd.DataFrame, code: str, suffix: str) -> float:
    expecting = rows[rows["cause"].map(lambda c: code in CAUSE[c].expect)]
    found = (expecting["warnings" + suffix] + " " + expecting["infos" + suffix]).str.split()
    return float(found.map(lambda codes: code in codes).mean())
