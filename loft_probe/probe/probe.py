"""``attach``: a probe that records, layer by layer, how a training run's optimizer differs from full
fine-tuning — through hooks only, without a call in the user's loop.

At every optimizer step the probe (pre-step hook) takes each probed layer's full-weight gradient G — ``W.grad``
for a dense weight, the captured ``∂L/∂yᵀ·x`` for a LoRA layer — and feeds the shadow AdamW with it. At
recorded steps it also keeps the weights from before the step, and after the step (post-step hook) writes
the metrics of :mod:`loft_probe.probe.measure`; at snapshot steps the top-k singular triplets of the
cumulative ΔW. Under DDP every rank captures and all-reduces G; rank 0 alone measures and writes.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import json
import math
import time
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loft_probe import metrics as M
from loft_probe.lora import LoraPair, dropout_warning, eager_name, lora_pairs, unsupported_lora_layers
from loft_probe.optim import LoFT
from loft_probe.optim.loft import compute_dtype, is_sharded
from loft_probe.probe import measure, rundir, schema
from loft_probe.probe.capture import GradCapture
from loft_probe.probe.layouts import layout_of
from loft_probe.probe.schedule import Schedule, as_schedule, every
from loft_probe.probe.shadow import ShadowAdamW
from loft_probe.probe.writer import RunWriter

INTRUDER_K = 10  # top singular vectors of the tuned weight checked for intruders (Shuttleworth et al.)
INTRUDER_MODES = ("last", "all", "none")  # intruder counts at the last step, at every snapshot, never


class ProbeWarning(UserWarning):
    """The probe met something it cannot measure, or disabled itself; training goes on unchanged."""


@dataclass
class _Layer:
    """One probed weight: a LoRA pair (``pair``) or a dense 2-D parameter (``param``)."""

    name: str
    pair: LoraPair | None
    param: nn.Parameter | None
    capture: GradCapture | None = None
    shadow: ShadowAdamW | None = None
    initial_factors: tuple[Tensor, Tensor] | None = None  # LoRA: (B, A) at attach time
    base_norm: float = 0.0  # ‖W_0‖
    grad: Tensor | None = None  # this step's G (m×n)
    before: tuple[Tensor, ...] | None = None  # recorded steps: (B, A) or (W,) from before the step
    base_svd: M.SVD | None = None  # LoRA: W_0's thin SVD, for intruder counts (W_0 is frozen: computed once)

    @property
    def kind(self) -> str:
        return "lora" if self.pair is not None else "full"

    @property
    def shape(self) -> tuple[int, int]:
        return self.pair.shape if self.pair is not None else tuple(self.param.shape)

    @property
    def key_param(self) -> nn.Parameter:
        """The parameter whose optimizer group holds this layer's lr and betas."""
        return self.pair.B if self.pair is not None else self.param

    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.key_param)

    def state_now(self) -> tuple[Tensor, ...]:
        dtype = self.compute_dtype()
        if self.pair is not None:
            return self.pair.B.detach().to(dtype, copy=True), self.pair.A.detach().to(dtype, copy=True)
        return (self.param.detach().to(dtype, copy=True),)

    def weight(self, state: tuple[Tensor, ...]) -> Tensor:
        """The effective weight W (m×n) of a saved state."""
        if self.pair is None:
            return state[0]
        B, A = state
        return self.pair.base_weight().to(B.dtype) + self.pair.scale * (B @ A)

    def update(self, before: tuple[Tensor, ...], after: tuple[Tensor, ...]) -> Tensor:
        """W_after − W_before (m×n), from the factors: W_0 never enters, so nothing cancels."""
        if self.pair is None:
            return after[0] - before[0]
        return self.pair.scale * (after[0] @ after[1] - before[0] @ before[1])


