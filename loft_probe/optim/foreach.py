"""One LoFT step for one pair or for a stack of pairs of one shape (the multi-tensor step), and foreach AdamW.

A model has hundreds of LoRA pairs but only a handful of shapes. Pairs with the same shapes, dtype,
hyperparameters, step count and moving side go through :func:`pair_step_` *together*: their factors,
gradients and states are stacked to (P, ·, ·) tensors, so each of the step's ~30 small r×r operations
(SVDs, solves, transport, features) is one batched call instead of P, and the m×n reconstruction runs as
batched multiplies over blocks of whole pairs (of rows, when one pair exceeds a block). Every function of
:mod:`loft_probe.optim.functional` accepts such leading batch dimensions, so this file holds the step once:
called with 2-D tensors it is the per-pair step (the readable reference), with 3-D ones the batched step.
The per-pair state in ``optimizer.state`` keeps its format: stacks are gathered before and written back after.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from loft_probe.optim import functional as F
from loft_probe.optim import sharding as SH

# Numbers per reconstruction block of a stack (rows × pairs × l), per device type. Each block costs ~8 operator
# calls. On an accelerator every call is a kernel launch: large blocks (2²⁴ numbers, 64 MiB in float32, two
# buffers) bring a stack of 144 small layers down to a handful of launches. On the CPU a call costs microseconds
# but memory traffic dominates: functional's cache-sized block measured fastest (benchmarks/bench_loft_model.py).
STACK_BLOCK_ELEMENTS = {"cpu": F.BLOCK_ELEMENTS, "accelerator": 1 << 24}


def stack_block_elements(device: torch.device) -> int:
    return STACK_BLOCK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"]


class Side(NamedTuple):
    """One factor of a pair seen as the left factor L (k×r) of ``s·L·R``; see functional's docstring.
    With a leading stack dimension P every field is (P, ·, ·)."""

    factor: Tensor  # (k, r) compute-dtype view of the parameter (B, or Aᵀ)
    grad: Tensor  # (k, r)
    exp_avg: Tensor  # (k, r)
    exp_avg_sq: Tensor  # (k, T)
    frame: Tensor  # (l, r) the frame the moments are written against


def pair_step_(sides: tuple[Side, Side], frames: tuple[F.PartnerFrame, F.PartnerFrame], moving: tuple[int, ...],
               step: int, group: dict[str, Any], basis: F.SecondMomentBasis,
               block_elements: int = F.BLOCK_ELEMENTS, shards: SH.PairShards | None = None) -> None:
    """One LoFT step (spec steps 1–5), in place on the factors and states of ``sides`` (B-side, A-side).

    ``frames``: the partners' frames as in the forward pass (frame of A for the B-side, of Bᵀ for the A-side);
    ``moving``: the sides that move (0 = B, 1 = A); ``step``: t after the increment; ``group``: the pair group
    (its hyperparameters and switches, shared by every pair of a stack). ``shards``: for an FSDP2-sharded pair,
    ``sides`` hold this rank's rows of each side (factor, gradient, moments, and its rows of the stored frame)
    while ``frames`` are whole: every step below is row by row, except the transport's r×r overlap, summed.
    """
    beta1, beta2 = group["betas"]
    scale = group["lora_scale"]
    in_factor_space = not group["projected_update"]

    # Phase one: update both factors' states with the factors of the forward pass (spec step 4).
    # Only a factor about to move has a partner that changed since its state was last written: for the
    # other, the frame is unchanged (a frame is a deterministic function of its partner) and C = I.
    for i, (side, frame) in enumerate(zip(sides, frames, strict=True)):
        h = F.gradient_coordinates(side.grad, scale, frame, group["scale_gradients"], in_factor_space)
        if i in moving:
            rows = slice(None) if shards is None else shards.frame_rows(i)
            if group["transport"]:
                C = F.transport_matrix(side.frame, frame, in_factor_space, rows,
                                       None if shards is None else shards.total)  # (r, r)
                side.exp_avg.copy_(side.exp_avg @ C)
                basis.transport_(side.exp_avg_sq, C)
            side.frame.copy_(frame.matrix(in_factor_space)[..., rows, :])
        side.exp_avg.lerp_(h, 1 - beta1)
        side.exp_avg_sq.mul_(beta2).add_(basis.features(h), alpha=1 - beta2)

    # Phase two: compute the moving factors' projected steps (they read the partners), then move.
    lr, weight_decay = group["lr"], group["weight_decay"]
    steps = {}
    if group["projected_update"]:
        # |M̂| ≤ K(t)·sqrt(V̂) for the full second moment; its diagonal ("simple") only gives sqrt(r)·K(t)
        rank = sides[0].factor.shape[-1]
        max_ratio = F.adam_ratio_bound(step, group["betas"]) * (1 if basis.full else rank**0.5)
        for i in moving:
            side, frame = sides[i], frames[i]
            # the whole frame (l, r): what the stored one holds rows of, since this step's transport
            direction = F.projected_direction(side.exp_avg, side.exp_avg_sq, frame.matrix(in_factor_space), basis,
                                              step, group["betas"], group["eps"], max_ratio, block_elements)  # D·Q
            steps[i] = frame.to_factor(direction).mul_(lr / (1 - beta1**step) / scale)  # D·R⁺, (k, r)
    for i in moving:
        side = sides[i]
        if group["projected_update"]:
            side.factor.mul_(1 - lr * weight_decay).sub_(steps[i])
        else:  # Adam in factor coordinates (elementwise second moment)
            F.adamw_move_(side.factor, side.exp_avg, side.exp_avg_sq, step, lr, beta1, beta2, group["eps"],
                          weight_decay)


def sides_of(B: Tensor, A: Tensor, gB: Tensor, gA: Tensor, state_B: dict[str, Tensor],
             state_A: dict[str, Tensor]) -> tuple[Side, Side]:
    """The B-side (L = B, R = A) and the A-side (L = Aᵀ, R = Bᵀ) of a pair, or of a stack of pairs:
    B (m×r), A (r×n) and their gradients in the compute dtype; states as stored (A's moments r×n)."""
    b_side = Side(B, gB, state_B["exp_avg"], state_B["exp_avg_sq"], state_B["frame"])
    a_side = Side(A.mT, gA.mT, state_A["exp_avg"].mT, state_A["exp_avg_sq"], state_A["frame"])
    return b_side, a_side


class Bucket(NamedTuple):
    """Pair groups that step together: one group (2-D tensors), or a stack of P groups ((P, ·, ·) tensors)."""

    groups: list[dict[str, Any]]
    factors: tuple[Tensor, Tensor]  # B (m, r) and A (r, n) in the compute dtype: the parameters themselves
    # for one float32/64 pair, stacked copies for a stack
    frames: tuple[F.PartnerFrame, F.PartnerFrame]  # of A (for the B-side) and of Bᵀ (for the A-side)
    stacked: bool
    shards: SH.PairShards | None = None  # an FSDP2-sharded pair: factors are this rank's rows of B, columns of A
    grads: tuple[Tensor, Tensor] | None = None  # a sharded pair's gradients on those rows and columns, copies
    # fetched once (A's may cross ranks) and scaled by the clip along with the parameters' own


def bucket(groups: list[dict[str, Any]], stacked: bool, shards: SH.PairShards | None = None) -> Bucket:
    """The bucket of ``groups`` (one group unless ``stacked``) with its partners' frames as in the forward pass.
    A sharded pair (one group, ``shards``) gathers both factors whole for the frames and keeps its own part."""
    dtype, cutoff = compute_dtype(groups[0]["params"][0]), groups[0]["partner_cutoff"]
    if stacked:
        B, A = (torch.stack([g["params"][i] for g in groups]).to(dtype) for i in (0, 1))  # (P, ·, ·), under no_grad
    elif shards is not None:
        whole_B, whole_A = (p.full_tensor().to(dtype) for p in groups[0]["params"])  # (m, r), (r, n)
        B = SH.local(groups[0]["params"][0]).to(dtype)  # (m_local, r)
        A = SH.column_block(groups[0]["params"][1], whole_A, shards, dtype)  # (r, n_local)
        frames = (F.PartnerFrame(whole_A, cutoff), F.PartnerFrame(whole_B.mT, cutoff))
        grad_B, grad_A = (_grad(p) for p in groups[0]["params"])
        grads = (SH.local(grad_B).to(dtype, copy=True), SH.gradient_columns(grad_A, shards).to(dtype, copy=True))
        return Bucket(groups, (B, A), frames, stacked, shards, grads)
    else:
        B, A = (p.detach().to(dtype) for p in groups[0]["params"])
    return Bucket(groups, (B, A), (F.PartnerFrame(A, cutoff), F.PartnerFrame(B.mT, cutoff)), stacked)


def bucket_gradients(bucket: Bucket) -> tuple[Tensor, Tensor]:
    """``(g_B, g_A)`` of a bucket in the compute dtype, stacked for a stack. A missing gradient reads as zero
    (a factor that did not take part in the loss). Read after clipping: a stack's are copies (a sharded pair's
    are fetched with the bucket, and the clip scales them)."""
    dtype = bucket.factors[0].dtype
    if bucket.grads is not None:
        return bucket.grads
    if not bucket.stacked:
        return tuple(_grad(p).to(dtype) for p in bucket.groups[0]["params"])
    return tuple(torch.stack([_grad(g["params"][i]) for g in bucket.groups]).to(dtype) for i in (0, 1))


def _grad(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def compute_dtype(p: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 parameters (LoFT's solves need it), the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


STATE_KEYS = ("exp_avg", "exp_avg_sq", "frame")


def stack_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The per-pair states of one side stacked: key → (P, ·, ·)."""
    return {key: torch.stack([state[key] for state in states]) for key in STATE_KEYS}


def unstack_states_(states: list[dict[str, Tensor]], stacked: dict[str, Tensor]) -> None:
    """Write stacked states back into the per-pair tensors (their format and identity unchanged)."""
    for key in STATE_KEYS:
        torch._foreach_copy_([state[key] for state in states], list(stacked[key].unbind(0)))


def adamw_foreach_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], lr: float,
                   betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """torch's multi-tensor AdamW (``torch.optim.adamw.adamw(foreach=True)``) on parameters of one group,
    states with ``step``, ``exp_avg``, ``exp_avg_sq``; ``params``/``grads`` in the states' (compute) dtype."""
    from torch.optim.adamw import adamw

    adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
          [s["step"] for s in states], foreach=True, amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr,
          weight_decay=weight_decay, eps=eps, maximize=False)
