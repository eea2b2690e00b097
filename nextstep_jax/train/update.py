"""Objective-agnostic pieces of a train step: micro-batch gradient accumulation and the guarded optimizer update.

`accumulate(grad_fn, params, batch, extras, microbatches)` scans `grad_fn(params, mb_batch, *mb_extras)` →
((loss, sums), grads) over strided micro-batches (row i → micro-batch i mod M, so each device's rows split
locally) and adds everything up, so `grad_fn` must return losses already normalised by *global* counts.
`guarded_update` is the NaN/Inf guard + optimizer update. Both train steps — flow matching (`train/step.py`) and
DPO (`train/dpo.py`) — are built from these.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nextstep_jax import sharding
from nextstep_jax.train.state import TrainState


def _split(x: jax.Array, m: int, axis: int = 0) -> jax.Array:
  """(…, B, …) → (M, …, B/M, …) with row i in micro-batch i mod M."""
  b = x.shape[axis]
  if b % m:
    raise ValueError(f"batch of {b} rows cannot be split into {m} micro-batches; use a divisor of {b}")
  shape = x.shape[:axis] + (b // m, m) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis + 1, 0)


def accumulate(grad_fn: Callable, params: Any, batch: dict[str, jax.Array], extras: tuple = (),
               extras_axis: int = 1, microbatches: int = 1):
  """Sum of `grad_fn(params, mb, *mb_extras)` over `microbatches` strided slices.

  `batch` leaves are split on axis 0 (and constrained to act_batch inside the scan); `extras` (e.g. the flow-
  matching draws, (mul, B, …)) on `extras_axis`. Returns grad_fn's output tree ((loss, sums), grads), summed.
  """
  if microbatches == 1:
    return grad_fn(params, batch, *extras)
  mbs = {k: _split(v, microbatches) for k, v in batch.items()}
  mbs = {k: sharding.constrain(v, (None, "act_batch") + (None,) * (v.ndim - 2)) for k, v in mbs.items()}
  mb_extras = tuple(_split(x, microbatches, axis=extras_axis) for x in extras)
  first = jax.tree.map(lambda x: x[0], (mbs, mb_extras))
  shapes = jax.eval_shape(lambda p, b, e: grad_fn(p, b, *e), params, *first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)  # fp32 sums (losses, counts, grads)

  def body(acc, xs):
    mb, ex = xs
    return jax.tree.map(jnp.add, acc, grad_fn(params, mb, *ex)), None
  out, _ = jax.lax.scan(body, zeros, (mbs, mb_extras))
  return out


def guarded_update(tx: optax.GradientTransformation, state: TrainState, loss: jax.Array,
                   grads: Any) -> tuple[TrainState, jax.Array, jax.Array]:
  """(new state, update_ok, grad_norm): the update is skipped (and counted) when loss or grad norm is not finite."""
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state), skipped=state.skipped + (~ok).astype(jnp.int32))
  return new_state, ok, grad_norm