class Probe:
    """Records gradients, moments, updates and a shadow full fine-tuning of a run; see :func:`attach`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path,
                 every: int | Iterable[int] | Schedule = 16, shadow: bool = False,
                 capture_grad: bool | None = None, layers: str | Iterable[str] | None = None,
                 snapshots: int | Iterable[int] | Schedule | None = None, snapshot_k: int = 32,
                 intruders: str = "last", shadow_dtype: torch.dtype | None = None, grad_scaler: Any = None,
                 seed: int | None = None, data_order: str | None = None, name: str | None = None,
                 extra_meta: dict[str, Any] | None = None) -> None:
        self.schedule = as_schedule(every)
        self.snapshots = as_schedule(snapshots) if snapshots is not None else _default_snapshots(self.schedule)
        if isinstance(snapshot_k, bool) or not isinstance(snapshot_k, int) or snapshot_k < 1:
            raise ValueError(f"snapshot_k must be an integer >= 1, got {snapshot_k!r}")
        if capture_grad is None:
            capture_grad = shadow
        if shadow and not capture_grad:
            raise ValueError("shadow=True needs capture_grad=True: the shadow AdamW is fed the true gradient")
        if intruders not in INTRUDER_MODES:
            raise ValueError(f"intruders must be one of {INTRUDER_MODES}, got {intruders!r}")
        if shadow_dtype not in (None, torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"shadow_dtype must be None, float32, bfloat16 or float64, got {shadow_dtype}")
        _check_labels(seed, data_order, name, extra_meta)
        model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrap the model
        self.model, self.optimizer, self.grad_scaler = model, optimizer, grad_scaler
        self.run_dir = Path(run_dir)
        self.snapshot_k, self.intruders = snapshot_k, intruders
        self.rank, self.world = _distributed()
        self.layers = _select_layers(model, layers)
        pairs = [layer.pair for layer in self.layers if layer.pair is not None]
        if capture_grad and (dropout := dropout_warning(pairs)):  # without a captured G nothing is blurred
            warnings.warn(f"loft_probe: {dropout}", ProbeWarning, stacklevel=3)
        self.method = _method(optimizer, self.layers, model)
        self.layout = layout_of(optimizer)
        self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for layer in self.layers:
            if id(layer.key_param) not in self._groups:
                raise ValueError(f"layer {layer.name!r} is not optimized by the given optimizer")
        _check_groups(optimizer, self.layers, self._groups, shadow)
        self.shadow_requested = shadow
        self._rows: list[tuple[int, str, str, float]] = []
        # Rank 0 alone writes (under DDP the other ranks only join the all-reduce): it alone takes the lock.
        self._writer = RunWriter.open(self.run_dir) if self.rank == 0 else None
        try:
            self._prepare_layers(capture_grad, shadow, shadow_dtype)
            self.step = self._open_run_dir(seed, data_order, name, shadow, capture_grad, extra_meta or {})
        except BaseException:
            if self._writer is not None:
                self._writer.abandon()  # a failed start leaves nothing behind
            raise
        self._warned: set[str] = set()
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
                layer.base_norm = float(layer.pair.base_weight().float().norm())
                if capture_grad:
                    layer.capture = GradCapture(layer.pair.module, layer.shape, dtype)
            if shadow and self.rank == 0:
                layer.shadow = ShadowAdamW(layer.shape, dtype, device, shadow_dtype)

    def _open_run_dir(self, seed, data_order, name, shadow, capture_grad, extra_meta) -> int:
        """Creates the run directory, or re-opens one of the same run to continue it; returns the start step.

        A re-opened run must be the same run: the same base weights (a dense layer's W_0 is read back from
        initial.safetensors), layers, optimizer class and hyperparameters; anything else is refused."""
        if self._writer is None:  # another rank: only the step (every rank's schedule must agree) is needed
            self.meta = {}
            return _optimizer_step(self.optimizer) if (self.run_dir / "meta.json").exists() else 0
        old = self._writer.existing_meta()
        start = _optimizer_step(self.optimizer) if old is not None else 0
        if self._has_dense_layers():
            initial = ({layer.name: self._writer.initial_weight(layer.name) for layer in self.layers
                        if layer.pair is None} if old is not None else None)
            for layer in self.layers:
                if layer.pair is None:
                    W0 = initial[layer.name] if initial is not None else layer.param.detach()
                    layer.base_norm = float(W0.float().norm())  # from W_0 itself, also on a resume
        fingerprint, layer_fingerprints = self._fingerprints(old is not None)
        layer_table = [{"name": layer.name, "shape": list(layer.shape), "kind": layer.kind,
                        "rank": layer.pair.rank if layer.pair else None,
                        "scale": layer.pair.scale if layer.pair else None,
                        "fingerprint": layer_fingerprints[layer.name]} for layer in self.layers]
        meta = {
            "name": name or self.run_dir.name, "method": self.method,
            "optimizer": type(self.optimizer).__name__, "hyperparameters": _hyperparameters(self.optimizer),
            "seed": seed, "data_order": data_order, "fingerprint": fingerprint, "layers": layer_table,
            "schedule": self.schedule.describe(), "snapshots": self.snapshots.describe(),
            "snapshot_k": self.snapshot_k, "shadow": shadow, "capture_grad": capture_grad,
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": self.world, "closed": False, **extra_meta,
        }
        if old is not None:  # the run's own meta goes on; what this probe was given must agree with it
            self._check_same_run(old, meta, start, {"name": name, "seed": seed, "data_order": data_order})
            meta = {key: value for key, value in old.items() if key != "last_step"} | extra_meta | {"closed": False}
        self.meta = meta
        if old is not None:
            self._writer.resume_from(start)
        elif self._has_dense_layers():
            self._writer.write_initial({layer.name: layer.param for layer in self.layers if layer.pair is None})
        self._writer.write_meta(meta)
        return start

    def _check_same_run(self, old: dict[str, Any], new: dict[str, Any], start: int, given: dict[str, Any]) -> None:
        """One line naming what differs between the run in the directory and this probe's: the base weights,
        layers, optimizer and its hyperparameters, the recording options, and the labels given (None: the run's)."""
        where = f"{self.run_dir}: holds a different run"
        if old.get("fingerprint") != new["fingerprint"] or _without_fingerprints(old["layers"]) != \
                _without_fingerprints(new["layers"]):
            raise rundir.RunDirError(f"{where} (base weights or layers differ); choose another run_dir")
        for key in ("method", "optimizer"):
            if old.get(key) != new[key]:
                raise rundir.RunDirError(f"{where}: its {key} is {old.get(key)!r}, this probe's {new[key]!r}; "
                                         "resume with the run's own optimizer, or choose another run_dir")
        options = {key: new[key] for key in ("schedule", "snapshots", "snapshot_k", "shadow", "capture_grad")}
        for key, value in [*options.items(), *((k, v) for k, v in given.items() if v is not None)]:
            if key in old and old[key] != value:
                raise rundir.RunDirError(f"{where}: its {key} is {old[key]!r}, this probe's {value!r}; resume "
                                         "with the run's own options, or choose another run_dir")
        mine, theirs = _comparable(new["hyperparameters"], self.optimizer), _comparable(old.get("hyperparameters"))
        differ = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
        if differ:
            key = differ[0]
            raise rundir.RunDirError(f"{where}: hyperparameter {key} is {theirs.get(key)!r} there, "
                                     f"{mine.get(key)!r} here; resume with the run's own optimizer settings, "
                                     "or choose another run_dir")
        if start == 0 and rundir.has_records(self.run_dir):
            raise rundir.RunDirError(f"{self.run_dir}: already holds this run's records; to resume, attach "
                                     "with the optimizer restored from a checkpoint, or choose another run_dir")

    def _has_dense_layers(self) -> bool:
        return any(layer.pair is None for layer in self.layers)

    def _fingerprints(self, resuming: bool) -> tuple[str, dict[str, str]]:
        """sha256 of each probed layer's base weight (W_0: a LoRA layer's frozen base; a dense layer's weight at
        attach time, read back from initial.safetensors on a resume), and of all of them."""
        per_layer = {}
        for layer in self.layers:
            if layer.pair is not None:
                base = layer.pair.base_weight()
            else:
                base = self._writer.initial_weight(layer.name) if resuming else layer.param.detach()
            digest = hashlib.sha256(f"{tuple(base.shape)}:{base.dtype}".encode())
            digest.update(base.contiguous().cpu().view(torch.uint8).numpy())  # the buffer, not a bytes copy
            per_layer[layer.name] = digest.hexdigest()
        overall = hashlib.sha256("".join(f"{k}={v};" for k, v in per_layer.items()).encode())
        return overall.hexdigest(), per_layer

    def _initial_weight(self, layer: _Layer) -> Tensor:
        return self._writer.initial_weight(layer.name).to(layer.param.device, layer.compute_dtype())

    # ------------------------------------------------------------------ hooks
    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Keeps the weights from before a recorded step (rank 0); nothing else happens before the step."""
        t = self.step + 1
        if self._writing and self.rank == 0 and (self.schedule(t) or self.snapshots(t)):
            self._guarded(lambda: [setattr(layer, "before", layer.state_now()) for layer in self.layers])

    def _post_step(self, optimizer, args, kwargs) -> None:
        """After the optimizer moved: gather G (every rank: the DDP all-reduce), feed the shadow, measure."""
        if self._optimizer_skipped():  # LoFT skipped a non-finite step: nothing moved, yet it is a step of the run
            self._skip_step()
            return
        t = self.step + 1
        measured = self.schedule(t) or self.snapshots(t)
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
        for layer in self.layers:
            if layer.grad is not None and not bool(torch.isfinite(layer.grad).all()):
                self._log_row(t, layer.name, "nonfinite_grad", 1.0)
                layer.grad = None
            if layer.shadow is not None and layer.grad is not None:
                beta1, beta2 = self._group(layer)["betas"]
                layer.shadow.feed(layer.grad, beta1, beta2)
        if self.schedule(t):
            self._log_values(t, rundir.RUN_LAYER, _schedule_values(self._group(self.layers[0])))
            for layer in self.layers:
                self._record(t, layer)
        if self.snapshots(t):
            self._snapshot(t)
        if self.schedule(t) or self.snapshots(t):
            self._flush()  # recorded steps only: one Parquet part per record, not per step

    def _skip_step(self) -> None:
        """A step whose update was skipped (non-finite gradients): it keeps its number, so that the rows logged
        after it (its NaN loss) are its own and not the previous step's; the shadow is not fed."""
        t = self.step + 1
        self._log_row(t, rundir.RUN_LAYER, "skipped_step", 1.0)
        if self.schedule(t) or self.snapshots(t):
            self._guarded(self._flush)
        self._end_step(advance=True)

    def _end_step(self, advance: bool) -> None:
        if advance:
            self.step += 1
        for layer in self.layers:
            layer.grad, layer.before = None, None
            if layer.capture is not None:
                layer.capture.reset()
        self._pending_skip = False
        self._set_capture(self.step + 1)

    def _optimizer_skipped(self) -> bool:
        skipped = sum(group.get("skipped_steps", 0) for group in self.optimizer.param_groups)
        if skipped == self._skipped_seen:
            return False
        self._skipped_seen = skipped
        return True

    def _full_gradient(self, layer: _Layer, measured: bool) -> Tensor | None:
        """G (m×n) of this step: ``W.grad``, or the captured gradient (unscaled, averaged over ranks).
        Dense gradients are read only on rank 0 when something uses them."""
        if layer.pair is None:
            grad = layer.param.grad
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

    # ------------------------------------------------------------------ measuring
    def _group(self, layer: _Layer) -> dict[str, Any]:
        return self._groups[id(layer.key_param)]

    def _record(self, t: int, layer: _Layer) -> None:
        """Every per-step metric of one layer at recorded step t (the names: ``rundir.METRICS``)."""
        if layer.before is None:
            return
        group = self._group(layer)
        after = layer.state_now()
        if not _finite(after):  # the optimizer diverged: say so, no spectra
            self._log_row(t, layer.name, "update_norm", float("nan"))
            return
        W_before = layer.weight(layer.before)
        update = layer.update(layer.before, after)  # (m, n)
        values = measure.update_metrics(update, W_before, layer.grad, group["lr"])
        values["weight_change_norm"] = float(self._cumulative_delta_norm(layer, after))
        if layer.pair is not None:
            grads = (layer.pair.B.grad, layer.pair.A.grad)
            values.update(measure.factor_metrics(layer.initial_factors, after, grads))
            if layer.grad is not None:
                values.update(measure.residual_metrics(layer.grad, *layer.before))
        if not self.layout.known(self.optimizer, layer.key_param):
            self._warn_once("layout", f"{type(self.optimizer).__name__} holds no exp_avg/exp_avg_sq for layer "
                                      f"{layer.name} (another state layout, or a parameter it never stepped): its "
                                      "moments are not recorded, its gradients and updates are")
        moments = self.layout.full_space(self.optimizer, group, layer)
        if moments is not None and layer.grad is not None:
            values.update(measure.moment_grad_metrics(moments.first, layer.grad))
        elif layer.pair is not None:
            values.update(self.layout.factor_cosine(self.optimizer, layer))
        if layer.shadow is not None and layer.shadow.step > 0:
            beta1, beta2 = group["betas"]
            shadow_update = layer.shadow.update(W_before, group["lr"], beta1, beta2, group["eps"],
                                                group.get("weight_decay", 0.0))
            values.update(measure.shadow_metrics(update, shadow_update))
            if moments is not None:
                shadow_m, shadow_v = layer.shadow.moments()
                projected = moments.project(shadow_m) if moments.project is not None else None
                values.update(measure.moment_metrics(moments.first, moments.second, shadow_m, shadow_v, projected,
                                                     group["eps"]))
        self._log_values(t, layer.name, values)

    def _cumulative_delta_norm(self, layer: _Layer, state: tuple[Tensor, ...]) -> Tensor:
        if layer.pair is not None:
            delta = M.lowrank_update(*layer.initial_factors, *state, scale=layer.pair.scale)
            return M.lowrank_norm(*delta)
        return (state[0] - self._initial_weight(layer)).norm()

    def _snapshot(self, t: int) -> None:
        tensors: dict[str, Tensor] = {}
        for layer in self.layers:
            key = lambda what, part, name=layer.name: rundir.snapshot_key(name, what, part)  # noqa: E731
            state = layer.state_now()
            if not _finite(state):
                continue  # a diverged layer has no spectrum: its NaN update norms already say so
            if layer.pair is not None:
                B, A = state
                delta_lr = M.lowrank_update(*layer.initial_factors, B, A, scale=layer.pair.scale)
                delta = _truncate(M.lowrank_svd(*delta_lr), self.snapshot_k)
                tensors[key("adapter", "B")], tensors[key("adapter", "A")] = B, A
            else:
                W, W0 = state[0], self._initial_weight(layer)
                delta = M.top_singular(W - W0, min(self.snapshot_k, *W.shape))
            for part, tensor in zip(("U", "S", "Vh"), delta, strict=True):
                tensors[key("delta", part)] = tensor
            if layer.shadow is not None and layer.shadow.step > 0:
                shadow_m = layer.shadow.moments()[0]
                for part, tensor in zip(("U", "S", "Vh"),
                                        M.top_singular(shadow_m, min(self.snapshot_k, *shadow_m.shape)),
                                        strict=True):
                    tensors[key("shadow_m", part)] = tensor
            values = measure.spectrum_metrics(delta, layer.base_norm)
            self._log_values(t, layer.name, values)
        self._writer.write_snapshot(t, tensors)
        if self.intruders == "all":
            self._record_intruders(t)

    def _record_intruders(self, t: int) -> None:
        """Intruder counts of every layer's current weight: an SVD of W_0 per layer, so by default only once,
        at the last step (``intruders="last"``)."""
        for layer in self.layers:
            state = layer.state_now()
            if not _finite(state):
                continue
            if layer.pair is not None:
                scores = self._lora_intruder_scores(layer, *state)
            else:
                scores = _intruder_scores(self._initial_weight(layer), state[0])
            if scores is not None:
                self._log_values(t, layer.name, measure.intruder_metrics(scores))

    def _lora_intruder_scores(self, layer: _Layer, B: Tensor, A: Tensor) -> Tensor | None:
        """Intruder scores of W_0 + s·B·A from W_0's SVD (kept with ``intruders="all"``: about twice W_0's
        memory per layer) and the rank-r update: no m×n SVD of the tuned weight."""
        base_svd = layer.base_svd or M.SVD(*torch.linalg.svd(layer.pair.base_weight().to(B.dtype),
                                                              full_matrices=False))
        if self.intruders == "all":  # counted at every snapshot: keep it
            layer.base_svd = base_svd
        k = min(INTRUDER_K, base_svd.S.numel() - 1)  # the low-rank path needs k < min(m, n)
        if k < 1:
            return None
        return M.intruder_scores_lowrank(base_svd, M.LowRank(layer.pair.scale * B, A), k=k)

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
                entry.update(shadow_step=layer.shadow.step, shadow_exp_avg=layer.shadow.exp_avg,
                             shadow_exp_avg_sq=layer.shadow.exp_avg_sq)
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
                layer.shadow.step = int(entry["shadow_step"])
                layer.shadow.exp_avg.copy_(entry["shadow_exp_avg"])
                layer.shadow.exp_avg_sq.copy_(entry["shadow_exp_avg_sq"])
        self._set_capture(self.step + 1)

    # ------------------------------------------------------------------ output
    def log(self, **values: float) -> None:
        """Run-level values (``loss=...``) at the step just completed: call it after ``optimizer.step()``.
        They are written with the next recorded step's part (and at close)."""
        self._log_values(self.step, rundir.RUN_LAYER, values)

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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"loft_probe: {message}", ProbeWarning, stacklevel=3)

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
        """Writes what is pending, a snapshot of the last step, and marks the run closed. Idempotent."""
        atexit.unregister(self.close)
        writing = self._writing and self.rank == 0
        self._writing = False
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
        except (OSError, rundir.RunDirError) as exc:  # a disk full, or a part damaged under the running probe
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


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, **options: Any) -> Probe:
    """Attach a probe to a model and its optimizer; the training loop stays as it is.

    Args:
        every: record schedule: an int k (every k steps), a list of steps, or a :class:`Schedule`.
        shadow: keep a shadow AdamW per probed layer (2·m·n numbers each) fed the true gradient every step.
        capture_grad: capture LoRA layers' full-weight gradient G (activation memory); default = ``shadow``.
        layers: fnmatch pattern(s) on layer names; default every LoRA layer, or every 2-D weight without LoRA.
        snapshots: schedule of ΔW snapshots (default every 4th recorded step), plus the last step at close.
        snapshot_k: singular triplets per snapshot (default 32).
        intruders: intruder-dimension counts (an SVD of W_0 per layer) at the ``"last"`` step (default), at
            ``"all"`` snapshots, or ``"none"``.
        shadow_dtype: ``torch.bfloat16`` halves the shadow's memory.
        grad_scaler: the ``torch.amp.GradScaler`` of an AMP run, so that captured G is recorded unscaled.
        seed, data_order, name: recorded in meta.json; runs compare only with equal seed and data order.
    """
    return Probe(model, optimizer, run_dir, **options)


