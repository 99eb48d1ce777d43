"""LoFT on FSDP2 (``fully_shard``): which rows and columns of W a rank owns, and the few collectives a step needs.

LoFT's m×n work separates (functional's docstring): the B-side's reconstruction ``M = m_B·E_Bᵀ`` row by row of W,
the A-side's column by column. A rank steps the rows of W it holds of B (m×r, FSDP2's ``Shard(0)``) and a block
of W's columns of A (r×n), and holds the state of those rows and columns only. What crosses ranks per pair and
step: both factors, gathered whole ((m+n)·r numbers) so that every rank computes the partners' frames from the
same numbers as one process would (an SVD, not an eigen-decomposition of a reduced Gram matrix: see
:class:`~loft_probe.optim.functional.PartnerFrame`); one r×r sum per moving factor (transport against a frame
each rank holds a block of); per step, one flag (a non-finite gradient anywhere skips the step everywhere) and one
squared norm (the clip). Never an m×n matrix.

A's layout. FSDP2's default shards A on its r rows, which splits no column of W. Two layouts step:

- ``Shard(1)``, A on its columns (:func:`lora_shard_placement`, the recommended one): A's local block is this
  rank's columns, FSDP2's reduce-scatter delivers its gradient there, and the A-side steps in place: the
  exchange is the gathers above, nothing more.
- ``Shard(0)``, FSDP2's default, which FSDP2 also imposes when n does not divide by the world size (it refuses
  uneven sharding on dims other than 0): A's columns are cut from the gathered A, but its gradient is
  redistributed to columns at every step and, when A moves, its new columns back to rows: r·n numbers each
  (an all-to-all on NCCL; on gloo DTensor falls back to an all-gather, having no CPU all-to-all).

Measured by ``benchmarks/bench_fsdp.py`` (4096×4096, r = 16, float32, 2 ranks; logical sizes of all collectives):
a step exchanges 0.50 of 2·(m+n)·r·4 bytes with A on columns, 0.75 (B-steps) and 1.00 (A-steps) with A on rows.

Supported: 1-D meshes (FSDP2 over one dimension), B on ``Shard(0)``; every other placement is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # imported where a DTensor is made or read: the import costs 0.75 s, FSDP2 runs alone need it
    from torch.distributed.tensor import DeviceMesh, DTensor, Shard


class PairShards(NamedTuple):
    """How one FSDP2-sharded pair (B m×r, A r×n) lies on this rank."""

    mesh: DeviceMesh  # the 1-D mesh both factors are sharded over
    rows: slice  # of m: this rank's rows of W, of B and of the B-side state; the rows of E_A (m×r) it holds
    cols: slice  # of n: this rank's columns of W, of A's column block and of the A-side state; rows of E_B (n×r)
    a_on_columns: bool  # A is Shard(1): its local block is the column block (else Shard(0): redistributed)

    def frame_rows(self, side: int) -> slice:
        """The rows of side ``side``'s stored frame this rank holds: E_B (n×r) runs over W's columns, E_A (m×r)
        over its rows."""
        return (self.cols, self.rows)[side]

    def total(self, x: Tensor) -> Tensor:
        """``x`` summed over the pair's ranks, in place (partial r×r products)."""
        return all_sum_(x, self.mesh)


def is_dtensor(t: object) -> bool:
    """True for a DTensor, told without importing torch.distributed.tensor: no DTensor exists before that module
    is loaded (importing any part of it loads it)."""
    api = sys.modules.get("torch.distributed.tensor")
    return api is not None and isinstance(t, api.DTensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: in-place writes reach the DTensor); any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def whole(t: Tensor) -> Tensor:
    """A DTensor gathered whole (one all-gather: every rank of its mesh must call it); any other tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def lora_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], Shard | None]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every LoRA A (r×n) on its columns where n divides
    by the world size (FSDP2 refuses uneven sharding on dim 1), and leaves every other parameter to FSDP2's
    default ``Shard(0)``. For FSDP2's default mesh (the whole default process group). Call it on the model before
    sharding it::

        placement = lora_shard_placement(model)
        for layer in model.layers:
            fully_shard(layer, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
    """
    from torch.distributed.tensor import Shard

    from loft_probe.lora import lora_pairs

    a_factors = {id(pair.A) for pair in lora_pairs(model)}
    world = dist.get_world_size()

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in a_factors and param.shape[1] % world == 0 else None

    return placement


def check_sharded(params: list[Tensor], name: str) -> None:
    """``ValueError`` (one line) for a DTensor LoFT cannot step: each rank must hold its own part of it (one
    ``Shard`` on a 1-D mesh), since the clip norm and the non-finite flag are summed over the ranks."""
    for p in params:
        if is_dtensor(p) and (p.device_mesh.ndim != 1 or not p.placements[0].is_shard()):
            raise ValueError(f"{name}: LoFT steps DTensors sharded by FSDP2 on a 1-D mesh (one Shard placement); got "
                             f"{p.placements} on a mesh of {p.device_mesh.ndim} dims")


