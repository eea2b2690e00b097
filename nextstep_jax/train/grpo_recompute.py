"""GRPO's parallel recompute: every recorded sampler transition's log-density (and Gaussian mean) under given params
in one teacher-forced backbone forward over prompt + image tokens and one flow-head pass over every (token, flow
step) — what the policy-gradient loss (train/grpo.py) differentiates, instead of re-running the sequential sampler."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nextstep_jax.models.layers import parameter_free_layer_norm, to_dtype
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.sampling import flow
from nextstep_jax.train.grpo_config import GrpoConfig


def teacher_forced_conditions(module: NextStep, ids_RxP: jax.Array, mask_RxP: jax.Array, tokens_RxNxK: jax.Array,
                              grid_w: int) -> jax.Array:
  """Head conditions (R, n, D) of every image token in one backbone forward over prompt + tokens 0..n−2: the
  sampler's sequence (key-valid = prompt mask ‖ ones, raw positions 0..P+n−2, token k conditioned by the hidden
  at P−1+k). Apply with `model.apply(params, …, method=teacher_forced_conditions)`."""
  r, p = ids_RxP.shape
  n = tokens_RxNxK.shape[1]
  dtype = to_dtype(module.cfg.dtype)
  emb = jnp.concatenate([module.embed_inputs(ids_RxP), module.image_in_projector(
      tokens_RxNxK[:, :n - 1].astype(dtype))], axis=1)
  key_valid = jnp.concatenate([mask_RxP.astype(bool), jnp.ones((r, n - 1), bool)], axis=1)
  h, _ = module.hidden(emb, key_valid)
  h_cond = h[:, p - 1:].reshape(r * n, -1)
  c = module.condition(h_cond, jnp.tile(jnp.arange(n), r), grid_w)
  return c.reshape(r, n, -1)


def _velocity(module: NextStep, x, t, c):
  return module.velocity(x, t, c)


def transition_logprobs(model: NextStep, params: Any, gcfg: GrpoConfig, batch: dict[str, jax.Array],
                        step_idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-densities (R, n, J), means (R, n, J, K), stds (J,)) of the recorded transitions at flow steps
  `step_idx` (J,), recomputed in parallel: one teacher-forced backbone pass (both CFG branches as rows) and one
  head pass over R·n·J rows per branch."""
  fcfg = gcfg.flow_config()
  states = batch["states"].astype(jnp.float32)  # (R, n, S+1, K)
  r, n, _, k = states.shape
  final = states[:, :, -1]
  tokens = parameter_free_layer_norm(final, 1e-6) if gcfg.use_norm else final
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if gcfg.branches == 2:
    ids = jnp.concatenate([ids, batch["uncond_input_ids"]])
    mask = jnp.concatenate([mask, batch["uncond_attention_mask"]])
    tokens = jnp.concatenate([tokens, tokens])
  c = model.apply(params, ids, mask, tokens, gcfg.grid_w, method=teacher_forced_conditions)  # (bR, n, D)
  grid = jnp.asarray(flow.time_grid(fcfg))
  j = step_idx.shape[0]
  x = states[:, :, step_idx]  # (R, n, J, K)
  t = jnp.broadcast_to(grid[step_idx], (r, n, j))
  # (token, step) rows, row-major over (branch, R, n, J)
  rows = lambda a: jnp.tile(a.reshape((r * n * j,) + a.shape[3:]), (gcfg.branches,) + (1,) * (a.ndim - 3))
  c_rows = jnp.repeat(c.reshape(gcfg.branches, r * n, -1), j, axis=1).reshape(gcfg.branches * r * n * j, -1)
  v = model.apply(params, rows(x), rows(t), c_rows, method=_velocity)
  v = flow.combine_branches(v, gcfg.branches, jnp.float32(gcfg.cfg), jnp.float32(1.0)).reshape(x.shape)
  t_b = t[..., None]
  mean, std = flow.transition(fcfg, v, x, t_b, jnp.broadcast_to(grid[step_idx + 1], (r, n, j))[..., None], grid[1])
  std = jnp.broadcast_to(std, (r, n, j, 1))[..., 0]
  logp = flow.gaussian_logprob(states[:, :, step_idx + 1], mean, std)
  return logp, mean, std[0, 0]