def _check_labels(seed: Any, data_order: Any, name: Any, extra_meta: Any) -> None:
    """The values attach writes into meta.json as given: checked here, so that load_run never refuses them."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    for key, value in (("name", name), ("data_order", data_order)):
        if value is not None and (not isinstance(value, str) or len(value) > schema.MAX_RUN_NAME):
            raise ValueError(f"{key} must be a string of at most {schema.MAX_RUN_NAME} characters or None, got "
                             f"{str(value)[:40]!r}" + ("..." if len(str(value)) > 40 else ""))
    if extra_meta is None:
        return
    if not isinstance(extra_meta, dict) or not all(isinstance(k, str) for k in extra_meta):
        raise ValueError(f"extra_meta must be a dict with string keys, got {type(extra_meta).__name__}")
    reserved = sorted(set(extra_meta) & set(schema.RESERVED))
    if reserved:
        raise ValueError(f"extra_meta may not set {reserved}: the probe writes those itself")
    try:
        json.loads(json.dumps(extra_meta, allow_nan=False))
        schema.check_json_value(extra_meta, "extra_meta")
        schema.check_meta({"method": "other", "layers": [{"name": "x", "shape": [1, 1], "kind": "full"}],
                           **extra_meta})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra_meta must be plain JSON within meta.json's limits: {exc}") from None


def _check_groups(optimizer: torch.optim.Optimizer, layers: list[_Layer], groups: dict[int, dict],
                  shadow: bool) -> None:
    """Optimizer groups the probe can label and mirror: a LoFT pair group for each LoRA layer of a LoFT run
    (``[B, A]`` in that order, with the pair's scale), and Adam's betas and eps where a shadow mirrors them."""
    for layer in layers:
        group = groups[id(layer.key_param)]
        if shadow and not ("betas" in group and "eps" in group):
            raise ValueError(f"shadow=True mirrors the run with AdamW and needs the optimizer's betas and eps; "
                             f"{type(optimizer).__name__} has none (layer {layer.name!r}): use shadow=False")
        if not isinstance(optimizer, LoFT) or layer.pair is None:
            continue
        if group.get("lora_scale") is None:
            raise ValueError(f"layer {layer.name!r}: its LoFT param group has no lora_scale, so LoFT would step it "
                             "as plain AdamW; build the optimizer with LoFT.from_model(model), or give the group "
                             "lora_scale")
        params = group["params"]
        if len(params) != 2 or params[0] is not layer.pair.B or params[1] is not layer.pair.A:
            raise ValueError(f"layer {layer.name!r}: its LoFT pair group must hold [B, A] of that layer in this "
                             "order (B: lora_B, m×r; A: lora_A, r×n); build it with LoFT.from_model(model)")
        if not math.isclose(group["lora_scale"], layer.pair.scale, rel_tol=1e-9):
            raise ValueError(f"layer {layer.name!r}: its LoFT group has lora_scale {group['lora_scale']}, the "
                             f"adapter's scale is {layer.pair.scale}")


def _comparable(hyper: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Hyperparameters for the same-run check: a scheduler moves lr, so a live optimizer's is its initial_lr."""
    out = dict(hyper) if isinstance(hyper, dict) else {}
    if optimizer is not None and "initial_lr" in optimizer.param_groups[0]:
        out["lr"] = optimizer.param_groups[0]["initial_lr"]
    return out


def _without_fingerprints(table: Any) -> Any:
    if not isinstance(table, list):
        return table
    return [{k: v for k, v in entry.items() if k != "fingerprint"} if isinstance(entry, dict) else entry
            for entry in table]


def _default_snapshots(schedule: Schedule) -> Schedule:
    return every(4 * schedule.k) if schedule.kind == "every" and not schedule.dense else schedule


def _select_layers(model: nn.Module, patterns: str | Iterable[str] | None) -> list[_Layer]:
    pairs = [p for p in lora_pairs(model) if p.A.requires_grad and p.B.requires_grad]
    if pairs:
        layers = [_Layer(pair.name, pair, None) for pair in pairs]
    else:
        layers = [_Layer(eager_name(name).removesuffix(".weight"), None, param)
                  for name, param in model.named_parameters() if param.requires_grad and param.dim() == 2]
    if patterns is not None:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        layers = [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)]
    if not layers:
        raise ValueError(f"no layer to probe: the model has no trainable LoRA pair or 2-D weight matching "
                         f"{patterns!r}")
    too_long = [layer.name for layer in layers if len(layer.name) > schema.MAX_LAYER_NAME]
    if too_long:
        raise ValueError(f"layer names must be at most {schema.MAX_LAYER_NAME} characters (meta.json's limit), "
                         f"got one of {len(too_long[0])}: {too_long[0][:60]!r}...")
    sharded = [layer.name for layer in layers if is_sharded(layer.key_param)]
    if sharded:
        raise ValueError(f"the probe does not support FSDP-sharded parameters yet (layer {sharded[0]!r}); "
                         "use DDP")
    return layers


