"""Helpers for trainer tests: tiny train config, random (nothing-zero) parameters, running steps on a mesh."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, tiny
from nextstep_jax.data.pipeline import batch_shardings
from nextstep_jax.models.nextstep import abstract_params
from nextstep_jax.train.optimizer import make_optimizer
from nextstep_jax.train.state import init_state, state_shardings
from nextstep_jax.train.step import jit_train_step
from nextstep_jax.train.synthetic import synthetic_batch

TINY = ModelConfig.from_dict(tiny())


def train_cfg(**kw) -> ml_collections.ConfigDict:
  d = dict(lr=1e-3, end_lr=1e-4, warmup_steps=2, steps=10, schedule="cosine", b1=0.9, b2=0.95, eps=1e-8,
           weight_decay=0.1, grad_clip=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def random_params(cfg: ModelConfig, seed: int = 0):
  """Every leaf random (norm scales around 1): zero-initialised adaLN/output layers would make whole blocks'
  gradients exactly zero and hide sharding bugs there."""
  abstract, _ = abstract_params(cfg)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  out = {}
  for k, a in flat.items():
    x = rng.standard_normal(a.shape).astype(np.float32)
    fan_in = a.shape[-2] if len(a.shape) >= 2 else 1
    out[k] = 1 + 0.1 * x if k[-1] == "scale" else x / np.sqrt(max(fan_in, 1)) * (0.5 if len(a.shape) >= 2 else 0.1)
  return traverse_util.unflatten_dict(out)


def run_steps(mesh_shape, steps=3, microbatches=1, batch=16, seq_len=40, image_tokens=16, params=None, tcfg=None):
  """Runs `steps` train steps on synthetic batches; returns (final params, per-step metrics, first-step grads)."""
  from nextstep_jax.train.step import loss_and_grads
  cfg = TINY
  tx, sched = make_optimizer(tcfg or train_cfg())
  mesh = sharding.mesh_from_shape(mesh_shape)
  state = init_state(cfg, tx, mesh, jax.random.key(0), params=params)
  _, sh = state_shardings(cfg, tx, mesh)
  b0 = synthetic_batch(cfg, 0, batch, seq_len, image_tokens)
  bsh = batch_shardings({k: v.shape for k, v in b0.items()}, mesh)
  history = []
  with sharding.use_mesh(mesh):
    grads_fn = jax.jit(lambda p, b, k: loss_and_grads(cfg, p, b, jax.random.fold_in(k, 0), microbatches)[2])
    first = jax.device_put(b0, bsh)
    grads = jax.device_get(grads_fn(state.params, first, jax.random.key(1)))
    step = jit_train_step(cfg, tx, sched, microbatches, sh, bsh, mesh)
    for i in range(steps):
      state, m = step(state, jax.device_put(synthetic_batch(cfg, i, batch, seq_len, image_tokens), bsh),
                      jax.random.key(1))
      history.append(jax.device_get(m))
  return jax.device_get(state.params), history, grads
