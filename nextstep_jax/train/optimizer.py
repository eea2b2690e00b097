"""AdamW with the official recipe: β (0.9, 0.95), eps 1e-8, weight decay 0.1 except on biases and norm weights,
global-norm clipping 1.0, linear warmup then cosine (or constant) learning rate; optionally (`train.ema_decay` > 0,
not part of the official recipe) an exponential moving average of the parameters kept in the optimizer state, so
it is sharded like the parameters, checkpointed and resumed with them, and exported instead of them."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from nextstep_jax.train.config import TrainConfig

NO_DECAY_LEAVES = ("bias", "scale")  # biases and RMSNorm/LayerNorm weights


def lr_schedule(run: TrainConfig) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `end_lr` or constant (`TrainConfig.schedule`)."""
  warmup = optax.linear_schedule(0.0, run.lr, max(run.warmup_steps, 1))
  if run.schedule == "constant":
    main = optax.constant_schedule(run.lr)
  else:
    alpha = run.end_lr / run.lr if run.lr else 0.0  # lr 0: a frozen run (tests, evaluation of the init)
    main = optax.cosine_decay_schedule(run.lr, max(run.steps - run.warmup_steps, 1), alpha=alpha)
  return optax.join_schedules([warmup, main], [run.warmup_steps])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every leaf except biases and norm weights."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] not in NO_DECAY_LEAVES for k in flat})


class ParamsEmaState(NamedTuple):
  count: jax.Array  # updates averaged so far
  ema: Any  # the parameters' tree, in their dtypes (fp32 master weights)


def params_ema(decay: float) -> optax.GradientTransformation:
  """Last link of a chain: passes the updates through and tracks ema ← d·ema + (1 − d)·(params + updates), with
  the warm-up d = min(decay, (1 + n) / (10 + n)) at update n, so early averages are not anchored to the init."""
  if not 0.0 < decay < 1.0:
    raise ValueError(f"config.train.ema_decay={decay} must be in (0, 1) (0 disables the average)")

  def init(params):  # a copy (params are placeholders when optax maps the state's structure)
    return ParamsEmaState(jnp.zeros((), jnp.int32),
                          jax.tree.map(lambda p: jnp.array(p, copy=True) if hasattr(p, "dtype") else p, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the params: call tx.update(grads, opt_state, params)")
    d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype), state.ema, new)
    return updates, ParamsEmaState(state.count + 1, ema)
  return optax.GradientTransformation(init, update)


def make_optimizer(train: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, lr schedule) of `config.train` (a TrainConfig or the raw section, validated here)."""
  run = TrainConfig.from_config(train)
  schedule = lr_schedule(run)
  links = [optax.clip_by_global_norm(run.grad_clip) if run.grad_clip > 0 else optax.identity(),
           optax.adamw(schedule, b1=run.b1, b2=run.b2, eps=run.eps, weight_decay=run.weight_decay, mask=decay_mask)]
  if run.ema_decay:
    links.append(params_ema(run.ema_decay))
  return optax.chain(*links), schedule


def model_params(params: Any, opt_state: Any) -> Any:
  """The parameters to export and sample with: the moving average when the optimizer keeps one, else `params`."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEmaState))
           if isinstance(s, ParamsEmaState)]
  return found[0].ema if found else params


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        replicated: jax.sharding.Sharding) -> Any:
  """Optimizer-state shardings: param-shaped leaves (Adam moments) follow their parameter, the rest replicate."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                               transform_non_params=lambda _: replicated)
