"""Does each built-in task's default full fine-tuning converge? The reference every diagnosis compares with.

    python benchmarks/reference_convergence.py [--tasks matfact,digits,minilm-sentiment] [--evals 10]

Trains full fine-tuning at the task's defaults (seed 0), evaluating `--evals` times, and prints the held-out
loss curve and the share of its whole drop that came in the last interval (the diagnosis calls a reference
unconverged above 5%: loft_probe.diagnosis.thresholds.REFERENCE_STILL_FALLING).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loft_probe import load_run  # noqa: E402
from loft_probe.diagnosis.gap import last_interval_drop  # noqa: E402
from loft_probe.diagnosis.reading import run_series  # noqa: E402
from loft_probe.diagnosis.thresholds import REFERENCE_STILL_FALLING  # noqa: E402
from loft_probe.runner import RunConfig, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="matfact,digits,minilm-sentiment")
    parser.add_argument("--evals", type=int, default=10)
    args = parser.parse_args()
    print("| task | steps | lr | held-out loss at each evaluation | last-interval drop | converged |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            started = time.perf_counter()
            path = run(RunConfig(task=task, method="full", out=os.path.join(tmp, task), evals=args.evals,
                                 shadow=False, every=50))
            record = load_run(path)
            curve = run_series(record, "eval_loss")
            drop = last_interval_drop(curve)
            hyper = record.meta["hyperparameters"]
            points = " → ".join(f"{v:.3g}" for v in curve.to_numpy())
            verdict = "yes" if drop <= REFERENCE_STILL_FALLING.value else "**no**"
            print(f"| {task} | {record.last_step} | {hyper['lr']:g} | {points} | {drop:.1%} | {verdict} |"
                  f"  <!-- {time.perf_counter() - started:.0f} s -->")


if __name__ == "__main__":
    main()
