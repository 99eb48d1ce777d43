"""Probes: record how a training run's optimizer differs from full fine-tuning, into a run directory.

The entry point is :func:`attach` (it returns a :class:`Probe`); its less common settings are the option
objects :class:`Snapshots`, :class:`Gradients` and :class:`Labels`.
"""

from loft_probe.probe.options import Gradients, Labels, Snapshots
from loft_probe.probe.probe import Probe, ProbeWarning, attach
from loft_probe.probe.schedule import Schedule, at, dense_then_every, every, log_spaced

__all__ = ["Gradients", "Labels", "Probe", "ProbeWarning", "Schedule", "Snapshots", "at", "attach",
           "dense_then_every", "every", "log_spaced"]