def pair_shards(B: Tensor, A: Tensor, name: str) -> PairShards | None:
    """The layout of a pair sharded by FSDP2; None for a pair of plain tensors. ``ValueError`` (one line, what
    is supported) for any other layout."""
    sharded = [is_dtensor(t) for t in (B, A)]
    if not any(sharded):
        return None
    from torch.distributed.tensor import Shard

    supported = "LoFT steps FSDP2 pairs on a 1-D mesh with B on Shard(0) and A on Shard(0) or Shard(1)"
    if not all(sharded) or B.device_mesh != A.device_mesh or B.device_mesh.ndim != 1:
        raise ValueError(f"{name}: {supported}; got B and A on different meshes or on a mesh of several dims")
    if B.placements != (Shard(0),) or A.placements not in ((Shard(0),), (Shard(1),)):
        raise ValueError(f"{name}: {supported}; got B on {B.placements} and A on {A.placements}")
    mesh = B.device_mesh
    shards = PairShards(mesh, chunk(B.shape[0], mesh), chunk(A.shape[1], mesh), A.placements == (Shard(1),))
    r_rows = chunk(A.shape[0], mesh)
    expected = {"B": (_length(shards.rows), B.shape[1]),
                "A": (A.shape[0], _length(shards.cols)) if shards.a_on_columns else (_length(r_rows), A.shape[1])}
    for factor, t in (("B", B), ("A", A)):
        # DTensor's chunking is torch.chunk's, as :func:`chunk` assumes: this guards against a change
        if tuple(local(t).shape) != expected[factor]:
            raise ValueError(f"{name}: {factor}'s local shard has shape {tuple(local(t).shape)}, "
                             f"expected {expected[factor]}")
    return shards


def _length(part: slice) -> int:
    return part.stop - part.start


def chunk(size: int, mesh: DeviceMesh) -> slice:
    """This rank's part of ``range(size)`` under ``Shard``: torch.chunk's split (ceil-sized, the last ones short
    or empty)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    step = -(-size // world)
    start = min(rank * step, size)
    return slice(start, min(start + step, size))


def column_block(A: Tensor, full_A: Tensor, shards: PairShards, dtype: torch.dtype) -> Tensor:
    """A's column block (r, n_local) in ``dtype``: the local shard itself under Shard(1) (stepped in place),
    else a copy cut from the gathered ``full_A`` (written back by :func:`write_columns_`)."""
    if shards.a_on_columns:
        return local(A).to(dtype)
    return full_A[:, shards.cols].to(dtype, copy=True)


def gradient_columns(grad: Tensor, shards: PairShards) -> Tensor:
    """A's gradient on this rank's columns (r, n_local): FSDP2 reduce-scatters it to A's own placement."""
    if shards.a_on_columns:
        return local(grad)
    from torch.distributed.tensor import Shard

    return local(grad.redistribute(placements=[Shard(1)]))


def write_columns_(A: Tensor, block: Tensor, shards: PairShards) -> None:
    """Store A's stepped column block (r, n_local) into the parameter, whichever its placement."""
    if shards.a_on_columns:
        if block.dtype != A.dtype:  # a low-precision A, stepped in float32
            local(A).copy_(block)
        return
    from torch.distributed.tensor import DTensor, Shard

    columns = DTensor.from_local(block.to(A.dtype), shards.mesh, [Shard(1)], shape=A.shape, stride=A.stride())
    local(A).copy_(local(columns.redistribute(placements=[Shard(0)])))


def sharded_zeros(shape: tuple[int, int], dim: int, part: slice, mesh: DeviceMesh, like: Tensor) -> DTensor:
    """A zero DTensor of global ``shape`` sharded on ``dim`` (this rank's ``part`` of it), dtype/device of ``like``
    (a plain tensor): the state of a rank's own rows or columns, a DTensor so that ``state_dict`` and DCP see its
    global shape."""
    from torch.distributed.tensor import DTensor, Shard

    local_shape = list(shape)
    local_shape[dim] = _length(part)
    zeros = like.new_zeros(local_shape)
    stride = (shape[1], 1)
    return DTensor.from_local(zeros, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride)


def mesh_of(tensors: list[Tensor]) -> DeviceMesh | None:
    """The mesh of the DTensors among ``tensors`` (None if there are none); ``ValueError`` for several."""
    # each fully_shard call builds its own mesh object: equal meshes count once
    meshes = {t.device_mesh: None for t in tensors if is_dtensor(t)}
    if len(meshes) > 1:
        raise ValueError(f"LoFT steps DTensor parameters on one device mesh, got {len(meshes)} meshes")
    return next(iter(meshes), None)


def all_sum_(x: Tensor, mesh: DeviceMesh | None) -> Tensor:
    """``x`` summed over the ranks of ``mesh``, in place (one all-reduce); ``x`` itself without a mesh."""
    if mesh is not None:
        dist.all_reduce(x, group=mesh.get_group())
    return x


def agree(ok: bool, mesh: DeviceMesh | None) -> bool:
    """True when ``ok`` holds on every rank of ``mesh`` (one all-reduce); ``ok`` itself without a mesh."""
    if mesh is None:
        return ok
    return not all_sum_(torch.tensor([0.0 if ok else 1.0], device=mesh.device_type), mesh).item()
