"""Probes: record how a training run's optimizer differs from full fine-tuning, into a run directory."""

from loft_probe.probe.probe import Probe, ProbeWarning, attach
from loft_probe.probe.rundir import METRICS, Run, RunDirError, load_run
from loft_probe.probe.schedule import Schedule, at, dense_then_every, every, log_spaced

__all__ = ["METRICS", "Probe", "ProbeWarning", "Run", "RunDirError", "Schedule", "at", "attach",
           "dense_then_every", "every", "load_run", "log_spaced"]
