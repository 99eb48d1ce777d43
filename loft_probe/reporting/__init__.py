"""Reports: runs in, a self-contained HTML page and a Markdown page with PNG figures out.

`report` is the entry point; its summary table is `loft_probe.summary.run_table`. `frames` gathers tidy
frames from the runs and `loft_probe.comparison`,
`figures` turns frames into matplotlib Figures, `page` writes them out escaped; none computes a metric.
"""

from loft_probe.reporting.build import report
from loft_probe.reporting.figures import MissingData

__all__ = ["MissingData", "report"]
