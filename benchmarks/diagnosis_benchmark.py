"""The diagnosis benchmark: runs with one known cause each, diagnosed, scored against their causes.

    python benchmarks/diagnosis_benchmark.py --split calibration --jobs 2     # fit thresholds on these
    python benchmarks/diagnosis_benchmark.py --split evaluation --jobs 2      # held-out seeds and task

Prints the targets' figures per part (calibration; held-out seeds; the held-out task), then, with and
without the full fine-tuning reference: per cause, hits / misses / wrong cause; per
finding, how often it fired, its precision and recall; and the targets' figures. Writes every run's row
(findings and the signals the checks read) to OUT/<split>.csv. Runs go to OUT (default
runs/diagnosis-benchmark) and are reused on a rerun. Cases and expected findings:
loft_probe/diagnosis/cases.py; the harness: loft_probe/diagnosis/benchmark.py.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loft_probe.diagnosis.benchmark import parts, run_split, score  # noqa: E402
from loft_probe.diagnosis.cases import CAUSE, SPLITS  # noqa: E402
from loft_probe.reporting.page import md_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="calibration")
    parser.add_argument("--out", default="runs/diagnosis-benchmark")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tasks", help="comma-separated subset of the split's tasks")
    parser.add_argument("--seeds", help="comma-separated subset of the split's seeds")
    parser.add_argument("--causes", help="comma-separated subset of the causes")
    args = parser.parse_args()
    causes = [CAUSE[name] for name in args.causes.split(",")] if args.causes else list(CAUSE.values())
    started = time.perf_counter()
    rows = run_split(args.split, args.out, jobs=args.jobs, causes=causes,
                     tasks=args.tasks.split(",") if args.tasks else None,
                     seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None)
    rows.to_csv(os.path.join(args.out, f"{args.split}.csv"), index=False)
    print(f"\n## {args.split}: per part (calibration, held-out seeds, held-out task)\n")
    print(md_table(parts(rows)))
    for reference in (False, True):
        print(f"\n## {args.split}, {'with' if reference else 'without'} the full fine-tuning reference\n")
        print(score(rows, reference).markdown())
    print(f"\n{len(rows)} runs, {time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
