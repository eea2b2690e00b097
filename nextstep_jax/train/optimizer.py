"""AdamW with the official recipe: β (0.9, 0.95), eps 1e-8, weight decay 0.1 except on biases and norm weights,
global-norm clipping 1.0, linear warmup then cosine (or constant) learning rate."""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

NO_DECAY_LEAVES = ("bias", "scale")  # biases and RMSNorm/LayerNorm weights


def lr_schedule(t: Any) -> optax.Schedule:
  """`config.train`: lr, end_lr, warmup_steps, steps, schedule ("cosine" | "constant")."""
  warmup = optax.linear_schedule(0.0, t.lr, max(int(t.warmup_steps), 1))
  if t.schedule == "constant":
    main = optax.constant_schedule(t.lr)
  elif t.schedule == "cosine":
    decay_steps = max(int(t.steps) - int(t.warmup_steps), 1)
    main = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.end_lr / t.lr if t.lr else 0.0)
  else:
    raise ValueError(f"config.train.schedule={t.schedule!r} is not one of cosine, constant")
  return optax.join_schedules([warmup, main], [int(t.warmup_steps)])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every leaf except biases and norm weights."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] not in NO_DECAY_LEAVES for k in flat})


def make_optimizer(t: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = lr_schedule(t)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        replicated: jax.sharding.Sharding) -> Any:
  """Optimizer-state shardings: param-shaped leaves (Adam moments) follow their parameter, the rest replicate."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                               transform_non_params=lambda _: replicated)
