"""Flow samplers for one image token: the official Euler–Maruyama SDE (variants A and B), Euler and Heun ODEs.

Convention: x_t = t·x_data + (1−t)·noise, t = 0 is noise, t = 1 is data; the network predicts v = x_data − noise.
Timestep shift: t' = t / (s − (s−1)·t). SDE step (SiT-style score from velocity):
  score = (t·v − x)/(1 − t);  drift = v + (1 − t)·score;  x ← x + drift·dt + sqrt(2(1 − t))·sqrt(dt)·ε

Variant A (Aug-2025 release, the default): grid linspace(0, 0.96, N) shifted; N−1 SDE steps, then one deterministic
Euler step of size 0.04 at the last grid time (with shift 3.2 the sampler stops near t ≈ 0.92 — reproduced as is).
Variant B (NextStep-1.1): grid linspace(0, 1, N+1)[:-1] shifted, then 1.0; N SDE steps ending at t = 1.
`velocity(x, t, i) -> v` is the (guided) network; x (B, K) fp32; t = time_grid(cfg)[i] a scalar array (every
evaluation is at a grid time, so a network may precompute per-time terms and index them by i).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("sde_a", "sde_b", "euler", "heun")
Velocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array], jax.Array]  # SDE step index j (0-based) → ε (B, K)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  method: str = "sde_a"
  steps: int = 50
  shift: float = 1.0
  last_step_size: float = 0.04  # variant A only

  def validate(self) -> "FlowConfig":
    if self.method not in METHODS:
      raise ValueError(f"sampler method {self.method!r} is not one of {METHODS}")
    if self.steps < 2:
      raise ValueError(f"sampling steps={self.steps} must be at least 2")
    if self.shift <= 0:
      raise ValueError(f"timestep shift={self.shift} must be > 0")
    return self

  @property
  def num_noise_draws(self) -> int:
    """ε draws per token besides the initial noise (the official sampler draws one per SDE step)."""
    return {"sde_a": self.steps - 1, "sde_b": self.steps}.get(self.method, 0)


def shift_time(t: np.ndarray, s: float) -> np.ndarray:
  return t / (s - (s - 1.0) * t)


def time_grid(cfg: FlowConfig) -> np.ndarray:
  """float32 times at which the network is evaluated, followed by the end time (len steps+1; A: steps)."""
  n, s = cfg.steps, np.float32(cfg.shift)
  if cfg.method == "sde_a":
    return shift_time(np.linspace(0, 0.96, n, dtype=np.float32), s).astype(np.float32)
  if cfg.method == "sde_b":
    t = shift_time(np.linspace(0, 1, n + 1, dtype=np.float32)[:-1], s)
    return np.concatenate([t, [1.0]]).astype(np.float32)
  return shift_time(np.linspace(0, 1, n + 1, dtype=np.float32), s).astype(np.float32)


def _sde_step(velocity: Velocity, x, t, t_next, j, eps):
  v = velocity(x, t, j)
  score = (t * v - x) / (1.0 - t)
  drift = v + (1.0 - t) * score
  dt = t_next - t
  return x + drift * dt + jnp.sqrt(2.0 * (1.0 - t)) * jnp.sqrt(dt) * eps


def integrate(velocity: Velocity, x0: jax.Array, cfg: FlowConfig, noise: NoiseFn | None = None) -> jax.Array:
  """Runs the configured sampler from noise x0 (B, K); `noise(j)` supplies the SDE step-j ε (B, K)."""
  grid = jnp.asarray(time_grid(cfg))
  x0 = x0.astype(jnp.float32)
  if cfg.method in ("sde_a", "sde_b"):
    if noise is None:
      raise ValueError("SDE samplers need a noise function")
    n_sde = cfg.num_noise_draws
    x = jax.lax.fori_loop(0, n_sde, lambda j, x: _sde_step(velocity, x, grid[j], grid[j + 1], j, noise(j)), x0)
    if cfg.method == "sde_a":
      last = cfg.steps - 1
      x = x + cfg.last_step_size * velocity(x, grid[last], jnp.int32(last))
    return x
  if cfg.method == "euler":
    return jax.lax.fori_loop(0, cfg.steps, lambda j, x: x + velocity(x, grid[j], j) * (grid[j + 1] - grid[j]), x0)

  def heun(j, x):
    t, t_next = grid[j], grid[j + 1]
    v1 = velocity(x, t, j)
    x_pred = x + v1 * (t_next - t)
    return x + 0.5 * (v1 + velocity(x_pred, t_next, j + 1)) * (t_next - t)
  return jax.lax.fori_loop(0, cfg.steps, heun, x0)


# ----------------------------------------------------------------------------------------------- guidance

CFG_SCHEDULES = ("constant", "linear", "linear_rise")


def guidance_scale(cfg: jax.Array, schedule: str, k: jax.Array, n: int) -> jax.Array:
  """Per-token guidance: constant; `linear` (Aug-2025) 1 + (cfg−1)(n−k)/n, decaying to 1; `linear_rise`
  (Feb-2026) max(cfg/2, 1 + (cfg−1)k/n)."""
  if schedule == "constant":
    return cfg
  if schedule == "linear":
    return 1.0 + (cfg - 1.0) * (n - k) / n
  if schedule == "linear_rise":
    return jnp.maximum(cfg / 2.0, 1.0 + (cfg - 1.0) * k / n)
  raise ValueError(f"cfg_schedule {schedule!r} is not one of {CFG_SCHEDULES}")


def combine_branches(v_RxK: jax.Array, branches: int, cfg: jax.Array, cfg_img: jax.Array) -> jax.Array:
  """Rows are branch-major [cond; uncond(; uncond2)]: 2 → v_u + cfg(v_c − v_u);
  3 → v_u2 + cfg_img(v_u1 − v_u2) + cfg(v_c − v_u1). fp32."""
  v = v_RxK.astype(jnp.float32).reshape(branches, -1, v_RxK.shape[-1])
  if branches == 1:
    return v[0]
  if branches == 2:
    return v[1] + cfg * (v[0] - v[1])
  return v[2] + cfg_img * (v[1] - v[2]) + cfg * (v[0] - v[1])
