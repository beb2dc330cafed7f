"""Centered Kernel Alignment (Kornblith et al., ICML 2019, arXiv 1905.00414) between expert outputs.

CKA compares two representations of the same n examples through their n x n Gram matrices:
``CKA(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` with H the centering matrix. It is invariant to orthogonal
transforms and isotropic scaling of either representation, which is why DiEP uses it to say how much two experts'
outputs overlap. Working on Gram matrices (not features) lets one function serve both kernels and keeps memory at
n x n per expert, whatever the hidden size:

- ``linear``: K = X X^T (the cheap default; equals ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for centred X, Y);
- ``rbf``: K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2 * median squared distance)), sigma a fraction of the median
  distance as in the paper's reference code (``rbf_sigma``, 1.0 by default).

A representation whose centred Gram matrix is zero (a constant output, e.g. a dead expert) has no defined CKA; we
report 0 against every other expert and 1 against itself.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

CKA_KERNELS = ("linear", "rbf")


def _check_kernel(kernel: str) -> None:
    if kernel not in CKA_KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not a CKA kernel; choose one of {list(CKA_KERNELS)}")


def gram_matrix(features: torch.Tensor, kernel: str = "linear", rbf_sigma: float = 1.0) -> torch.Tensor:
    """The n x n kernel matrix of ``features`` [n, d], in float64 so that centering does not lose precision."""
    _check_kernel(kernel)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ConfigError(f"features must be [n, d] with n >= 2 examples, got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    if kernel == "linear":
        x = x - x.mean(dim=0, keepdim=True)
        return x @ x.T
    if rbf_sigma <= 0:
        raise ConfigError(f"rbf_sigma must be > 0, got {rbf_sigma}")
    dots = x @ x.T
    sq_norms = dots.diagonal()
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * dots).clamp_min(0)
    median = sq_dist.median()
    if median <= 0:  # every example identical: a constant Gram, which centres to zero below
        return torch.ones_like(sq_dist)
    return torch.exp(-sq_dist / (2 * rbf_sigma**2 * median))


def centered_gram_vector(features: torch.Tensor, kernel: str = "linear", rbf_sigma: float = 1.0) -> torch.Tensor:
    """HKH flattened and scaled to unit norm (all zeros for a constant representation): CKA is a dot product."""
    gram = gram_matrix(features, kernel, rbf_sigma)
    gram = gram - gram.mean(dim=0, keepdim=True)
    gram = gram - gram.mean(dim=1, keepdim=True)
    flat = gram.reshape(-1)
    norm = flat.norm()
    scale = flat.abs().max() if flat.numel() else flat.new_zeros(())
    if norm == 0 or norm <= 1e-12 * scale * flat.numel():
        return torch.zeros_like(flat)
    return flat / norm


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", rbf_sigma: float = 1.0) -> float:
    """CKA between two representations [n, d1] and [n, d2] of the same n examples, in [0, 1]."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"CKA needs the same examples on both sides; got {x.shape[0]} and {y.shape[0]} rows")
    return float(centered_gram_vector(x, kernel, rbf_sigma) @ centered_gram_vector(y, kernel, rbf_sigma))


def cka_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """N x N CKA from N stacked ``centered_gram_vector`` rows [N, n*n]; the diagonal is 1 (also for degenerate rows)."""
    matrix = (vectors @ vectors.T).clamp(0.0, 1.0)
    matrix.fill_diagonal_(1.0)
    return matrix


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (0 for a 1 x 1 matrix)."""
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))
