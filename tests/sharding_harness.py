"""Compare a jitted function of (params, batch) on one device with the same under the test meshes.

JAX_NOTES §2: XLA:CPU SPMD silently computes wrong gradients for some layouts, so every rule set is checked by
running the real computation sharded and unsharded and comparing outputs leaf by leaf.
"""
from __future__ import annotations

import jax
import numpy as np

from nextstep_jax import sharding

TEST_MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


def run_on_mesh(fn, params, param_names, batch, mesh_shape, batch_names=None):
  """Runs jit(fn)(params, batch) with params placed per the logical rules and the batch over act_batch."""
  mesh = sharding.mesh_from_shape(mesh_shape)
  p_sh = sharding.tree_shardings(param_names, params, mesh)
  if batch_names is None:
    batch_names = jax.tree.map(lambda x: ("act_batch",) + (None,) * (x.ndim - 1), batch)
  b_sh = sharding.tree_shardings(batch_names, batch, mesh)
  with sharding.use_mesh(mesh):
    out = jax.jit(fn)(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
  return jax.device_get(out)


def max_relative_error(a, b) -> float:
  """max over leaves of ‖a − b‖ / max(‖b‖, tiny)."""
  errs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                         / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30)), a, b))
  return max(errs)
