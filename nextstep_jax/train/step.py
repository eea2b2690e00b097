"""The jitted training step: CE + flow-matching loss, gradient accumulation, NaN/Inf guard, AdamW update.

Gradient accumulation scans over `microbatches` strided slices of the global batch (row i goes to micro-batch
i mod M, so each device's rows split locally). Every micro-batch loss is normalised by the *global* token counts
(computed from masks before the scan), so the summed gradients equal the one-step gradient exactly; the flow-
matching draws are made for the whole global batch for the same reason.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.models.nextstep import NextStep, draw_fm_noise, loss_counts
from nextstep_jax.train.state import TrainState


def _split(x: jax.Array, m: int, axis: int = 0) -> jax.Array:
  """(…, B, …) → (M, …, B/M, …) with row i in micro-batch i mod M."""
  b = x.shape[axis]
  if b % m:
    raise ValueError(f"batch of {b} rows cannot be split into {m} micro-batches; use a divisor of {b}")
  shape = x.shape[:axis] + (b // m, m) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def make_loss_fn(cfg: ModelConfig):
  model = NextStep(cfg)

  def loss_fn(params, batch, noise, u, counts):
    terms = model.apply(params, batch, noise, u, method=NextStep.loss_terms)
    loss = (cfg.lm_loss_weight * terms["ce_sum"] / jnp.maximum(counts["ce_count"], 1.0)
            + cfg.im_loss_weight * terms["fm_sum"] / (counts["fm_count"] + 1e-8))
    return loss, terms
  return loss_fn


def loss_and_grads(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array], key: jax.Array,
                   microbatches: int = 1) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """(total loss, summed terms, fp32 grads) of a global batch, accumulated over `microbatches`."""
  counts = loss_counts(cfg, batch)
  b, slots = batch["image_tokens"].shape[:2]
  noise, u = draw_fm_noise(cfg, key, b, slots)
  grad_fn = jax.value_and_grad(make_loss_fn(cfg), has_aux=True)
  if microbatches == 1:
    (loss, terms), grads = grad_fn(params, batch, noise, u, counts)
    return loss, terms, grads
  mbs = {k: _split(v, microbatches) for k, v in batch.items()}
  mbs = {k: sharding.constrain(v, (None, "act_batch") + (None,) * (v.ndim - 2)) for k, v in mbs.items()}
  mb_noise, mb_u = _split(noise, microbatches, axis=1), _split(u, microbatches, axis=1)

  def body(acc, xs):
    mb, n, uu = xs
    (loss, terms), grads = grad_fn(params, mb, n, uu, counts)
    return jax.tree.map(jnp.add, acc, (loss, terms, grads)), None
  zeros = (jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "ce_count", "fm_sum",
                                                                               "fm_count")},
           jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, terms, grads), _ = jax.lax.scan(body, zeros, (mbs, mb_noise, mb_u))
  return loss, terms, grads


def train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int,
               state: TrainState, batch: dict[str, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer step. Updates are skipped (and counted) when the loss or gradient norm is not finite."""
  step_key = jax.random.fold_in(key, state.step)
  loss, terms, grads = loss_and_grads(cfg, state.params, batch, step_key, microbatches)
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state), skipped=state.skipped + (~ok).astype(jnp.int32))
  metrics = {"loss": loss, "text_loss": terms["ce_sum"] / jnp.maximum(terms["ce_count"], 1.0),
             "image_loss": terms["fm_sum"] / (terms["fm_count"] + 1e-8), "grad_norm": grad_norm,
             "lr": schedule(state.step - state.skipped), "skipped_updates": new_state.skipped, "update_ok": ok,
             "text_token_count": terms["ce_count"], "image_token_count": terms["fm_count"] / cfg.fm_head_batch_mul}
  return new_state, metrics


def jit_train_step(cfg: ModelConfig, tx, schedule, microbatches: int, state_shardings: TrainState,
                   batch_shardings: dict[str, Any], mesh, donate: bool = True):
  """jit with explicit in/out shardings (state donated). Trace it under `sharding.use_mesh(mesh)`."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = lambda state, batch, key: train_step(cfg, tx, schedule, microbatches, state, batch, key)
  return jax.jit(fn, in_shardings=(state_shardings, batch_shardings, rep), out_shardings=(state_shardings, rep),
                 donate_argnums=(0,) if donate else ())
