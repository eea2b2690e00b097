"""Fréchet distance and KID against closed forms computed here from the known distribution parameters."""
import itertools
import math

import numpy as np
import pytest

from nextstep_jax.eval import fid


def _rot(theta):
  return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def _fd_diagonal(mu1, var1, mu2, var2):
  """Closed form for diagonal covariances: ‖Δμ‖² + Σ (σ1 − σ2)²."""
  return float(np.sum((np.asarray(mu1) - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def _fd_2d(mu1, s1, mu2, s2):
  """Closed form in 2-D: Tr((Σ1Σ2)^½) = √(Tr(Σ1Σ2) + 2√(det Σ1 det Σ2)) (the two eigenvalues λ1, λ2 of Σ1Σ2
  satisfy (√λ1 + √λ2)² = λ1 + λ2 + 2√(λ1λ2))."""
  tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


DIAG = (np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25]), np.array([0.5, 0.0, -1.0]), np.array([2.0, 1.0, 1.0]))
S1_2D = _rot(0.3) @ np.diag([3.0, 0.5]) @ _rot(0.3).T
S2_2D = _rot(-0.9) @ np.diag([0.7, 2.0]) @ _rot(-0.9).T  # does not commute with S1_2D
MU1_2D, MU2_2D = np.array([1.0, -1.0]), np.array([0.0, 0.5])


def test_fd_exact_parameters_diagonal():
  mu1, v1, mu2, v2 = DIAG
  expected = _fd_diagonal(mu1, v1, mu2, v2)
  assert expected == pytest.approx(0.25 + 1 + 1 + (1 - 2**0.5) ** 2 + 1 + 0.25)  # by hand
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, abs=1e-10)
  assert fid.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_fd_exact_parameters_non_commuting():
  assert not np.allclose(S1_2D @ S2_2D, S2_2D @ S1_2D)
  expected = _fd_2d(MU1_2D, S1_2D, MU2_2D, S2_2D)
  got = fid.frechet_distance(MU1_2D, S1_2D, MU2_2D, S2_2D)
  assert got == pytest.approx(expected, abs=1e-9)
  assert fid.frechet_distance(MU2_2D, S2_2D, MU1_2D, S1_2D) == pytest.approx(expected, abs=1e-9)  # symmetric


def test_fd_exact_parameters_high_dim_against_scipy():
  linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(0)
  d = 12
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  covmean = linalg.sqrtm(s1 @ s2)  # the general (non-symmetric) product, a different route
  expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_fd_from_samples_diagonal():
  rng = np.random.default_rng(1)
  mu1, v1, mu2, v2 = DIAG
  n = 200_000
  x = mu1 + rng.normal(size=(n, 3)) * np.sqrt(v1)
  y = mu2 + rng.normal(size=(n, 3)) * np.sqrt(v2)
  assert fid.frechet_distance_features(x, y) == pytest.approx(_fd_diagonal(mu1, v1, mu2, v2), abs=0.03)


def test_fd_from_samples_non_diagonal():
  rng = np.random.default_rng(2)
  n = 200_000
  x = rng.multivariate_normal(MU1_2D, S1_2D, size=n)
  y = rng.multivariate_normal(MU2_2D, S2_2D, size=n)
  expected = _fd_2d(MU1_2D, S1_2D, MU2_2D, S2_2D)
  assert expected > 1.0
  assert fid.frechet_distance_features(x, y) == pytest.approx(expected, abs=0.03)
  same = rng.multivariate_normal(MU1_2D, S1_2D, size=n)
  assert fid.frechet_distance_features(x, same) < 1e-3


def test_gaussian_stats():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(500, 4))
  mu, sigma = fid.gaussian_stats(x)
  centred = x - x.mean(0)
  assert np.allclose(mu, x.sum(0) / 500) and np.allclose(sigma, centred.T @ centred / 499)
  with pytest.raises(ValueError):
    fid.gaussian_stats(x[:1])


def _kernel(a, b):
  return (float(np.dot(a, b)) / len(a) + 1.0) ** 3


def test_mmd2_unbiased_matches_brute_force():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(7, 5))
  n, m = len(x), len(y)
  kxx = sum(_kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kyy = sum(_kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(_kernel(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
  assert fid.mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
  assert fid.polynomial_kernel(x, y)[2, 3] == pytest.approx(_kernel(x[2], y[3]))


def _gaussian_raw_moment(mu, k):
  """E[X^k] for X ~ N(mu, 1), k <= 3."""
  return (1.0, mu, mu * mu + 1.0, mu**3 + 3.0 * mu)[k]


def _population_mmd2_unit_gaussians(mu_x, mu_y):
  """MMD² between N(mu_x, I) and N(mu_y, I) for k(x, y) = (x·y/d + 1)³ via its explicit feature map:
  k(x, y) = Σ_α w_α x^α y^α over multi-indices |α| ≤ 3 with w_α = C(3, |α|) d^−|α| |α|!/α!, so
  MMD² = Σ_α w_α (E x^α − E y^α)²."""
  d = len(mu_x)
  total = 0.0
  for alpha in itertools.product(range(4), repeat=d):
    order = sum(alpha)
    if order > 3:
      continue
    multinomial = math.factorial(order) / math.prod(math.factorial(a) for a in alpha)
    w = math.comb(3, order) * d ** (-order) * multinomial
    ex = math.prod(_gaussian_raw_moment(m, a) for m, a in zip(mu_x, alpha))
    ey = math.prod(_gaussian_raw_moment(m, a) for m, a in zip(mu_y, alpha))
    total += w * (ex - ey) ** 2
  return total


def test_kid_mean_shift_matches_analytic_value():
  mu_x, mu_y = np.array([0.0, 0.0]), np.array([0.6, -0.3])
  expected = _population_mmd2_unit_gaussians(mu_x, mu_y)
  assert expected > 0.1
  rng = np.random.default_rng(5)
  x = mu_x + rng.normal(size=(20000, 2))
  y = mu_y + rng.normal(size=(20000, 2))
  # many small subsets: their mean has ~2.5 % noise, while the biased (diagonal-including) estimator would be
  # off by ~(E k(x,x) + E k(y,y)) / 50 ≈ 40 %
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=800, subset_size=50, seed=0)
  assert mean == pytest.approx(expected, rel=0.1)
  assert 0.3 < std < 3.0  # spread of single 50-sample estimates (≈ 1.2)


def test_kid_same_distribution_is_near_zero():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8))
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=10, subset_size=500, seed=0)
  shifted = fid.kernel_inception_distance(x, y + 0.3, num_subsets=10, subset_size=500, seed=0)[0]
  assert shifted > 0.05 and abs(mean) < 0.1 * shifted
  full, full_std = fid.kernel_inception_distance(x[:300], y[:300])  # small sets: one full estimate
  assert full == pytest.approx(fid.mmd2_unbiased(x[:300], y[:300])) and full_std == 0.0
