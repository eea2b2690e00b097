"""Fréchet distance and KID between two feature sets, in numpy (feature extraction happens elsewhere).

Fréchet distance between Gaussians N(μ1, Σ1) and N(μ2, Σ2) fitted to the features:

  FD = ‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1^½ Σ2 Σ1^½)^½)

The last trace is computed from the eigenvalues of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (Σ1^½ by a symmetric
eigendecomposition), which avoids the complex round-off of a general `sqrtm(Σ1 Σ2)`.

KID (Bińkowski et al. 2018): the unbiased MMD² estimate with the cubic polynomial kernel
k(x, y) = (x·y / d + 1)³, averaged over random subsets (as torch-fidelity / clean-fid do).
"""
from __future__ import annotations

import numpy as np


def _features(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be (n, d), got shape {x.shape}")
  return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean (d,), covariance (d, d)) of (n, d) features, covariance with the n − 1 denominator."""
  x = _features(features)
  if len(x) < 2:
    raise ValueError("need at least two feature vectors for a covariance")
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """Tr((Σ1^½ Σ2 Σ1^½)^½) = Tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2."""
  s1 = _sqrt_psd(np.asarray(sigma1, np.float64))
  inner = s1 @ np.asarray(sigma2, np.float64) @ s1
  w = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
  return float(max(fd, 0.0))


def frechet_distance_features(features1, features2) -> float:
  """FD between Gaussians fitted to two (n, d) feature sets (FID when the features are Inception pool3)."""
  return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def polynomial_kernel(x, y) -> np.ndarray:
  """k(x, y) = (x·y / d + 1)³ for all pairs of rows: (n, d), (m, d) -> (n, m)."""
  x, y = _features(x), _features(y)
  k = x @ y.T / x.shape[1] + 1.0
  return k * k * k


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD² estimate with the cubic polynomial kernel (diagonals of k(x, x), k(y, y) excluded)."""
  x, y = _features(x), _features(y)
  n, m = len(x), len(y)
  if n < 2 or m < 2:
    raise ValueError("need at least two samples in each set")
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())


def kernel_inception_distance(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """(mean, std) of `mmd2_unbiased` over `num_subsets` random subsets of `subset_size` from each set.

  When both sets have at most `subset_size` rows the full sets are used once (std 0).
  """
  x, y = _features(features1), _features(features2)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
  if len(x) <= subset_size and len(y) <= subset_size:
    return mmd2_unbiased(x, y), 0.0
  size = min(subset_size, len(x), len(y))
  rng = np.random.default_rng(seed)
  vals = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
          for _ in range(num_subsets)]
  return float(np.mean(vals)), float(np.std(vals))
