"""Flow samplers for one image token: the official Euler–Maruyama SDE (variants A and B), Euler and Heun ODEs, and
DPM-Solver++(2M) adapted to rectified flow; per-token step schedules and guidance windows.

Convention: x_t = t·x_data + (1−t)·noise, t = 0 is noise, t = 1 is data; the network predicts v = x_data − noise.
Timestep shift: t' = t / (s − (s−1)·t). SDE step (SiT-style score from velocity):
  score = (t·v − x)/(1 − t);  drift = v + (1 − t)·score;  x ← x + drift·dt + sqrt(2(1 − t))·sqrt(dt)·ε

Variant A (Aug-2025 release, the default): grid linspace(0, 0.96, N) shifted; N−1 SDE steps, then one deterministic
Euler step of size 0.04 at the last grid time (with shift 3.2 the sampler stops near t ≈ 0.92 — reproduced as is).
Variant B (NextStep-1.1): grid linspace(0, 1, N+1)[:-1] shifted, then 1.0; N SDE steps ending at t = 1.
Euler and Heun run on linspace(0, 1, N+1) shifted, t = 0 → 1.
DPM-Solver++(2M) for rectified flow: α_t = t, σ_t = 1 − t, λ = log(α/σ), data prediction d = x + (1 − t)·v;
its own grid is log-SNR uniform: t = 0, sigmoid(linspace(−2 ln N, 2 ln N, N−1) − ln s), 1 (the timestep shift s is
a log-SNR offset; the interior ends approach 0 and 1 as 1/N², so the two end steps add O(N⁻⁴));
  x' = (σ'/σ)·x + (α' − σ'·α/σ)·D,  D = d + (d − d_prev)·h/(2·h_prev)  (h = λ' − λ; first order, i.e. Euler,
  where h or h_prev is infinite: the steps leaving t = 0, the one after it, and the last step to t = 1).

`velocity(x, t, i) -> v` is the (guided) network; x (B, K) fp32; t = grid[i] a scalar array (every evaluation is at
a grid time, so a network may precompute per-time terms and index them by i).
Log-prob samplers (on-policy RL, `train/grpo.py`): every step is a Gaussian transition x' ~ N(μ(x, t), σ_t² I) whose
(μ, σ, x') is recorded, so a token's trajectory log-probability is a sum of Gaussian log-densities; both run on the
Euler grid (linspace(0, 1, N+1) shifted) with `noise_level` a:
  flow_sde (Flow-GRPO): g = a·sqrt((1 − t)/t) (t = 0 replaced by the grid's first positive time);
    μ = x + (v + g²/2·score)·dt, σ = g·sqrt(dt) — the marginal-preserving SDE with diffusion g.
  cps (coefficients-preserving, Flow-CPS): x̂₁ = x + (1 − t)·v, ε̂ = x − t·v, s' = 1 − t';
    μ = t'·x̂₁ + s'·cos(aπ/2)·ε̂, σ = s'·sin(aπ/2) — the next state keeps the noise coefficient s' exactly; the
    last step (t' = 1) is deterministic (σ = 0) and carries no log-prob.
Per-token schedules: token k of n uses `step_schedule[k·G // n]` steps (G = len(step_schedule)); one program runs
every token with a padded (G, S) grid table and a dynamic trip count (`lax.fori_loop` with traced bounds).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nextstep_jax.sampling.methods import LOGPROB_METHODS, METHODS  # noqa: F401  (re-exported)
Velocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array], jax.Array]  # SDE step index j (0-based) → ε (B, K)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  method: str = "sde_a"
  steps: int = 50  # with a step_schedule: the most steps any token takes
  shift: float = 1.0
  last_step_size: float = 0.04  # variant A only
  step_schedule: tuple[int, ...] = ()  # per-token steps over G equal token segments (each 2..steps); () = steps
  guidance_times: tuple[float, float] = (0.0, 1.0)  # CFG only while lo ≤ t ≤ hi; elsewhere the cond branch alone
  guidance_tokens: tuple[float, float] = (0.0, 1.0)  # CFG only for tokens with lo ≤ k/n < hi (hi = 1: to the end)
  noise_level: float = 0.7  # log-prob samplers only: a of flow_sde / cps (module docstring)

  def validate(self) -> "FlowConfig":
    if self.method not in METHODS:
      raise ValueError(f"sampler method {self.method!r} is not one of {METHODS}")
    if self.steps < 2:
      raise ValueError(f"sampling steps={self.steps} must be at least 2")
    if self.shift <= 0:
      raise ValueError(f"timestep shift={self.shift} must be > 0")
    bad = [s for s in self.step_schedule if not 2 <= int(s) <= self.steps]
    if bad:
      raise ValueError(f"step_schedule={self.step_schedule}: every entry must be in [2, steps={self.steps}]; "
                       f"raise --steps to the schedule's maximum")
    if self.records_logprob:
      if not 0.0 < self.noise_level <= (1.0 if self.method == "cps" else 10.0):
        raise ValueError(f"noise_level={self.noise_level} must be in (0, {1 if self.method == 'cps' else 10}] for "
                         f"the {self.method} sampler (Flow-GRPO uses 0.7)")
      if self.step_schedule:
        raise ValueError(f"the {self.method} sampler records one trajectory shape per token: leave step_schedule "
                         f"empty")
    for name, (lo, hi) in (("guidance_times", self.guidance_times), ("guidance_tokens", self.guidance_tokens)):
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}=({lo}, {hi}) must satisfy 0 ≤ lo ≤ hi ≤ 1")
    return self

  @property
  def num_noise_draws(self) -> int:
    """ε draws per token besides the initial noise (the official sampler draws one per SDE step; schedules draw
    for the longest token)."""
    return {"sde_a": self.steps - 1, "sde_b": self.steps, "flow_sde": self.steps,
            "cps": self.steps}.get(self.method, 0)

  @property
  def records_logprob(self) -> bool:
    return self.method in LOGPROB_METHODS

  @property
  def schedule(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self.step_schedule) or (self.steps,)

  @property
  def guidance_everywhere(self) -> bool:
    return self.guidance_times == (0.0, 1.0) and self.guidance_tokens == (0.0, 1.0)


def shift_time(t: np.ndarray, s: float) -> np.ndarray:
  return t / (s - (s - 1.0) * t)


def time_grid(cfg: FlowConfig, steps: int | None = None) -> np.ndarray:
  """float32 times at which the network is evaluated, followed by the end time (len steps+1; A: steps)."""
  n, s = cfg.steps if steps is None else steps, np.float32(cfg.shift)
  if cfg.method == "sde_a":
    return shift_time(np.linspace(0, 0.96, n, dtype=np.float32), s).astype(np.float32)
  if cfg.method == "sde_b":
    t = shift_time(np.linspace(0, 1, n + 1, dtype=np.float32)[:-1], s)
    return np.concatenate([t, [1.0]]).astype(np.float32)
  if cfg.method == "dpm_2m":
    bound = 2.0 * np.log(n)
    lam = np.linspace(-bound, bound, n - 1) - np.log(cfg.shift)
    return np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-lam)), [1.0]]).astype(np.float32)
  return shift_time(np.linspace(0, 1, n + 1, dtype=np.float32), s).astype(np.float32)


def grid_table(cfg: FlowConfig) -> tuple[np.ndarray, np.ndarray]:
  """(grids (G, S) float32, steps (G,) int32) for the schedule's G segments; each row is `time_grid` for its step
  count, padded with its last time to the longest row (padded entries are never evaluated)."""
  grids = [time_grid(cfg, n) for n in cfg.schedule]
  width = max(len(g) for g in grids)
  table = np.stack([np.concatenate([g, np.full(width - len(g), g[-1], np.float32)]) for g in grids])
  return table.astype(np.float32), np.asarray(cfg.schedule, np.int32)


def token_segment(cfg: FlowConfig, k: jax.Array, n: int) -> jax.Array:
  """The schedule segment of token k of n (traceable)."""
  return (k * len(cfg.schedule)) // n


def _sde_step(velocity: Velocity, x, t, t_next, j, eps):
  v = velocity(x, t, j)
  score = (t * v - x) / (1.0 - t)
  drift = v + (1.0 - t) * score
  dt = t_next - t
  return x + drift * dt + jnp.sqrt(2.0 * (1.0 - t)) * jnp.sqrt(dt) * eps


def _log_snr(t):
  t = jnp.clip(t, 1e-7, 1.0 - 1e-7)
  return jnp.log(t) - jnp.log1p(-t)


def _dpm_2m(velocity: Velocity, x0, grid, steps):
  """DPM-Solver++(2M) in data prediction for rectified flow (module docstring)."""
  def step(j, carry):
    x, d_prev = carry
    t, t_next = grid[j], grid[j + 1]
    d = x + (1.0 - t) * velocity(x, t, j)
    t_prev = grid[jnp.maximum(j - 1, 0)]
    second = (j > 0) & (t_prev > 0.0) & (t_next < 1.0)  # both log-SNR steps finite
    h, h_prev = _log_snr(t_next) - _log_snr(t), _log_snr(t) - _log_snr(t_prev)
    ratio = jnp.where(second, h / (2.0 * jnp.where(second, h_prev, 1.0)), 0.0)
    big_d = d + ratio * (d - d_prev)
    sig, sig_next = 1.0 - t, 1.0 - t_next
    return (sig_next / sig) * x + (t_next - sig_next * t / sig) * big_d, d
  return jax.lax.fori_loop(0, steps, step, (x0, jnp.zeros_like(x0)))[0]


def integrate(velocity: Velocity, x0: jax.Array, cfg: FlowConfig, noise: NoiseFn | None = None,
              grid: jax.Array | None = None, steps: jax.Array | int | None = None) -> jax.Array:
  """Runs the configured sampler from noise x0 (B, K); `noise(j)` supplies the SDE step-j ε (B, K). `grid` and
  `steps` (possibly traced: one row of `grid_table` and its count) default to `time_grid(cfg)` and cfg.steps."""
  grid = jnp.asarray(time_grid(cfg)) if grid is None else grid
  steps = cfg.steps if steps is None else steps
  x0 = x0.astype(jnp.float32)
  if cfg.records_logprob:
    return integrate_with_trajectory(velocity, x0, cfg, noise, grid)[0]
  if cfg.method in ("sde_a", "sde_b"):
    if noise is None:
      raise ValueError("SDE samplers need a noise function")
    n_sde = steps - 1 if cfg.method == "sde_a" else steps
    x = jax.lax.fori_loop(0, n_sde, lambda j, x: _sde_step(velocity, x, grid[j], grid[j + 1], j, noise(j)), x0)
    if cfg.method == "sde_a":
      last = steps - 1
      x = x + cfg.last_step_size * velocity(x, grid[last], jnp.int32(last))
    return x
  if cfg.method == "euler":
    return jax.lax.fori_loop(0, steps, lambda j, x: x + velocity(x, grid[j], j) * (grid[j + 1] - grid[j]), x0)
  if cfg.method == "dpm_2m":
    return _dpm_2m(velocity, x0, grid, steps)

  def heun(j, x):
    t, t_next = grid[j], grid[j + 1]
    v1 = velocity(x, t, j)
    x_pred = x + v1 * (t_next - t)
    return x + 0.5 * (v1 + velocity(x_pred, t_next, j + 1)) * (t_next - t)
  return jax.lax.fori_loop(0, steps, heun, x0)


# ----------------------------------------------------------------------------------------------- log-prob samplers


@struct.dataclass
class Trajectory:
  """One token's recorded transitions over S steps: states x_0..x_S (S+1, B, K), means μ_j (S, B, K), stds σ_j (S,),
  log-densities log N(x_{j+1}; μ_j, σ_j² I) (S, B) (0 where σ_j = 0)."""
  states: jax.Array
  means: jax.Array
  stds: jax.Array
  logp: jax.Array


def _diffusion(cfg: FlowConfig, t, t_first, xp=jnp):
  """flow_sde's g(t) = a·sqrt((1 − t)/t), t = 0 replaced by the grid's first positive time (numpy or jax)."""
  return cfg.noise_level * xp.sqrt((1.0 - t) / xp.where(t > 0, t, t_first))


def transition_std(cfg: FlowConfig, t, t_next, t_first, xp=jnp):
  """σ of a log-prob sampler's step t → t_next (numpy or jax; a function of the grid alone)."""
  if cfg.method == "flow_sde":
    return _diffusion(cfg, t, t_first, xp) * xp.sqrt(t_next - t)
  if cfg.method == "cps":
    return (1.0 - t_next) * np.sin(cfg.noise_level * np.pi / 2)
  raise ValueError(f"{cfg.method!r} is not a log-prob sampler ({LOGPROB_METHODS})")


