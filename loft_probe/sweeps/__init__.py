"""Sweeps: a grid of runs of one task (methods × ranks × α × learning rates × seeds), one run directory per cell.

    result = loft_probe.sweep("digits", "runs/sweep", methods=["lora", "loft"], ranks=[1, 4, 16],
                              alphas=["r", "4r"], seeds=[0, 1, 2], jobs=2)
    result.runs      # the finished cells' runs (loft_probe.Run), grid order
    result.failed    # {cell name: one-line error}

`grid` names the cells, `pool` runs them in worker processes, `execute` keeps the sweep directory (resume,
failures), `selection` is the learning-rate protocol (chosen on the first seed by held-out loss).
"""

from loft_probe.sweeps.execute import SweepEvent, SweepResult, final_metric, is_finished, sweep
from loft_probe.sweeps.grid import Alpha, Cell, make_grid, parse_alpha

__all__ = ["Alpha", "Cell", "SweepEvent", "SweepResult", "final_metric", "is_finished", "make_grid", "parse_alpha",
           "sweep"]
