"""Time `load_run` against run length: 1k, 10k and 100k recorded steps, written by the probe's `RunWriter`.

Each recorded step is one flush of ROWS_PER_STEP rows (a loss and 12 metrics on each of 2 layers, what
`every=1` writes for a small model), so a run of S recorded steps is S flushes. Measured per length:

- running: `load_run` while the run is still open (compacted as it goes: a few dozen parts);
- closed: after `finish`, which leaves one part;
- uncompacted: the same rows as one part per flush (what this format wrote before compaction), measured up to
  10k steps; writing 100k single parts only to read them back takes longer than the point is worth.

Write time per flush (compaction included) is reported too. Best of REPEATS loads. Run directories live in a
temporary folder, deleted at the end.

    OMP_NUM_THREADS=1 python benchmarks/bench_load.py [--steps 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loft_probe.run import RunWriter, layout, load_run, write_meta, write_metrics_part

LAYERS = ("encoder.0.q", "encoder.0.v")
METRICS = ("grad_norm", "update_norm", "weight_change_norm", "update_weight_ratio", "cos_update_grad",
           "cos_moment_grad", "residual_left", "residual_right", "residual_tangent", "shadow_update_cosine",
           "shadow_update_rel_norm", "factor_grad_norm")
ROWS_PER_STEP = 1 + len(LAYERS) * len(METRICS)
UNCOMPACTED_MAX = 10_000
REPEATS = 3
META = {"method": "lora", "layers": [{"name": name, "shape": [64, 64], "kind": "lora", "rank": 4, "scale": 1.0}
                                     for name in LAYERS]}


def rows(step: int) -> list[tuple[int, str, str, float]]:
    out = [(step, "", "loss", 1.0 / step)]
    out += [(step, layer, metric, step * 1e-3 + i) for layer in LAYERS for i, metric in enumerate(METRICS)]
    return out


def best_load(path: Path) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run = load_run(path)
        times.append(time.perf_counter() - start)
    assert run.last_step > 0
    return min(times)


def measure(root: Path, steps: int) -> dict[str, float]:
    path = root / f"run-{steps}"
    writer = RunWriter.open(path)
    writer.write_meta(META)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        writer.append(rows(step))
    write_ms = (time.perf_counter() - start) / steps * 1e3
    parts = len(layout.list_parts(path))
    running = best_load(path)
    writer.finish({**META, "closed": True})
    closed = best_load(path)
    out = {"steps": steps, "rows": steps * ROWS_PER_STEP, "write_ms": write_ms, "parts": parts,
           "running": running, "closed": closed}
    if steps <= UNCOMPACTED_MAX:
        flat = root / f"flat-{steps}"
        flat.mkdir()
        write_meta(flat, META)
        for step in range(1, steps + 1):
            write_metrics_part(flat, rows(step), step - 1, step - 1, "00000000")
        out["uncompacted"] = best_load(flat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    print("| recorded steps | rows | parts while running | load, running | load, closed (1 part) | "
          "load, one part per flush | write per flush |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            r = measure(Path(tmp), steps)
            flat = f"{r['uncompacted']:.2f} s" if "uncompacted" in r else "not measured"
            print(f"| {r['steps']:,} | {r['rows']:,} | {r['parts']} | {r['running']:.3f} s | {r['closed']:.3f} s | "
                  f"{flat} | {r['write_ms']:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
