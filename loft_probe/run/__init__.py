"""The run directory: a documented, versioned format, written crash-safe, read as untrusted input.

The centre of the package: the probe writes a run through :class:`RunWriter`; comparison, diagnosis,
reporting, sweeps, study and the CLI read it with :func:`load_run`. None of them imports the probe.

- :mod:`~loft_probe.run.vocabulary`: ``METRICS``, every metric name with its meaning
- :mod:`~loft_probe.run.layout`: format version, the frame schema (``DTYPES``), part and snapshot file names
- :mod:`~loft_probe.run.meta`: meta.json's schema
- :mod:`~loft_probe.run.files`: atomic writes and safe reads (``RunDirError``)
- :mod:`~loft_probe.run.reader`: ``Run``, ``load_run``
- :mod:`~loft_probe.run.writer`: ``RunWriter`` and the plain write functions
- :mod:`~loft_probe.run.series`: the one rule that summarizes a metric (``late_value``, ``run_summary``)

Layout (format version 1)::

    RUN/
      meta.json                     what was run: method, optimizer, hyperparameters, probed layers, ...
      metrics/part-000000-000000-1f3a9c2e.parquet   long-form rows (step:int64, layer:str, metric:str,
      metrics/part-000001-000001-1f3a9c2e.parquet   value:float64): one part per flush, "part-FIRST-LAST-TOKEN"
      metrics/part-000000-000002-77b0d4a1.parquet   a compacted part: replaces every part inside [FIRST, LAST]
      snapshots/step-000000100.safetensors   top-k singular triplets "<layer>::<what>.U|S|Vh" at a step
      initial.safetensors           full fine-tuning only: the probed weights at attach time (W0)
      .lock                         the writer's lock (see :mod:`loft_probe.run.writer`); readers ignore it

Every file appears by an atomic rename, so a run killed at any moment (SIGKILL included) leaves only whole
files: :func:`load_run` reads every part flushed so far. A compacted part is renamed into place before the
parts it replaces are removed, so a kill in between leaves both, and readers skip the replaced ones. Rows are
read in part order; a (step, layer, metric) recorded twice keeps the later value. Nothing is pickled: JSON,
Parquet, safetensors. The run-level rows (loss, events) use the layer name ``""``. The token (random per
writer) keeps two writers' part names apart even where the writer's lock does not hold (a network file
system); the old name ``part-NNNNNN.parquet`` still reads, as the part [N, N].

Reading treats the directory as untrusted input: only regular files inside it are opened (no symbolic links,
FIFOs or devices; ``metrics/`` and ``snapshots/`` must be real folders), each under a size cap checked before
reading, meta.json against :mod:`loft_probe.run.meta`, snapshot tensors against the layer table
(names, shapes, finite values). Every violation is one :class:`RunDirError` line naming the file.
"""

from loft_probe.run.files import RunDirError
from loft_probe.run.layout import DTYPES, FORMAT, RUN_LAYER, VERSION, snapshot_key
from loft_probe.run.reader import Run, load_run, read_meta
from loft_probe.run.series import late_slice, late_value, run_summary
from loft_probe.run.vocabulary import METRICS
from loft_probe.run.writer import RunWriter, write_meta, write_metrics_part, write_snapshot

__all__ = ["DTYPES", "FORMAT", "METRICS", "RUN_LAYER", "VERSION", "Run", "RunDirError", "RunWriter", "late_slice",
           "late_value", "load_run", "read_meta", "run_summary", "snapshot_key", "write_meta", "write_metrics_part",
           "write_snapshot"]
