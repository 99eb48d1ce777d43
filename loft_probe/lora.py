"""LoRA layers and a uniform view of the LoRA factors in any model.

A LoRA-adapted matrix is W = W0 + s·B·A with W0 (m, n) frozen, A (r, n), B (m, r) trainable and s a
scalar. :func:`lora_pairs` finds every such (A, B) pair in a model — the project's own :class:`LoraLinear`,
PEFT LoRA layers and torchtune-style ``lora_a``/``lora_b`` layers — so that the optimizer and the metrics
need not know which library built the adapter. ``peft`` is only detected by attribute, never imported.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoraLinear", "LoraPair", "add_lora", "dropout_warning", "lora_pairs", "unsupported_lora_layers"]


# eq=False: the generated __eq__ would compare tensors elementwise; pairs compare (and hash) by identity.
@dataclass(frozen=True, eq=False)
class LoraPair:
    """One adapted matrix W = base + scale·B·A, seen the same way whichever library built it.

    ``name`` is the path of the adapted ``nn.Linear`` in the un-adapted model (PEFT's ``base_model.model.``
    prefix removed), with ``@<adapter>`` appended for a PEFT adapter other than ``"default"``. ``A`` is
    (r, n) and ``B`` is (m, r) in ``nn.Linear`` layout. ``base`` is the frozen weight exactly as stored:
    (m, n), or (n, m) when ``fan_in_fan_out`` (GPT-2 ``Conv1D``). ``scale`` is read when the pair is built;
    a later change of the layer's scaling (e.g. PEFT's ``set_scale``) is not reflected. ``dropout`` is the
    probability with which the factors' input is dropped (0 without LoRA dropout).
    """

    name: str
    module: nn.Module
    adapter: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    base: torch.Tensor
    fan_in_fan_out: bool = False
    dropout: float = 0.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): output and input size of the adapted map."""
        return self.B.shape[0], self.A.shape[1]

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as an (m, n) detached view, transposed when stored fan-in-fan-out."""
        w = self.base.detach()
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, (m, n), detached."""
        with torch.no_grad():
            return self.scale * (self.B @ self.A)


class LoraLinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) · alpha / rank`` around a frozen ``nn.Linear``.

    ``lora_A`` is ``nn.Linear(n, rank)`` (weight (rank, n)), ``lora_B`` is ``nn.Linear(rank, m)`` (weight
    (m, rank)), both without bias, on the base weight's device and dtype. Initialised as PEFT's default:
    A Kaiming-uniform (bound 1/sqrt(n)), B zero, so the layer starts equal to the base layer.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        rank, alpha = _check_args(rank, alpha, dropout)
        m, n = base_layer.out_features, base_layer.in_features
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds min(out, in) of an nn.Linear with weight shape ({m}, {n})")
        self.in_features, self.out_features = n, m
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.base_layer = base_layer.requires_grad_(False)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(n, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, m, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Explicit rather than relying on nn.Linear's reset, so the init stays PEFT's if torch's changes.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) -> (..., m)."""
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, rank={self.rank}, alpha={self.alpha}"


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    *,
    targets: Sequence[str] | str,
    dropout: float = 0.0,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in :class:`LoraLinear` in place; freeze the rest.

    ``targets`` follows PEFT's ``target_modules`` list: a module named ``name`` matches ``t`` when
    ``name == t`` or ``name.endswith("." + t)``. ``targets="all-linear"`` means every ``nn.Linear`` —
    unlike PEFT, the output head included; name it in ``exclude`` (same matching) to leave it out.
    ``alpha`` defaults to ``rank`` (scale 1). Afterwards only the LoRA factors of the model's
    :class:`LoraLinear` layers require grad. Everything is checked before the model is touched.
    """
    rank, alpha = _check_args(rank, alpha, dropout)
    modules = _modules_outside_lora(model)
    lora_names = _lora_module_names(model)
    linear_names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    for t in exclude:
        if not any(matches_target(name, t) for name in modules):
            raise ValueError(f"exclude {t!r} matches no module; some nn.Linear names: {linear_names[:5]}")

    if targets == "all-linear":
        chosen = linear_names
    elif isinstance(targets, str):
        # PEFT reads a plain string as a regex; refusing it avoids silently matching each character.
        raise ValueError(f"targets must be a sequence of module names or 'all-linear', got {targets!r}")
    else:
        chosen = []
        for t in targets:
            wrapped = [name for name in lora_names if matches_target(name, t)]
            if wrapped:
                raise ValueError(f"target {t!r} matches {wrapped[0]!r}, which already has LoRA")
            hits = [name for name in modules if matches_target(name, t)]
            if not hits:
                raise ValueError(f"target {t!r} matches no module; some nn.Linear names: {linear_names[:5]}")
            for name in hits:
                if not isinstance(modules[name], nn.Linear):
                    kind = type(modules[name]).__name__
                    raise ValueError(f"target {t!r} matches {name!r}, a {kind}, not an nn.Linear")
            chosen += [name for name in hits if name not in chosen]
    chosen = [name for name in chosen if not any(matches_target(name, t) for t in exclude)]
    if not chosen:
        raise ValueError(f"targets {targets!r} minus exclude {tuple(exclude)!r} leave no nn.Linear to adapt")

    for name in chosen:
        m, n = modules[name].weight.shape
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds min(out, in) of {name!r} with weight shape ({m}, {n})")

    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(modules[name], rank, alpha, dropout))

    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    return model


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every plain LoRA pair in ``model``, in ``named_modules()`` order (PEFT adapters in insertion order).

    LoRA layers that are not W0 + s·B·A (DoRA and other PEFT variants, embeddings, convolutions, biased
    LoRA factors) are skipped with one warning listing them; the optimizer gives their parameters plain AdamW.
    """
    pairs, skipped = _scan(model)
    if skipped:
        warnings.warn(
            f"{len(skipped)} LoRA layer(s) are not plain W0 + s*B*A and are skipped; "
            f"their parameters get plain AdamW: {', '.join(skipped)}",
            stacklevel=2,
        )
    return pairs


def dropout_warning(pairs: Sequence[LoraPair]) -> str | None:
    """One line for a probe whose LoRA pairs drop out their factors' input, or None when none does.

    The factors see the dropped-out input, the full-weight gradient G a probe captures sees the whole layer's:
    ``g_B = s·G·Aᵀ`` then holds only in expectation, and so do the residuals and the shadow fed with G.
    """
    dropped = [pair for pair in pairs if pair.dropout > 0]
    if not dropped:
        return None
    low, high = min(pair.dropout for pair in dropped), max(pair.dropout for pair in dropped)
    p = f"{low:g}" if low == high else f"{low:g}–{high:g}"
    return (f"{len(dropped)} of {len(pairs)} LoRA layer(s) have dropout p={p}: their factors see a dropped-out "
            "input, the captured G the whole layer's, so the projection residuals and the shadow (fed G) match "
            "the factors' gradients only in expectation; train with LoRA dropout 0 for an exact comparison")


def unsupported_lora_layers(model: nn.Module) -> list[str]:
    """Names (as in :class:`LoraPair`) of the LoRA layers that :func:`lora_pairs` skips."""
    return _scan(model)[1]


def _check_args(rank: int, alpha: float | None, dropout: float) -> tuple[int, float]:
    """Validated (rank, alpha), alpha defaulting to rank."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    # Checked here, not left to nn.Dropout, so that add_lora fails before it has wrapped any layer.
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if alpha is None:
        return int(rank), float(rank)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return int(rank), float(alpha)


def matches_target(name: str, target: str) -> bool:
    """PEFT's target_modules rule: whole trailing components of the dotted path."""
    return name == target or name.endswith("." + target)


def _is_lora_module(module: nn.Module) -> bool:
    return isinstance(module, LoraLinear) or _is_peft_lora(module) or _is_torchtune_lora(module)


def _is_peft_lora(module: nn.Module) -> bool:
    # PEFT's LoraLayer keeps its factors in ModuleDicts keyed by adapter and scaling in a plain dict.
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "scaling", None), dict
    )


def _is_torchtune_lora(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "lora_a", None), nn.Linear)
        and isinstance(getattr(module, "lora_b", None), nn.Linear)
        and hasattr(module, "scaling")
    )


def _lora_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_lora_module(module)]


def _modules_outside_lora(model: nn.Module) -> dict[str, nn.Module]:
    """Named submodules, leaving out LoRA layers and their insides (base layer, factors)."""
    lora = _lora_module_names(model)
    return {
        name: module
        for name, module in model.named_modules()
        if name and not any(name == p or name.startswith(p + ".") for p in lora)
    }


def _peft_prefix(model: nn.Module) -> str:
    """Path prefix PEFT's wrappers put in front of the user's module names ("" if not wrapped)."""
    # Only an already imported peft can have built a wrapper; looking in sys.modules keeps peft optional.
    peft = sys.modules.get("peft")
    if peft is None:
        return ""
    if isinstance(model, peft.PeftModel):
        return "base_model.model."
    if isinstance(model, peft.tuners.tuners_utils.BaseTuner):
        return "model."
    return ""