def transition(cfg: FlowConfig, v, x, t, t_next, t_first):
  """(μ, σ) of the Gaussian step x → x' of a log-prob sampler (module docstring). t, t_next, t_first broadcast
  against x[..., :1] (scalars while sampling, per-row arrays in the parallel recompute); σ has t's shape."""
  std = transition_std(cfg, t, t_next, t_first)
  if cfg.method == "flow_sde":
    g = _diffusion(cfg, t, t_first)
    score = (t * v - x) / (1.0 - t)
    return x + (v + 0.5 * jnp.square(g) * score) * (t_next - t), std
  x1_hat, eps_hat = x + (1.0 - t) * v, x - t * v
  return t_next * x1_hat + (1.0 - t_next) * np.cos(cfg.noise_level * np.pi / 2) * eps_hat, std


def gaussian_logprob(x_next, mean, std):
  """Σ over the last axis of log N(x_next; mean, std²) (std broadcast against x[..., 0]); 0 where std = 0."""
  k = x_next.shape[-1]
  ok = std > 0
  safe = jnp.where(ok, std, 1.0)
  z2 = jnp.sum(jnp.square((x_next - mean) / safe[..., None]), axis=-1)
  return jnp.where(ok, -0.5 * z2 - k * jnp.log(safe) - 0.5 * k * np.log(2 * np.pi), 0.0)


