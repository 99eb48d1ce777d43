"""The layers a probe watches: which ones (selection by name pattern), what each is (a LoRA pair or a dense
weight), whether the optimizer's groups fit them, and the fingerprint of their base weights."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loft_probe.lora import LoraPair, eager_name, lora_pairs, unsupported_lora_layers
from loft_probe.metrics import SVD, LowRank, lowrank_norm, lowrank_update
from loft_probe.optim import LoFT
from loft_probe.optim.loft import compute_dtype
from loft_probe.probe.capture import GradCapture
from loft_probe.probe.gather import Whole
from loft_probe.probe.shadow import Shadow
from loft_probe.run import meta as schema


@dataclass
class ProbedLayer:
    """One probed weight: a LoRA pair (``pair``) or a dense 2-D parameter (``param``), with what the probe keeps
    about it between steps."""

    name: str
    pair: LoraPair | None
    param: nn.Parameter | None
    capture: GradCapture | None = None
    shadow: Shadow | None = None
    initial_factors: tuple[Tensor, Tensor] | None = None  # LoRA: (B, A) at attach time
    base_norm: float = 0.0  # ‖W_0‖
    grad: Tensor | None = None  # this step's G (m×n)
    before: tuple[Tensor, ...] | None = None  # recorded steps: (B, A) or (W,) from before the step
    grads_before: tuple[Tensor | None, ...] | None = None  # (B.grad, A.grad) or (W.grad,) when the step overwrites them
    layout_before: Any = None  # recorded steps of a dense weight: what its layout kept from before the step
    base_svd: SVD | None = None  # LoRA: W_0's thin SVD, kept when intruders are counted at every snapshot
    whole: Whole | None = None  # an FSDP2-sharded pair: its tensors gathered whole (loft_probe.probe.gather)
    weight_before: Tensor | None = None  # W (m×n) from ``before``, once formed at this step (weight_before_step)

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

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The trainable tensors: (B, A) or (W,)."""
        return (self.pair.B, self.pair.A) if self.pair is not None else (self.param,)

    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.key_param)

    def state_now(self) -> tuple[Tensor, ...]:
        """A copy of the layer's trainable state: (B (m×r), A (r×n)) or (W (m×n),); a sharded pair's as gathered
        at this step (every rank gathers in the hooks: reading the shards here would be a collective)."""
        dtype = self.compute_dtype()
        if self.whole is not None:
            if self.whole.factors is None:
                raise RuntimeError(f"layer {self.name!r}: its sharded factors were not gathered at this step")
            B, A = self.whole.factors
            return B.to(dtype, copy=True), A.to(dtype, copy=True)
        if self.pair is not None:
            return self.pair.B.detach().to(dtype, copy=True), self.pair.A.detach().to(dtype, copy=True)
        return (self.param.detach().to(dtype, copy=True),)

    def base_weight(self) -> Tensor:
        """A LoRA pair's frozen W_0 (m×n); a sharded pair's gathered whole at attach (on rank 0)."""
        return self.whole.base if self.whole is not None else self.pair.base_weight()

    def factor_grads(self) -> tuple[Tensor | None, Tensor | None]:
        """(B.grad (m×r), A.grad (r×n)) after the step: kept from before a step that overwrites them, gathered
        whole for a sharded pair, else the live ones."""
        if self.grads_before is not None:
            return self.grads_before
        if self.whole is not None:
            return self.whole.grads or (None, None)
        return self.pair.B.grad, self.pair.A.grad

    def weight(self, state: tuple[Tensor, ...]) -> Tensor:
        """The effective weight W (m×n) of a saved state: ``W0 + s·B·A`` in one fused multiply-add."""
        if self.pair is None:
            return state[0]
        B, A = state
        return torch.addmm(self.base_weight().to(B.dtype), B, A, alpha=self.pair.scale)

    def weight_before_step(self) -> Tensor:
        """W (m×n) before this step, from ``before``: formed on first use and kept until the step ends (a shadow
        needs it for its decay term, and then ‖W‖ is read off it)."""
        if self.weight_before is None:
            self.weight_before = self.weight(self.before)
        return self.weight_before

    def update(self, before: tuple[Tensor, ...], after: tuple[Tensor, ...], lowrank: bool = False,
               out: Tensor | None = None) -> Tensor | LowRank:
        """W_after − W_before (m×n; in ``out`` when given), from the factors: W_0 never enters, so nothing
        cancels. ``lowrank``: a LoRA pair's update as the rank ≤ 2r :class:`LowRank` it is, never formed."""
        if self.pair is None:
            return torch.sub(after[0], before[0], out=out)
        if lowrank:
            return lowrank_update(*before, *after, scale=self.pair.scale)
        # s·(B1·A1 − B0·A0): the second product subtracted as it is formed, no m×n temporary
        return torch.mm(after[0], after[1], out=out).addmm_(before[0], before[1], alpha=-1).mul_(self.pair.scale)

    def before_norm(self) -> Tensor:
        """‖W‖ before this step: of W when it was formed at this step, else without forming a LoRA pair's W:
        ‖W_0 + s·B·A‖² = ‖W_0‖² + 2s·⟨W_0·Aᵀ, B⟩ + s²·‖B·A‖², one m×n×r product."""
        if self.pair is None or self.weight_before is not None:
            return self.weight_before_step().norm()
        B, A = self.before
        s, W0 = self.pair.scale, self.base_weight().to(B.dtype)
        cross = ((W0 @ A.mT) * B).sum()
        return (self.base_norm**2 + 2 * s * cross + s**2 * lowrank_norm(B, A) ** 2).clamp_min(0).sqrt()

    def table_entry(self, fingerprint: str) -> dict:
        """This layer's entry in meta.json's layer table."""
        return {"name": self.name, "shape": list(self.shape), "kind": self.kind,
                "rank": self.pair.rank if self.pair else None, "scale": self.pair.scale if self.pair else None,
                "fingerprint": fingerprint}