def eager_name(path: str) -> str:
    """A module path without the ``_orig_mod.`` segments ``torch.compile`` inserts, so that a compiled model's
    layers carry the names of the eager model's (and their runs compare)."""
    return path.replace("_orig_mod.", "")


def _scan(model: nn.Module) -> tuple[list[LoraPair], list[str]]:
    """(supported pairs, names of skipped LoRA layers), both in named_modules() order."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its PEFT prefix is the inner model's
    prefix = _peft_prefix(model)
    pairs: list[LoraPair] = []
    skipped: list[str] = []
    for path, module in model.named_modules():
        for name, pair in _entries(eager_name(path).removeprefix(prefix), module):
            if pair is None:
                skipped.append(name)
            else:
                pairs.append(pair)
    return pairs, skipped


def _entries(name: str, module: nn.Module) -> list[tuple[str, LoraPair | None]]:
    """(name, pair or None if unsupported) per adapter of ``module``; empty when it carries no LoRA."""
    if isinstance(module, LoraLinear):
        weight = module.base_layer.weight
        return [(name, _pair(name, module, "default", module.lora_A, module.lora_B, module.scaling, weight,
                             dropout=_dropout_p(module.dropout)))]
    if _is_torchtune_lora(module):
        # torchtune's DoRALinear has LoRALinear's attributes plus a learned magnitude.
        if getattr(module, "magnitude", None) is not None or getattr(module, "use_dora", False):
            return [(name, None)]
        weight = getattr(module, "weight", None)
        return [(name, _pair(name, module, "default", module.lora_a, module.lora_b, module.scaling, weight,
                             dropout=_dropout_p(getattr(module, "dropout", None))))]
    if not _is_peft_lora(module):
        return []

    weight = getattr(module, "weight", None)  # PEFT's tuner layers expose the innermost base layer's weight
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
    # Embedding LoRA lives in ParameterDicts, not in lora_A/lora_B.
    embedding_adapters = list(getattr(module, "lora_embedding_A", {}).keys())
    entries = []
    for adapter in list(module.lora_A.keys()) + embedding_adapters:
        full = name if adapter == "default" else f"{name}@{adapter}"
        exotic = (
            adapter in embedding_adapters
            or adapter in getattr(module, "lora_variant", {})  # DoRA and the other variants (peft >= 0.15)
            or adapter in getattr(module, "lora_magnitude_vector", {})  # DoRA, also before variants existed
            # ParamWrapper adapts a named (possibly 3-d expert) parameter, not the layer's weight
            or hasattr(module, "parameter_name")
        )
        if exotic:
            entries.append((full, None))
            continue
        a, b, scale = module.lora_A[adapter], module.lora_B[adapter], module.scaling[adapter]
        dropouts = getattr(module, "lora_dropout", {})  # a ModuleDict of nn.Dropout, or nn.Identity at p = 0
        dropout = _dropout_p(dropouts[adapter] if adapter in dropouts else None)
        entries.append((full, _pair(full, module, adapter, a, b, scale, weight, fan_in_fan_out, dropout)))
    return entries


def _pair(
    name: str,
    module: nn.Module,
    adapter: str,
    lora_a: nn.Module,
    lora_b: nn.Module,
    scale: float,
    base: torch.Tensor | None,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
) -> LoraPair | None:
    """The pair, or None when the layer is not exactly W0 + s·B·A with plain linear factors."""
    plain = (
        type(lora_a) is nn.Linear  # not a convolution or a quantised/parallel linear
        and type(lora_b) is nn.Linear
        and lora_a.bias is None
        and lora_b.bias is None  # PEFT's lora_bias adds s·b to the output
        and base is not None
    )
    if not plain:
        return None
    m, n = lora_b.weight.shape[0], lora_a.weight.shape[1]
    # A packed (quantised) base weight does not have the layer's shape and cannot be read as W0.
    if tuple(base.shape) != ((n, m) if fan_in_fan_out else (m, n)):
        return None
    return LoraPair(name, module, adapter, lora_a.weight, lora_b.weight, float(scale), base, fan_in_fan_out,
                    dropout)


def _dropout_p(module: nn.Module | None) -> float:
    """The drop probability of a LoRA layer's dropout module (``nn.Identity`` or none: 0)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0
