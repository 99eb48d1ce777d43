"""``attach``: a probe that records, layer by layer, how a training run's optimizer differs from full
fine-tuning — through hooks only, without a call in the user's loop.

At every optimizer step the probe (pre-step hook) takes each probed layer's full-weight gradient G — ``W.grad``
for a dense weight, the captured ``∂L/∂yᵀ·x`` for a LoRA layer — and feeds the shadow (the run's optimizer at
full rank, :mod:`~loft_probe.probe.shadow`) with it. At
recorded steps it also keeps the weights from before the step, and after the step (post-step hook) writes
what :mod:`loft_probe.probe.recording` measures; at snapshot steps the top-k singular triplets of the
cumulative ΔW. Under DDP every rank captures and all-reduces G; rank 0 alone measures and writes, through
:class:`loft_probe.run.RunWriter`. Under FSDP2 every rank also gathers what rank 0 measures of a sharded LoRA
pair (:mod:`~loft_probe.probe.gather`), in the hooks, outside rank 0's guarded measuring.

This module holds the hooks, skipped steps, checkpoints and closing; the layers are in
:mod:`~loft_probe.probe.layers`, the measuring in :mod:`~loft_probe.probe.recording`, meta.json and the resume
check in :mod:`~loft_probe.probe.runmeta`. :func:`attach` is the entry point; :class:`Probe` is what it returns.

Over 350 lines: the hooks, skipped steps, checkpoints and closing all read and advance the one step counter and
the pending rows; apart, they would hand that state back and forth.
"""

from __future__ import annotations

import atexit
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loft_probe.lora import dropout_warning
from loft_probe.probe import gather, runmeta
from loft_probe.probe.capture import GradCapture
from loft_probe.probe.layers import ProbedLayer, check_groups, method_of, select_layers
from loft_probe.probe.layouts import NoLayout, layout_of
from loft_probe.probe.measure import Scratch
from loft_probe.probe.options import Gradients, Labels, Snapshots
from loft_probe.probe.recording import Recorder, all_finite, schedule_values
from loft_probe.probe.schedule import Schedule, as_schedule, every
from loft_probe.probe.shadow import make_shadow
from loft_probe.run import RUN_LAYER, RunDirError, RunWriter


class ProbeWarning(UserWarning):
    """The probe met something it cannot measure, or disabled itself; training goes on unchanged."""


