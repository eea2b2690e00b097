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
from nextstep_jax.train.step import jit_train_step, loss_and_grads
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


def perturbed(params, seed: int):
  """Every leaf scaled by 1 + 5 % noise: a frozen reference near, not equal to, the policy."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x * (1 + 0.05 * rng.standard_normal(x.shape).astype(np.float32)), params)


def train_on_mesh(mesh_shape, batches, jit_step, grads_fn, params=None, tcfg=None, bound=None, init=None):
  """The trainer tests' skeleton: optimizer → state born sharded on the mesh → batch shardings → jit → loop.

  `jit_step(tx, sched, state_shardings, batch_shardings, mesh)` → jitted step(state, [bound,] batch, key);
  `grads_fn(params, [bound,] batch)` → the first batch's gradients (None: not computed); `bound(state_shardings)` → inputs bound into
  every step (e.g. a DPO reference on the params' shardings; LoRA's base); `init`: the state's params init (LoRA:
  the adapters; default the model). Returns (final params, per-step metrics, grads)."""
  tx, sched = make_optimizer(tcfg or train_cfg())
  mesh = sharding.mesh_from_shape(mesh_shape)
  state = init_state(TINY, tx, mesh, jax.random.key(0), params=params, init=init)
  _, sh = state_shardings(TINY, tx, mesh, init)
  extra = () if bound is None else (bound(sh),)
  bsh = batch_shardings({k: v.shape for k, v in batches[0].items()}, mesh)
  history = []
  with sharding.use_mesh(mesh):
    grads = None if grads_fn is None else jax.device_get(
        jax.jit(grads_fn)(state.params, *extra, jax.device_put(batches[0], bsh)))
    step = jit_step(tx, sched, sh, bsh, mesh)
    for b in batches:
      state, m = step(state, *extra, jax.device_put(b, bsh), jax.random.key(1))
      history.append(jax.device_get(m))
  return jax.device_get(state.params), history, grads


def run_steps(mesh_shape, steps=3, microbatches=1, batch=16, seq_len=40, image_tokens=16, params=None, tcfg=None):
  """Runs `steps` train steps on synthetic batches; returns (final params, per-step metrics, first-step grads)."""
  batches = [synthetic_batch(TINY, i, batch, seq_len, image_tokens) for i in range(steps)]
  jit_step = lambda tx, sched, sh, bsh, mesh: jit_train_step(TINY, tx, sched, microbatches, sh, bsh, mesh)
  return train_on_mesh(
      mesh_shape, batches, jit_step,
      lambda p, b: loss_and_grads(TINY, p, b, jax.random.fold_in(jax.random.key(1), 0), microbatches)[2],
      params=params, tcfg=tcfg)