def _method(optimizer: torch.optim.Optimizer, layers: list[_Layer], model: nn.Module) -> str:
    lora = any(layer.pair is not None for layer in layers)
    if not lora and unsupported_lora_layers(model):
        return "other"  # DoRA and other adapters the probe reads as dense weights: not full fine-tuning
    if isinstance(optimizer, LoFT):
        return "loft" if lora else "full"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "lora" if lora else "full"
    return "other"


def _hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    keep = ("lr", "betas", "eps", "weight_decay", *LoFT.switches(), "partner_cutoff")
    group = optimizer.param_groups[0]
    out = {k: (list(group[k]) if isinstance(group[k], tuple) else group[k]) for k in keep if k in group}
    if getattr(optimizer, "max_grad_norm", None) is not None:
        out["max_grad_norm"] = optimizer.max_grad_norm
    return out


def _schedule_values(group: dict[str, Any]) -> dict[str, float]:
    """The lr and betas a step was taken with (a scheduler changes them after ``optimizer.step``): the group of
    the first probed layer, recorded as run-level rows; each layer's ``update_lr_ratio`` uses its own group."""
    values = {"lr": float(group["lr"])}
    if isinstance(group.get("betas"), (tuple, list)) and len(group["betas"]) == 2:
        values["beta1"], values["beta2"] = map(float, group["betas"])
    return values


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """The number of steps an optimizer has taken, from its state (0 for a fresh one); LoFT's skipped steps
    count too (each is a step of the record)."""
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0) + int(optimizer.param_groups[0].get("skipped_steps", 0))


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _finite(state: tuple[Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in state)


def _intruder_scores(W0: Tensor, W: Tensor) -> Tensor:
    """The top-10 (fewer for small layers) intruder scores of a dense tuned weight (Shuttleworth et al.)."""
    return M.intruder_scores(W0, W, k=min(INTRUDER_K, *W.shape))


def _truncate(svd: M.SVD, k: int) -> M.SVD:
    return M.SVD(svd.U[:, :k], svd.S[:k], svd.Vh[:k])