def integrate_with_trajectory(velocity: Velocity, x0: jax.Array, cfg: FlowConfig, noise: NoiseFn,
                              grid: jax.Array | None = None) -> tuple[jax.Array, Trajectory]:
  """A log-prob sampler from x0 (B, K) over cfg.steps steps, recording every transition (a `lax.fori_loop`)."""
  grid = jnp.asarray(time_grid(cfg)) if grid is None else grid
  n = cfg.steps
  b, k = x0.shape

  def step(j, tr: Trajectory) -> Trajectory:
    x, t, t_next = tr.states[j], grid[j], grid[j + 1]
    mean, std = transition(cfg, velocity(x, t, j), x, t, t_next, grid[1])
    x_next = mean + std * noise(j)
    return Trajectory(states=tr.states.at[j + 1].set(x_next), means=tr.means.at[j].set(mean),
                      stds=tr.stds.at[j].set(std), logp=tr.logp.at[j].set(gaussian_logprob(x_next, mean, std)))
  init = Trajectory(states=jnp.zeros((n + 1, b, k), jnp.float32).at[0].set(x0),
                    means=jnp.zeros((n, b, k), jnp.float32), stds=jnp.zeros((n,), jnp.float32),
                    logp=jnp.zeros((n, b), jnp.float32))
  tr = jax.lax.fori_loop(0, n, step, init)
  return tr.states[n], tr


