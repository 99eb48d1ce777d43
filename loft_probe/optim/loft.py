"""The LoFT optimizer: bookkeeping around the math of :mod:`loft_probe.optim.functional`.

Parameter groups are of two kinds. A *pair group* holds exactly ``[B, A]`` of one LoRA layer and its scale
``lora_scale`` (s in ``W = W0 + s·B·A``); it gets LoFT. Every other group (``lora_scale=None``) gets AdamW.
:meth:`LoFT.from_model` builds both kinds from a model.

State per pair (format 2), all tensors in ``optimizer.state`` (so ``state_dict`` round-trips it):
``state[B]``: ``step``, ``phase`` (0: B moves next, 1: A moves next), ``exp_avg`` m_B (m×r),
``exp_avg_sq`` S_B (m×T), ``frame`` E_B (n×r: the frame m_B is written against, ``M_B = m_B·E_Bᵀ``).
``state[A]``: ``exp_avg`` m_A (r×n), ``exp_avg_sq`` S_A (n×T), ``frame`` E_A (m×r, ``M_A = E_A·m_A``).
T = r(r+1)/2 for ``second_moment="full"`` (packed symmetric), r for ``"simple"`` (elementwise). The frames are
orthonormal bases of the partners' numerically supported subspaces (raw partners for the factor-space
ablation): see functional's docstring. Format 1 (raw factor coordinates, ``prev_partner``) is refused.

Over 350 lines: the constructor's checks, the step, clipping, skipping and the state-dict rules all read one
pair-state layout; the math itself lives in :mod:`~loft_probe.optim.functional` and :mod:`~loft_probe.optim.foreach`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from loft_probe.optim import foreach as FE
from loft_probe.optim import functional as F
from loft_probe.optim import sharding as SH
from loft_probe.optim.foreach import compute_dtype

SECOND_MOMENTS = ("full", "simple")
NONFINITE = ("skip", "raise")
# A pair group's entries that its step reads: pairs agreeing on all of them (and on shapes, dtype, device, step
# count and moving side) can step as one stack.
_STEP_KEYS = ("lr", "betas", "eps", "weight_decay", "lora_scale", "alternating", "scale_gradients", "transport",
              "second_moment", "projected_update", "partner_cutoff")


class FullSpaceMoments(NamedTuple):
    """A pair's moments in the weight's space, for probes: see :meth:`LoFT.full_space_moments`."""

    first: Tensor  # (m, n), contiguous
    second: Tensor  # (m, n), contiguous
    basis: Tensor  # orthonormal basis of what the factor that moved can express: (n, r) for B, (m, r) for A
    side: str  # "B" (X ↦ X·Q·Qᵀ) or "A" (X ↦ Q·Qᵀ·X)


class LoFT(torch.optim.Optimizer):
    """LoFT (Tastan et al., ICLR 2026): AdamW for LoRA factors that applies full fine-tuning's AdamW update,
    restricted to the subspace the adapter can express.

    It applies full fine-tuning's step (projected), so it takes a *full fine-tuning* learning rate (e.g. 2e-5
    to 1e-4 for a pretrained transformer), not LoRA's usual 1e-4 to 1e-3, and its trajectory does not depend on
    LoRA's α.

    Args:
        params: parameter groups; pair groups are ``{"params": [B, A], "lora_scale": s}`` with B (m×r),
            A (r×n). Prefer :meth:`from_model`.
        lr, betas, eps: as in ``torch.optim.AdamW``.
        weight_decay: decoupled, ``(1 − lr·λ)`` on the moving factor: it decays the adapter product
            ``s·B·A``, never the frozen ``W0``.
        alternating: move one factor per step (B first, since PEFT starts from B = 0). Off: both move.
        scale_gradients: precondition factor gradients by the partner's pseudo-inverse (step 1).
        transport: carry the moments over when the partner factor changes (steps 2–3).
        second_moment: ``"full"`` (per-row r×r matrices, exact full-space reconstruction) or ``"simple"``
            (their diagonals: elementwise, the memory of plain Adam).
        projected_update: apply the full-space AdamW direction projected onto the adapter (step 5).
            Off: Adam in factor coordinates (needs ``second_moment="simple"``).
        partner_cutoff: singular directions of a partner factor below this fraction of its largest are treated
            as absent (the numerical rank; docs/loft-spec.md). Bounds every factor step on rank-deficient
            partners (PEFT's first B, poolers, heads); exact wherever cond(partner) < 1/partner_cutoff.
        max_grad_norm: clip by the global full-space gradient norm (see :meth:`clip_grad_norm_`).
        nonfinite: what a step with a NaN or Inf gradient does. ``"skip"`` (default): nothing moves, no state
            changes, and every group's ``skipped_steps`` counts it (saved in ``state_dict``), as AMP's
            GradScaler skips such steps. ``"raise"``: ``FloatingPointError``, state untouched.
        foreach: the multi-tensor step. Pairs of the same shapes, dtype, device, hyperparameters, step count
            and moving side step as one stack (batched r×r work, batched blocked reconstruction), and the
            AdamW groups use torch's foreach AdamW. ``None`` (default): on accelerators (stacks wherever two
            or more pairs agree), off on the CPU, where one pair's working set stays in cache and an operator
            call costs microseconds, not a kernel launch (README, "LoFT: correctness and speed"). ``False``:
            pair by pair. The result is the same up to roundoff, the state format too. FSDP2-sharded pairs
            always step one by one.

    FSDP2 (``fully_shard``, 1-D mesh): each rank steps its rows of B and its columns of A, holds their state
    as DTensors, and exchanges O((m+n)·r) numbers per pair and step (:mod:`loft_probe.optim.sharding`); the
    non-finite skip and the clip norm are agreed across ranks. Shard A on columns with
    :func:`~loft_probe.optim.sharding.lora_shard_placement`.

    With ``alternating, scale_gradients, transport, projected_update`` all off and ``"simple"`` second
    moments, LoFT is AdamW on the factors (plain LoRA).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        alternating: bool = True,
        scale_gradients: bool = True,
        transport: bool = True,
        second_moment: str = "full",
        projected_update: bool = True,
        partner_cutoff: float = F.PARTNER_CUTOFF,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, second_moment, projected_update, partner_cutoff,
                               max_grad_norm)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lora_scale=None,
            alternating=alternating, scale_gradients=scale_gradients, transport=transport,
            second_moment=second_moment, projected_update=projected_update, partner_cutoff=partner_cutoff,
            skipped_steps=0,
        )
        self.max_grad_norm, self.nonfinite, self.foreach = max_grad_norm, nonfinite, foreach
        self._bases: dict[tuple, F.SecondMomentBasis] = {}  # index tensors, one per (rank, variant, device)
        super().__init__(params, defaults)

    @classmethod
    def switches(cls) -> dict[str, Any]:
        """The ablation switches, name → default, read from the signature (written once, there): what the
        runner, the probe's meta and the diagnosis know of them."""
        names = ("alternating", "scale_gradients", "transport", "second_moment", "projected_update")
        parameters = inspect.signature(cls.__init__).parameters
        return {name: parameters[name].default for name in names}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's (the constructor calls it for every group), then checks the group: a pair group must be
        ``[B, A]`` with a positive ``lora_scale``, and the hyperparameters in range."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = 1e-3, **kwargs: Any) -> LoFT:
        """LoFT for every trainable LoRA pair of ``model`` (PEFT, torchtune-style or ``add_lora`` layers),
        AdamW for every other trainable parameter (biases, heads, norms, DoRA magnitudes).

        ``lr`` is a full fine-tuning learning rate: LoFT applies full fine-tuning's AdamW step, projected onto
        the adapter, so use what full fine-tuning of the same model would use (often 10× below LoRA's).
        A model without LoRA pairs gets plain AdamW on every trainable parameter, with a warning.
        """
        from loft_probe.lora import lora_pairs

        pairs = [p for p in lora_pairs(model) if p.A.requires_grad and p.B.requires_grad]
        if not pairs:
            warnings.warn("LoFT.from_model found no trainable LoRA pairs; every trainable parameter "
                          "gets plain AdamW", stacklevel=2)
        in_pairs = {id(t) for pair in pairs for t in (pair.A, pair.B)}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
        groups: list[dict[str, Any]] = [
            {"params": [pair.B, pair.A], "lora_scale": pair.scale, "name": pair.name} for pair in pairs
        ]
        if rest:
            groups.append({"params": rest, "name": "adamw"})
        return cls(groups, lr=lr, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._gradients_finite():
            if self.nonfinite == "raise":
                raise FloatingPointError("LoFT: a gradient holds NaN or Inf; the step was not taken")
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss
        buckets = self._buckets()
        if self.max_grad_norm is not None:
            self._clip(self.max_grad_norm, buckets)
        for group in self.param_groups:
            if group["lora_scale"] is None:
                self._adamw_group(group)
        for bucket in buckets:
            self._bucket_step(bucket)
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip all gradients by the global norm of what LoFT will use; returns that norm (before clipping).

        Per pair, the moving factor's full-space gradient norm ``‖G·P_A‖ = ‖G·Q_A‖`` (or its A-side twin; both
        when not alternating) when gradients are scaled, else the raw factor gradients' norms; plus the raw
        gradient norm of every other parameter. All raw gradients are multiplied by
        ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        return self._clip(max_norm, self._buckets())

    def moving_sides(self, group: dict[str, Any]) -> tuple[int, ...]:
        """The factors of a pair group the next step moves: 0 = B, 1 = A (both when not alternating)."""
        state_B = self.state[group["params"][0]]
        return _moving(group["alternating"], int(state_B["phase"]) if state_B else 0)

    def full_space_moments(self, group: dict[str, Any], states: tuple[dict[str, Any], dict[str, Any]] | None = None,
                           out: tuple[Tensor, Tensor] | None = None) -> FullSpaceMoments | None:
        """The moments of the factor that moved at the last step, in the weight's space (m×n each): ``M = m_B·E_Bᵀ``
        and ``V`` for a B-step (B when both moved), their A-side twins for an A-step; None before the first step.
        The basis spans what that factor could express, the partner's supported subspace. ``states``: the
        pair's (B's, A's) state, default this optimizer's own; an FSDP2-sharded pair's must be given gathered
        whole (plain tensors: :mod:`loft_probe.probe.gather` does so), not its shards. ``out``: two contiguous
        m×n tensors of the state's dtype to write M and V into (default: new memory)."""
        B, A = group["params"]
        state_B, state_A = states if states is not None else (self.state.get(B, {}), self.state.get(A, {}))
        if (states is None and SH.is_dtensor(B)) or any(
                SH.is_dtensor(value) for state in (state_B, state_A) for value in state.values()):
            raise ValueError("full_space_moments needs a whole pair's state; this one is sharded (FSDP2): pass its "
                             "state gathered whole (states=...)")
        if "frame" not in state_B or not int(state_B["step"]):
            return None
        basis = self._basis(group, B)
        B_moved = not group["alternating"] or int(state_B["phase"]) == 1  # the phase flipped after the step
        state = state_B if B_moved else state_A
        m = state["exp_avg"] if B_moved else state["exp_avg"].T  # (k, r)
        frame = state["frame"]  # (l, r)
        first, second = out or (m.new_empty(B.shape[0], A.shape[1]), m.new_empty(B.shape[0], A.shape[1]))
        # the formula is B's (k×l); an A-step's moments are its transposes: written through transposed views,
        # both sides come out in the weight's own m×n layout (metrics over mixed layouts run 8× slower)
        F.reconstruct_moments(m, state["exp_avg_sq"], frame, basis, out=(first, second) if B_moved else
                              (first.T, second.T))
        # the projected update's frame is already orthonormal; the factor-space ablation's is the raw partner
        orthonormal = frame if group["projected_update"] else F.PartnerFrame(frame.T, group["partner_cutoff"]).basis
        return FullSpaceMoments(first, second, orthonormal, "B" if B_moved else "A")

    def _buckets(self) -> list[FE.Bucket]:
        """The pair groups with a gradient (a pair without gradients does not step), bucketed for this step,
        with their partners' frames as in the forward pass. The frames depend on the factors only, so
        clipping and the step share them."""
        keyed: dict[Any, list[dict[str, Any]]] = {}
        counts = self._counts() if self.foreach is not False else {}  # read once, not per pair
        buckets = []
        for group in self.param_groups:
            if group["lora_scale"] is None:
                continue
            B, A = group["params"]
            if B.grad is None and A.grad is None:
                continue
            shards = SH.pair_shards(B, A, group.get("name", "a pair group"))
            if shards is not None:  # a sharded pair steps alone: its own rows and columns, whole frames
                buckets.append(FE.bucket([group], stacked=False, shards=shards))
                continue
            keyed.setdefault(id(group) if self.foreach is False else self._stack_key(group, counts), []).append(group)
        for groups in keyed.values():
            if self.foreach or (self.foreach is None and len(groups) > 1 and _stacks_help(groups[0]["params"][0])):
                buckets.append(FE.bucket(groups, stacked=True))
            else:
                buckets += [FE.bucket([group], stacked=False) for group in groups]
        return buckets

    def _counts(self) -> dict[int, tuple[int, int]]:
        """``(step, phase)`` of every started pair, read in one go (two host reads, not two per pair)."""
        started = [g for g in self.param_groups if g["lora_scale"] is not None and self.state[g["params"][0]]]
        if not started:
            return {}
        states = [self.state[g["params"][0]] for g in started]
        steps = torch.stack([s["step"] for s in states]).tolist()
        phases = torch.stack([s["phase"] for s in states]).tolist()
        return {id(g): (int(t), int(p)) for g, t, p in zip(started, steps, phases, strict=True)}

    @staticmethod
    def _stack_key(group: dict[str, Any], counts: dict[int, tuple[int, int]]) -> tuple:
        """What pairs must share to step as one stack: shapes, dtypes, device, every hyperparameter the step
        reads, the step count (bias corrections, the ratio bound) and the moving side."""
        B, A = group["params"]
        step, phase = counts.get(id(group), (0, 0))
        moving = _moving(group["alternating"], phase)
        hyper = tuple(group[key] for key in _STEP_KEYS)
        return (B.shape, A.shape, B.dtype, A.dtype, B.device, moving, step, hyper)

    def _clip(self, max_norm: float, buckets: list[FE.Bucket]) -> Tensor:
        squares, grads = ([], []), []  # squares of whole gradients, of this rank's shards (summed over the ranks)
        scaled = {id(g) for bucket in buckets for g in bucket.groups if g["scale_gradients"]}
        for group in self.param_groups:
            group_grads = [p.grad for p in group["params"] if p.grad is not None]
            grads += group_grads
            if id(group) not in scaled:
                for g in group_grads:
                    squares[SH.is_dtensor(g)].append(_precise(SH.local(g).detach()).pow(2).sum())
        for bucket in buckets:
            group = bucket.groups[0]
            if not group["scale_gradients"]:
                continue
            gB, gA = FE.bucket_gradients(bucket)
            for i in self.moving_sides(group):
                grad = (gB, gA.mT)[i]
                # in an orthonormal frame ‖G·P‖ is the norm of G's coordinates: no m×n matrix needed
                coordinates = bucket.frames[i].coordinates(grad / group["lora_scale"])
                squares[bucket.shards is not None].append(_precise(coordinates).pow(2).sum(dim=(-2, -1)).reshape(-1))
        if not grads:
            return torch.tensor(0.0)
        device = SH.local(grads[0]).device
        # float64 sums: a float64 model's norm is exact to its roundoff however the pairs are bucketed
        whole, shard = (torch.cat([s.reshape(-1).to(device, torch.float64) for s in part]).sum() if part
                        else torch.zeros((), dtype=torch.float64, device=device) for part in squares)
        total = (whole + SH.all_sum_(shard, SH.mesh_of(grads))).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        copies = [g for bucket in buckets if bucket.grads is not None for g in bucket.grads]
        for g in [*map(SH.local, grads), *copies]:
            g.mul_(coef.to(g.device, g.dtype))
        return total.float()  # the dtype torch.nn.utils.clip_grad_norm_ gives float32 gradients

    def _gradients_finite(self) -> bool:
        """Rejects sparse gradients; then one check (one device sync) that every gradient is finite."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LoFT does not support sparse gradients; use dense gradients (e.g. "
                               "nn.Embedding(sparse=False))")
        by_device: dict[torch.device, list[Tensor]] = {}  # a model may span several devices
        for g in map(SH.local, grads):
            if g.numel():  # a rank's shard may be empty (fewer rows than ranks); its infinity norm is undefined
                by_device.setdefault(g.device, []).append(g)
        # the largest magnitude is NaN or Inf exactly when some entry is: one multi-tensor reduction per device
        finite = all(bool(torch.stack([m.float() for m in torch._foreach_norm(gs, float("inf"))]).isfinite().all())
                     for gs in by_device.values())
        # a shard's NaN is seen by its own rank only: every rank skips, or none (FSDP2 would hang otherwise)
        return SH.agree(finite, SH.mesh_of(grads))

    # ---------------------------------------------------------------- AdamW for every other parameter
    def _adamw_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=compute_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=compute_dtype(p))
        # DTensors (FSDP2) step shard by shard: AdamW is elementwise, and its state is sharded like the parameter
        states = [_local_state(self.state[p]) for p in params]
        grads = [SH.local(p.grad) for p in params]
        params = [SH.local(p.detach()) for p in params]
        if params and (self.foreach or (self.foreach is None and _stacks_help(params[0]))):
            computed = [p.to(compute_dtype(p)) for p in params]  # the parameters unless low-precision
            FE.adamw_foreach_(computed, [g.to(c.dtype) for g, c in zip(grads, computed, strict=True)],
                              states, group["lr"], group["betas"], group["eps"], group["weight_decay"])
            low = [(p, c) for p, c in zip(params, computed, strict=True) if p.dtype != c.dtype]
            if low:
                torch._foreach_copy_([p for p, _ in low], [c for _, c in low])
            return
        for p, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            param = p.to(compute_dtype(p))  # the parameter itself unless it is low-precision
            F.adamw_update_(param, grad.to(param.dtype), state["exp_avg"], state["exp_avg_sq"],
                            int(state["step"]), group["lr"], beta1, beta2, group["eps"],
                            group["weight_decay"])
            if param.dtype != p.dtype:
                p.copy_(param)

    # ---------------------------------------------------------------- LoFT for LoRA pairs
    def _bucket_step(self, bucket: FE.Bucket) -> None:
        """One step of every pair of a bucket: gather states (stacked for a stack), :func:`FE.pair_step_`,
        write back what moved, advance ``step`` and flip ``phase``."""
        group, in_factor_space = bucket.groups[0], not bucket.groups[0]["projected_update"]
        first_frames = [frame.matrix(in_factor_space) for frame in bucket.frames]  # (P?, l, r) each
        states_B, states_A = [], []
        for j, g in enumerate(bucket.groups):
            own = [f[j] for f in first_frames] if bucket.stacked else first_frames
            state_B, state_A = self._pair_state(g, own, bucket.shards)
            states_B.append(state_B)
            states_A.append(state_A)
        moving = self.moving_sides(group)
        step = int(states_B[0]["step"]) + 1
        basis = self._basis(group, group["params"][0])
        B, A = bucket.factors
        gB, gA = FE.bucket_gradients(bucket)
        if bucket.stacked:
            stacked_B, stacked_A = FE.stack_states(states_B), FE.stack_states(states_A)
            sides = FE.sides_of(B, A, gB, gA, stacked_B, stacked_A)
            FE.pair_step_(sides, bucket.frames, moving, step, group, basis, FE.stack_block_elements(B.device))
            FE.unstack_states_(states_B, stacked_B)
            FE.unstack_states_(states_A, stacked_A)
            for i in moving:
                torch._foreach_copy_([g["params"][i] for g in bucket.groups], list(bucket.factors[i].unbind(0)))
        elif bucket.shards is not None:  # this rank's rows and columns, states as local views of their shards
            sides = FE.sides_of(B, A, gB, gA, _local_state(states_B[0]), _local_state(states_A[0]))
            FE.pair_step_(sides, bucket.frames, moving, step, group, basis, shards=bucket.shards)
            B_param, A_param = group["params"]
            if 0 in moving and B_param.dtype != B.dtype:  # a low-precision B, stepped in float32
                SH.local(B_param).copy_(B)
            if 1 in moving:
                SH.write_columns_(A_param, A, bucket.shards)
        else:
            FE.pair_step_(FE.sides_of(B, A, gB, gA, states_B[0], states_A[0]), bucket.frames, moving, step,
                          group, basis)
            for param, factor in zip(group["params"], bucket.factors, strict=True):
                if param.dtype != factor.dtype:  # low-precision factor: computed in float32, stored back
                    param.copy_(factor)
        steps, phases = [s["step"] for s in states_B], [s["phase"] for s in states_B]
        torch._foreach_add_(steps, 1)
        torch._foreach_mul_(phases, -1)  # phase ← 1 − phase
        torch._foreach_add_(phases, 1)

    def _pair_state(self, group: dict[str, Any], frames: list[Tensor],
                    shards: SH.PairShards | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The pair's states, created at its first step with the frames ``frames`` (E_B (n, r), E_A (m, r));
        for a sharded pair, DTensors of which this rank holds its rows (B-side, E_A) and columns (A-side, E_B) of W."""
        B, A = group["params"]
        state_B, state_A = self.state[B], self.state[A]
        if not state_B:
            dtype, width = compute_dtype(B), self._basis(group, B).width
            (m, r), n = B.shape, A.shape[1]
            rows, cols = (slice(None), slice(None)) if shards is None else (shards.rows, shards.cols)

            def zeros(shape: tuple[int, int], dim: int, part: slice) -> Tensor:
                """A state of global ``shape``, of which a sharded pair's rank holds ``part`` along ``dim``."""
                if shards is None:
                    return B.new_zeros(shape, dtype=dtype)
                return SH.sharded_zeros(shape, dim, part, shards.mesh, SH.local(B).new_empty((), dtype=dtype))

            state_B["step"] = torch.tensor(0.0)
            state_B["phase"] = torch.tensor(0.0)
            state_B["exp_avg"] = zeros((m, r), 0, rows)
            state_B["exp_avg_sq"] = zeros((m, width), 0, rows)
            state_B["frame"] = zeros((n, r), 0, cols)
            state_A["exp_avg"] = zeros((r, n), 1, cols)
            state_A["exp_avg_sq"] = zeros((n, width), 0, cols)
            state_A["frame"] = zeros((m, r), 0, rows)
            SH.local(state_B["frame"]).copy_(frames[0][cols])
            SH.local(state_A["frame"]).copy_(frames[1][rows])
        return state_B, state_A

    def _basis(self, group: dict[str, Any], B: Tensor) -> F.SecondMomentBasis:
        key = (B.shape[1], group["second_moment"], B.device)
        if key not in self._bases:
            self._bases[key] = F.SecondMomentBasis(B.shape[1], group["second_moment"] == "full", B.device)
        return self._bases[key]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that state keeps the dtype it was saved in: torch would cast it to the
        parameter's dtype, and LoFT keeps bf16/fp16 factors' state in float32 and ``step``/``phase`` on the CPU.
        A state of format 1 (raw factor coordinates, before loft_probe 0.2) is refused."""
        if any("prev_partner" in saved for saved in state_dict["state"].values()):
            raise ValueError("this LoFT state_dict has format 1 (moments in raw factor coordinates, "
                             "loft_probe < 0.2); format 2 keeps them in orthonormal frames: restart the "
                             "optimizer state, or resume with loft_probe 0.1")
        super().load_state_dict(state_dict)
        # saved keys as torch maps them: by position in the groups (indices, or FQNs from torch.distributed.checkpoint)
        params = dict(zip((key for group in state_dict["param_groups"] for key in group["params"]),
                          (p for group in self.param_groups for p in group["params"]), strict=True))
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if torch.is_tensor(value):
                    device = "cpu" if key in ("step", "phase") else params[index].device
                    self.state[params[index]][key] = value.to(device=device, copy=True)


def _local_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state with every DTensor replaced by its local shard (aliases: in-place updates reach the state)."""
    return {key: SH.local(value) for key, value in state.items()}