def select_layers(model: nn.Module, patterns: str | Iterable[str] | None) -> list[ProbedLayer]:
    """Every trainable LoRA pair, or (a model without one) every trainable 2-D weight; then those whose name
    matches one of the fnmatch ``patterns``."""
    pairs = [p for p in lora_pairs(model) if p.A.requires_grad and p.B.requires_grad]
    if pairs:
        layers = [ProbedLayer(pair.name, pair, None) for pair in pairs]
    else:
        layers = [ProbedLayer(eager_name(name).removesuffix(".weight"), None, param)
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
    return layers


def method_of(optimizer: torch.optim.Optimizer, layers: list[ProbedLayer], model: nn.Module) -> str:
    """The run's method as meta.json names it: full, lora, loft, or other."""
    lora = any(layer.pair is not None for layer in layers)
    if not lora and unsupported_lora_layers(model):
        return "other"  # DoRA and other adapters the probe reads as dense weights: not full fine-tuning
    if isinstance(optimizer, LoFT):
        return "loft" if lora else "full"
    return "lora" if lora else "full"


def check_groups(optimizer: torch.optim.Optimizer, layers: list[ProbedLayer], groups: dict[int, dict]) -> None:
    """Optimizer groups the probe can label and mirror: a LoFT pair group for each LoRA layer of a LoFT run
    (``[B, A]`` in that order, with the pair's scale)."""
    for layer in layers:
        if id(layer.key_param) not in groups:
            raise ValueError(f"layer {layer.name!r} is not optimized by the given optimizer")
        group = groups[id(layer.key_param)]
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


def fingerprints(layers: list[ProbedLayer], base_of: Callable[[ProbedLayer], Tensor]) -> tuple[str, dict[str, str]]:
    """sha256 of each layer's base weight W_0 (``base_of(layer)``: a LoRA layer's frozen base, a dense layer's
    weight at attach time), and of all of them: (the run's fingerprint, {layer: fingerprint})."""
    per_layer = {}
    for layer in layers:
        base = base_of(layer)
        digest = hashlib.sha256(f"{tuple(base.shape)}:{base.dtype}".encode())
        digest.update(base.contiguous().cpu().view(torch.uint8).numpy())  # the buffer, not a bytes copy
        per_layer[layer.name] = digest.hexdigest()
    overall = hashlib.sha256("".join(f"{k}={v};" for k, v in per_layer.items()).encode())
    return overall.hexdigest(), per_layer