def logprob_steps(cfg: FlowConfig) -> np.ndarray:
  """Host-side: which of a log-prob sampler's steps are stochastic (σ > 0) and so carry a log-prob (S,) bool."""
  g = time_grid(cfg)
  return np.broadcast_to(transition_std(cfg, g[:-1], g[1:], g[1], xp=np), (len(g) - 1,)) > 0


def eval_times(cfg: FlowConfig, steps: int) -> np.ndarray:
  """The flow times at which `integrate` evaluates the network for one token taking `steps` steps (host-side)."""
  g = time_grid(cfg, steps)
  if cfg.method == "heun":
    return np.stack([g[:-1], g[1:]], axis=1).reshape(-1)
  return g[:steps]


def head_evaluations(cfg: FlowConfig, n_tokens: int, branches: int) -> tuple[int, int]:
  """(head calls, head rows) per image over n_tokens: a call is one velocity evaluation; rows counts the CFG
  branches it runs on (1 outside the guidance windows)."""
  calls = rows = 0
  for k in range(n_tokens):
    times = eval_times(cfg, cfg.schedule[k * len(cfg.schedule) // n_tokens])
    guided = guidance_active(cfg, np.asarray(times), k / n_tokens) if branches > 1 else np.zeros(len(times), bool)
    calls += len(times)
    rows += int(np.sum(np.where(guided, branches, 1)))
  return calls, rows


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


def guidance_active(cfg: FlowConfig, t, token_frac):
  """Whether CFG runs at flow time t for the token at fraction k/n of the image (numpy or traced)."""
  (t_lo, t_hi), (k_lo, k_hi) = cfg.guidance_times, cfg.guidance_tokens
  in_tokens = (token_frac >= k_lo) & ((token_frac < k_hi) | (k_hi >= 1.0))
  return (t >= t_lo) & (t <= t_hi) & in_tokens


def windowed(guided: Velocity, cond_only: Velocity, cfg: FlowConfig, token_frac) -> Velocity:
  """`guided` inside the guidance windows, `cond_only` (the conditional rows alone: fewer rows) outside."""
  if cfg.guidance_everywhere:
    return guided
  return lambda x, t, i: jax.lax.cond(guidance_active(cfg, t, token_frac), guided, cond_only, x, t, i)


def combine_branches(v_RxK: jax.Array, branches: int, cfg: jax.Array, cfg_img: jax.Array) -> jax.Array:
  """Rows are branch-major [cond; uncond(; uncond2)]: 2 → v_u + cfg(v_c − v_u);
  3 → v_u2 + cfg_img(v_u1 − v_u2) + cfg(v_c − v_u1). fp32."""
  v = v_RxK.astype(jnp.float32).reshape(branches, -1, v_RxK.shape[-1])
  if branches == 1:
    return v[0]
  if branches == 2:
    return v[1] + cfg * (v[0] - v[1])
  return v[2] + cfg_img * (v[1] - v[2]) + cfg * (v[0] - v[1])