def _stacks_help(p: Tensor) -> bool:
    """``foreach=None``: stack on accelerators, where every operator is a kernel launch; not on the CPU."""
    return p.device.type != "cpu"


def _moving(alternating: bool, phase: int) -> tuple[int, ...]:
    """The sides the next step moves (0 = B, 1 = A): the phase's side, or both when not alternating."""
    return (phase,) if alternating else (0, 1)


def _precise(x: Tensor) -> Tensor:
    """x in float32 at least (half-precision squares overflow), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                           second_moment: str, projected_update: bool, partner_cutoff: float,
                           max_grad_norm: float | None) -> None:
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}")
    if not projected_update and second_moment == "full":
        raise ValueError("projected_update=False needs second_moment='simple': full r×r second moments "
                         "have no elementwise direction in factor coordinates")
    if not 0 <= partner_cutoff < 1:
        raise ValueError(f"partner_cutoff must be in [0, 1), got {partner_cutoff}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")


def is_sharded(tensor: Tensor) -> bool:
    """True for FSDP-sharded parameters: DTensors (FSDP2, tensor parallel) and FSDP1's flat parameters (what the
    probe refuses; LoFT steps FSDP2's, see :mod:`loft_probe.optim.sharding`)."""
    return type(tensor).__name__ in ("DTensor", "FlatParameter") or hasattr(tensor, "_is_flat_param")


def _check_group(group: dict[str, Any]) -> None:
    _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                           group["second_moment"], group["projected_update"], group["partner_cutoff"], None)
    SH.check_sharded(group["params"], group.get("name", "a parameter group"))
    if group["lora_scale"] is None:
        return
    params = group["params"]
    name = group.get("name", "a pair group")
    if any(hasattr(p, "_is_flat_param") or hasattr(p, "ds_id") for p in params):
        raise ValueError(f"{name}: LoFT supports one process, DDP and FSDP2 (fully_shard) LoRA factors; FSDP1 flat "
                         "and DeepSpeed ZeRO partitioned parameters are not supported")
    if len(params) != 2:
        raise ValueError(f"{name}: a pair group holds exactly [B, A], got {len(params)} parameters")
    B, A = params
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"{name}: pair group needs B (m×r) and A (r×n), got shapes "
                         f"{tuple(B.shape)} and {tuple(A.shape)}")
    if not group["lora_scale"] > 0:
        raise ValueError(f"{name}: lora_scale must be > 0, got {group['lora_scale']}")
    SH.pair_shards(B, A, name)  # refuses an FSDP2 layout LoFT cannot step
