"""Alignment metrics: pure functions on torch tensors (definitions in docs/metrics-spec.md).

- `lowrank`: orthonormal bases, exact thin SVD of s·B·A from its factors.
- `subspace`: principal angles, Grassmann and projection distances, the φ similarity grid.
- `expressibility`: how much of the full gradient the adapter's subspaces can express.
- `alignment`: cosines, relative norms and errors, low-rank inner products.
- `spectra`: r90, stable rank, relative size, amplification, intruder dimensions.
"""

from loft_probe.metrics._common import ratio
from loft_probe.metrics.alignment import (
    cosine,
    lowrank_inner,
    lowrank_norm,
    lowrank_update,
    preconditioned_cosine,
    preconditioned_direction,
    relative_error,
    relative_norm,
    update_cosine,
    update_lr_ratio,
)
from loft_probe.metrics.expressibility import (
    Residuals,
    projection_residuals,
    projection_residuals_from_grads,
    tangent_projection,
)
from loft_probe.metrics.lowrank import SVD, LowRank, lowrank_svd, orth, orth_coords, top_singular
from loft_probe.metrics.spectra import (
    amplification,
    intruder_counts,
    intruder_dimensions,
    intruder_scores,
    intruder_scores_lowrank,
    r90,
    relative_size,
    stable_rank,
)
from loft_probe.metrics.subspace import (
    grassmann_distance,
    principal_angles,
    projection_distance,
    subspace_similarity,
)

__all__ = [
    "SVD",
    "LowRank",
    "Residuals",
    "amplification",
    "cosine",
    "grassmann_distance",
    "intruder_counts",
    "intruder_dimensions",
    "intruder_scores",
    "intruder_scores_lowrank",
    "lowrank_inner",
    "lowrank_norm",
    "lowrank_svd",
    "lowrank_update",
    "orth",
    "orth_coords",
    "preconditioned_cosine",
    "preconditioned_direction",
    "principal_angles",
    "projection_distance",
    "projection_residuals",
    "projection_residuals_from_grads",
    "r90",
    "relative_error",
    "ratio",
    "relative_norm",
    "relative_size",
    "stable_rank",
    "update_lr_ratio",
    "subspace_similarity",
    "tangent_projection",
    "top_singular",
    "update_cosine",
]