class Probe:
    """Records gradients, moments, updates and a shadow full fine-tuning of a run; build it with
    :func:`attach`, whose arguments (and their defaults) it takes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
                 every: int | Iterable[int] | Schedule, shadow: bool, layers: str | Iterable[str] | None,
                 grad_scaler: Any, snapshots: Snapshots | None, gradients: Gradients | None,
                 labels: Labels | None) -> None:
        snapshots, gradients, labels = snapshots or Snapshots(), gradients or Gradients(), labels or Labels()
        for name, value, kind in (("snapshots", snapshots, Snapshots), ("gradients", gradients, Gradients),
                                  ("labels", labels, Labels)):
            if not isinstance(value, kind):
                raise ValueError(f"{name} must be a loft_probe.probe.{kind.__name__}, got {type(value).__name__}")
        self.schedule = as_schedule(every)
        self.snapshots = snapshots.schedule if snapshots.schedule is not None else _default_snapshots(self.schedule)
        capture_grad = shadow if gradients.capture is None else gradients.capture
        if shadow and not capture_grad:
            raise ValueError("shadow=True needs Gradients(capture=True): the shadow is fed the true gradient")
        model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrap the model
        self.model, self.optimizer, self.grad_scaler = model, optimizer, grad_scaler
        self.run_dir = Path(run_dir)
        self.snapshot_k, self.intruders = snapshots.k, snapshots.intruders
        self.rank, self.world = _distributed()
        self.layers = select_layers(model, layers)
        pairs = [layer.pair for layer in self.layers if layer.pair is not None]
        if capture_grad and (dropout := dropout_warning(pairs)):  # without a captured G nothing is blurred
            warnings.warn(f"loft_probe: {dropout}", ProbeWarning, stacklevel=3)
        self.method = method_of(optimizer, self.layers, model)
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        check_groups(optimizer, self.layers, groups)
        self.layout = layout_of(optimizer)
        gather.check(self.layers, self.layout)
        if isinstance(self.layout, NoLayout):
            warnings.warn(f"loft_probe: no state layout for {type(optimizer).__name__}: its gradients and updates "
                          "are recorded, its moments are not; describe its state with "
                          "loft_probe.probe.register_layout", ProbeWarning, stacklevel=3)
        gather.attach(self.layers)  # FSDP2: W_0 and the factors whole, before anything reads them
        self._sharded = [layer for layer in self.layers if layer.whole is not None]  # no per-step scan otherwise
        self.recorder = Recorder(gather.optimizer_view(optimizer, self.layers), self.layout, groups, snapshots.k,
                                 snapshots.intruders, self._initial_weight)
        self.shadow_requested = shadow
        self._rows: list[tuple[int, str, str, float]] = []
        # Rank 0 alone writes (under DDP the other ranks only join the all-reduce): it alone takes the lock.
        self._writer = RunWriter.open(self.run_dir) if self.rank == 0 else None
        try:
            self._prepare_layers(capture_grad, shadow, gradients.shadow_dtype)
            self.step = self._open_run_dir(labels, shadow, capture_grad)
            gather.drop_base(self.layers, self.rank)  # ‖W_0‖ and the fingerprints are taken
        except BaseException:
            if self._writer is not None:
                self._writer.abandon()  # a failed start leaves nothing behind
            raise
        self._enabled = True  # hooks installed
        self._writing = True  # rank 0 measures and writes; off after an error (the hooks may stay, for DDP)
        self._pending_skip = False
        self._skipped_seen = sum(group.get("skipped_steps", 0) for group in optimizer.param_groups)
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]
        if grad_scaler is not None:
            self._wrap_scaler_update(grad_scaler)
        self._set_capture(self.step + 1)
        atexit.register(self.close)

    # ------------------------------------------------------------------ set-up
    def _prepare_layers(self, capture_grad: bool, shadow: bool, shadow_dtype: torch.dtype | None) -> None:
        for layer in self.layers:
            dtype, device = layer.compute_dtype(), layer.key_param.device
            if layer.pair is not None:
                layer.initial_factors = layer.state_now()
                # in the compute dtype: a pair's ‖W‖ is rebuilt from it (ProbedLayer.before_norm)
                layer.base_norm = float(layer.base_weight().to(dtype).norm())
                if capture_grad:
                    layer.capture = GradCapture(layer.pair.module, layer.shape, dtype)
            if shadow and self.rank == 0:
                layer.shadow = make_shadow(self.optimizer, self.layout, self.recorder.group(layer), layer.shape,
                                           dtype, device, shadow_dtype)

    def _open_run_dir(self, labels: Labels, shadow: bool, capture_grad: bool) -> int:
        """Creates the run directory, or re-opens one of the same run to continue it; returns the start step."""
        if self._writer is None:  # another rank: only the step (every rank's schedule must agree) is needed
            self.meta = {}
            return runmeta.resumed_step(self.optimizer, self.run_dir) if (self.run_dir / "meta.json").exists() else 0
        recording = {"method": self.method, "schedule": self.schedule.describe(),
                     "snapshots": self.snapshots.describe(), "snapshot_k": self.snapshot_k, "shadow": shadow,
                     "capture_grad": capture_grad, "world_size": self.world}
        self.meta, start = runmeta.open_run(self._writer, self.optimizer, self.layers, labels, recording)
        return start

    def _initial_weight(self, layer: ProbedLayer) -> Tensor:
        """A dense layer's W_0 (m×n), read back from initial.safetensors."""
        return self._writer.initial_weight(layer.name).to(layer.param.device, layer.compute_dtype())

    # ------------------------------------------------------------------ hooks
    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Keeps the weights from before the step (rank 0) where they are needed: at a recorded step, and at every
        step for a shadow whose optimizer reads the weight; the gradients where the step overwrites them, and
        what a dense layer's layout keeps from before a recorded step."""
        t = self.step + 1
        recorded = self.schedule(t) or self.snapshots(t)
        # every rank, whatever rank 0's measuring did: sharded pairs' factors where rank 0 may keep them below
        if self._sharded:
            gather.gather_factors([layer for layer in self._sharded if recorded or (
                self.shadow_requested and self.layout.reads_weight(self.recorder.group(layer)))])
        if not (self._writing and self.rank == 0):
            return
        keep = [layer for layer in self.layers
                if recorded or (layer.shadow is not None and layer.shadow.needs_weight)]
        self._guarded(lambda: [setattr(layer, "before", layer.state_now()) for layer in keep])
        if self.layout.overwrites_grad:  # e.g. schedule-free AdamW: p.grad is no longer G after the step
            keep = [layer for layer in self.layers if recorded or layer.shadow is not None]
            self._guarded(lambda: [setattr(layer, "grads_before", tuple(
                None if p.grad is None else p.grad.detach().clone() for p in layer.params)) for layer in keep])
        if self.schedule(t):
            self._guarded(lambda: [setattr(layer, "layout_before", self.layout.before_step(
                self.optimizer, self.recorder.group(layer), layer.param)) for layer in self.layers
                if layer.pair is None])

    def _post_step(self, optimizer, args, kwargs) -> None:
        """After the optimizer moved: gather G (every rank: the DDP all-reduce), feed the shadow, measure."""
        if self._optimizer_skipped():  # LoFT skipped a non-finite step: nothing moved, yet it is a step of the run
            self._skip_step()
            return
        t = self.step + 1
        measured = self.schedule(t) or self.snapshots(t)
        if self.schedule(t):  # every rank (collectives): what rank 0 measures of a sharded pair
            gather.gather_step(self.layers, self.optimizer)
        elif measured:
            gather.gather_factors(self.layers)
        for layer in self.layers:
            layer.grad = self._full_gradient(layer, measured)
        if self._writing and self.rank == 0:
            self._guarded(lambda: self._measure(t))
        self._end_step(advance=True)

    def _guarded(self, body) -> None:
        """Runs rank 0's measuring; an error stops measuring and writing with one warning instead of crashing
        training. Hooks that join collectives stay: under DDP every rank must keep joining the all-reduce."""
        try:
            body()
        except OSError as exc:
            self._disable(f"cannot write to {self.run_dir} ({exc})")
        except Exception as exc:
            self._disable(f"{type(exc).__name__}: {exc} at {traceback.format_tb(exc.__traceback__)[-1].strip()}")

    def _measure(self, t: int) -> None:
        """Feeds each layer's shadow and, at a recorded step, measures the layer right after: its shadow's update
        and every m×n temporary live in one set of work buffers reused from layer to layer, not one per layer."""
        recorded = self.schedule(t)
        if recorded:
            self._log_values(t, RUN_LAYER, schedule_values(self.recorder.group(self.layers[0])))
        scratch = Scratch()
        for layer in self.layers:
            if layer.grad is not None and not self._grad_finite(layer):
                self._log_row(t, layer.name, "nonfinite_grad", 1.0)
                layer.grad = None
            if layer.shadow is not None and layer.grad is not None:
                weight = layer.weight_before_step if layer.before is not None else None  # formed if needed
                layer.shadow.feed(layer.grad, self.recorder.group(layer), weight, scratch)
            if recorded:
                self._log_values(t, layer.name, self.recorder.step_values(layer, scratch))
        if self.snapshots(t):
            self._snapshot(t)
        if self.schedule(t) or self.snapshots(t):
            self._flush()  # recorded steps only: one Parquet part per record, not per step

    def _grad_finite(self, layer: ProbedLayer) -> bool:
        """Whether this step's G is finite: certified by its capture when G is the captured sum itself (no loss
        scale divided out, no all-reduce: either could overflow past the capture's bound), else checked."""
        capture = layer.capture
        if capture is not None and layer.grad is capture.grad and capture.certifies_finite():
            return True
        return all_finite(layer.grad)

    def _snapshot(self, t: int) -> None:
        tensors, values = self.recorder.snapshot(self.layers)
        for layer, layer_values in values.items():
            self._log_values(t, layer, layer_values)
        self._writer.write_snapshot(t, tensors)
        if self.intruders == "all":
            self._record_intruders(t)

    def _record_intruders(self, t: int) -> None:
        for layer, layer_values in self.recorder.intruder_values(self.layers).items():
            self._log_values(t, layer, layer_values)

    def _skip_step(self) -> None:
        """A step whose update was skipped (non-finite gradients): it keeps its number, so that the rows logged
        after it (its NaN loss) are its own and not the previous step's; the shadow is not fed."""
        t = self.step + 1
        self._log_row(t, RUN_LAYER, "skipped_step", 1.0)
        if self.schedule(t) or self.snapshots(t):
            self._guarded(self._flush)
        self._end_step(advance=True)

    def _end_step(self, advance: bool) -> None:
        if advance:
            self.step += 1
        for layer in self.layers:
            layer.grad, layer.before, layer.grads_before, layer.layout_before = None, None, None, None
            layer.weight_before = None
            if layer.shadow is not None:
                layer.shadow.last_update = None  # it may live in this step's work buffers
            if layer.capture is not None:
                layer.capture.reset()
            if layer.whole is not None:
                layer.whole.clear()
        self._pending_skip = False
        self._set_capture(self.step + 1)

    def _optimizer_skipped(self) -> bool:
        skipped = sum(group.get("skipped_steps", 0) for group in self.optimizer.param_groups)
        if skipped == self._skipped_seen:
            return False
        self._skipped_seen = skipped
        return True

    def _full_gradient(self, layer: ProbedLayer, measured: bool) -> Tensor | None:
        """G (m×n) of this step: ``W.grad``, or the captured gradient (unscaled, averaged over ranks).
        Dense gradients are read only on rank 0 when something uses them."""
        if layer.pair is None:
            grad = layer.param.grad if layer.grads_before is None else layer.grads_before[0]
            if grad is None or self.rank != 0 or not (measured or layer.shadow is not None):
                return None
            return grad.detach().to(layer.compute_dtype())
        if layer.capture is None or (grad := layer.capture.take()) is None:
            return None
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            grad = grad / self.grad_scaler.get_scale()  # hooks see the scaled loss's gradient
        if self.world > 1:
            torch.distributed.all_reduce(grad)
            grad = grad / self.world
        return grad

    def _set_capture(self, next_step: int) -> None:
        """Capture G for the next step only when something needs it; the same decision on every rank."""
        needed = self.shadow_requested or self.schedule(next_step) or self.snapshots(next_step)
        for layer in self.layers:
            if layer.capture is not None:
                layer.capture.active = needed

    def _wrap_scaler_update(self, scaler) -> None:
        """A GradScaler skips ``optimizer.step`` on inf/NaN gradients; then its captured G must not leak
        into the next step. ``scaler.update()`` follows every (possibly skipped) step: reset there."""
        original = scaler.update
        self._pending_skip = True

        def update(*args, **kwargs):
            if self._pending_skip:  # no optimizer step since the last update: this one was skipped
                self._skip_step()
            self._pending_skip = True
            return original(*args, **kwargs)

        scaler.update = update


    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the record exactly: the step, the rows not yet flushed, the
        run's fingerprint, each layer's attach-time factors (cumulative ΔW is measured from them), ‖W_0‖ and
        shadow moments. Tensors, numbers and strings only, so ``torch.load(..., weights_only=True)`` reads it
        back; save it with the model and optimizer."""
        layers = {}
        for layer in self.layers:
            entry: dict[str, Any] = {"base_norm": layer.base_norm}
            if layer.initial_factors is not None:
                entry["initial_B"], entry["initial_A"] = layer.initial_factors
            if layer.shadow is not None:
                entry.update({f"shadow_{key}": value for key, value in layer.shadow.state_dict().items()})
            layers[layer.name] = entry
        return {"step": self.step, "fingerprint": self.meta.get("fingerprint"), "pending_rows": list(self._rows),
                "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` into a probe attached to the same run directory and model: the record
        continues from the state's step (what the directory holds after it is dropped at the next write)."""
        names = [layer.name for layer in self.layers]
        if sorted(state.get("layers", {})) != sorted(names):
            raise ValueError(f"probe state has layers {sorted(state.get('layers', {}))}, this probe {sorted(names)}")
        if self.rank == 0 and state.get("fingerprint") not in (None, self.meta["fingerprint"]):
            raise ValueError(f"probe state is of another run (fingerprint {str(state['fingerprint'])[:12]}…, "
                             f"{self.run_dir} holds {self.meta['fingerprint'][:12]}…); load the state saved "
                             "with this run")
        self.step = int(state["step"])
        if self._writer is not None:
            self._writer.resume_from(self.step)
            self._rows = [(int(t), str(layer), str(metric), float(value))
                          for t, layer, metric, value in state.get("pending_rows", [])] + self._rows
        for layer in self.layers:
            entry = state["layers"][layer.name]
            layer.base_norm = float(entry.get("base_norm", layer.base_norm))
            if layer.initial_factors is not None:
                device, dtype = layer.key_param.device, layer.compute_dtype()
                layer.initial_factors = (entry["initial_B"].to(device, dtype, copy=True),
                                         entry["initial_A"].to(device, dtype, copy=True))
            if layer.shadow is not None and "shadow_step" in entry:
                layer.shadow.load_state_dict({key.removeprefix("shadow_"): value for key, value in entry.items()
                                              if key.startswith("shadow_")})
        self._set_capture(self.step + 1)

    # ------------------------------------------------------------------ output
    def log(self, **values: float) -> None:
        """Run-level values (``loss=...``) at the step just completed: call it after ``optimizer.step()``.
        They are written with the next recorded step's part (and at close)."""
        self._log_values(self.step, RUN_LAYER, values)

    def _log_values(self, step: int, layer: str, values: dict[str, float]) -> None:
        for metric, value in values.items():
            self._log_row(step, layer, metric, float(value))

    def _log_row(self, step: int, layer: str, metric: str, value: float) -> None:
        if self.rank == 0 and self._writing:
            self._rows.append((step, layer, metric, value))

    def _flush(self) -> None:
        if self.rank == 0 and self._writing and self._rows:
            rows, self._rows = self._rows, []
            self._writer.append(rows)

    def _disable(self, why: str) -> None:
        self._writing = False
        self._rows = []
        if self._writer is not None:
            self._writer.release()
        if self.world == 1:  # no other rank to keep in step with: the hooks can go too
            self._enabled = False
            self._remove_hooks()
        warnings.warn(f"loft_probe: probe disabled, training continues: {why}", ProbeWarning, stacklevel=3)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            if layer.capture is not None:
                layer.capture.remove()

    def close(self) -> None:
        """Writes what is pending, a snapshot of the last step, and marks the run closed. Idempotent. Under FSDP2
        call it on every rank: it gathers the sharded factors for the last snapshot."""
        atexit.unregister(self.close)
        writing = self._writing and self.rank == 0
        self._writing = False
        if self._enabled and self.step > 0:  # every rank: the sharded factors for the last snapshot
            gather.gather_factors(self.layers)
        if self._enabled:
            self._enabled = False
            self._remove_hooks()
        if not writing:
            return
        self._writing = True  # for the last writes below only
        try:
            if self.step > 0 and self.step not in self._writer.snapshot_steps():
                self._snapshot(self.step)
            if self.step > 0 and self.intruders == "last":
                self._record_intruders(self.step)
        except Exception as exc:  # a failed last measurement must not lose the rows already gathered
            warnings.warn(f"loft_probe: last snapshot of {self.run_dir} failed ({type(exc).__name__}: {exc})",
                          ProbeWarning, stacklevel=2)
        try:
            self._flush()
            self._writer.finish({**self.meta, "closed": True, "last_step": self.step})
        except (OSError, RunDirError) as exc:  # a disk full, or a part damaged under the running probe
            warnings.warn(f"loft_probe: could not finish writing {self.run_dir} ({exc})", ProbeWarning,
                          stacklevel=2)
        finally:
            self._writing = False
            self._writer.release()

    def abandon(self) -> None:
        """Stops the probe without closing the run; a run directory this probe created is removed (a start
        that failed leaves nothing behind). Used when training fails before its first step."""
        atexit.unregister(self.close)
        self._writing = False
        if self._enabled:
            self._enabled = False
            self._remove_hooks()
        if self._writer is not None:
            self._writer.abandon()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
           every: int | Iterable[int] | Schedule = 16, shadow: bool = False,
           layers: str | Iterable[str] | None = None, grad_scaler: Any = None,
           snapshots: Snapshots | None = None, gradients: Gradients | None = None,
           labels: Labels | None = None) -> Probe:
    """Attach a probe to a model and its optimizer; the training loop stays as it is. The entry point.

    Args:
        model, optimizer: the model (DDP-wrapped, FSDP2-sharded LoRA pairs on a 1-D mesh, or neither) and the
            optimizer that trains it. Under FSDP2 rank 0 holds each probed layer's W_0 and shadow whole
            (:mod:`~loft_probe.probe.gather`); attach after ``fully_shard`` and close on every rank.
        run_dir: the run directory to write (created; re-opened to resume the same run).
        every: record schedule: an int k (every k steps), a list of steps, or a :class:`Schedule`.
        shadow: keep a shadow per probed layer, the run's optimizer at full rank (AdamW for LoFT; 2·m·n numbers
            each for AdamW), fed the true gradient every step.
        layers: fnmatch pattern(s) on layer names; default every LoRA layer, or every 2-D weight without LoRA.
        grad_scaler: the ``torch.amp.GradScaler`` of an AMP run, so that captured G is recorded unscaled.
        snapshots: :class:`Snapshots` (when ΔW is photographed, top-k, intruder counts).
        gradients: :class:`Gradients` (capture of LoRA layers' G without a shadow; the shadow's dtype).
        labels: :class:`Labels` (seed, data order, name, extra meta.json fields).

    Returns the :class:`Probe`: a context manager; ``probe.log(loss=...)`` after a step adds run-level values.
    """
    return Probe(model, optimizer, run_dir, every=every, shadow=shadow, layers=layers, grad_scaler=grad_scaler,
                 snapshots=snapshots, gradients=gradients, labels=labels)


def _default_snapshots(schedule: Schedule) -> Schedule:
    """Every 4th recorded step of an "every k" schedule; every recorded step of any other."""
    return every(4 * schedule.period) if schedule.period is not None else schedule


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
