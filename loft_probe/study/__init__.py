"""The study of sweeps: does LoFT remove α-tuning, does it narrow the gap to full fine-tuning, does alignment
go with a smaller gap? Measured on sweep directories (`loft_probe.sweep`), with seeds and bootstrap intervals.

`table` reads the cells' results, `stats` holds the bootstrap, `frames` the derived tables, `figures` draws
and `build` writes the page. Imported on first use (matplotlib), like the report.
"""

from loft_probe.study.build import study
from loft_probe.study.stats import Interval, bootstrap_mean, bootstrap_spearman
from loft_probe.study.table import RESULT_COLUMNS, read_sweeps

__all__ = ["RESULT_COLUMNS", "Interval", "bootstrap_mean", "bootstrap_spearman", "read_sweeps", "study"]
