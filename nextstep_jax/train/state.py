"""Train state (step, fp32 master params, optimizer state, skipped-update counter), born sharded on the mesh."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from etils import epath

from nextstep_jax import params_io, sharding
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.config import ModelConfig
from nextstep_jax.models.nextstep import abstract_params, init_fn
from nextstep_jax.train.optimizer import opt_state_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array  # updates skipped by the NaN/Inf guard


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh,
                    init: Any = None) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs carrying shardings, TrainState of shardings); `init(rng)` → the
  boxed tree the state optimises (default: the model's params)."""
  init = init or init_fn(cfg)[1]
  boxed = jax.eval_shape(init, jax.random.key(0))
  abstract_params, names = nn.unbox(boxed), sharding.logical_names(boxed)
  p_sh = sharding.tree_shardings(names, abstract_params, mesh)
  rep = NamedSharding(mesh, P())
  shardings = TrainState(step=rep, params=p_sh, opt_state=opt_state_shardings(tx, abstract_params, p_sh, rep),
                         skipped=rep)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=jax.eval_shape(tx.init, abstract_params),
                        skipped=jax.ShapeDtypeStruct((), jnp.int32))
  return sharding.abstract_sharded(abstract, shardings), shardings


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, rng: jax.Array,
               params: Any = None, init: Any = None) -> TrainState:
  """Fresh state born sharded; given `params` (e.g. a previous stage's) replace the initialised ones where present.
  `init`: as in `state_shardings`."""
  init = init or init_fn(cfg)[1]
  _, shardings = state_shardings(cfg, tx, mesh, init)

  def make(rng, given):
    p = nn.unbox(init(rng))
    if given is not None:
      p = merge_params(p, given)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), skipped=jnp.zeros((), jnp.int32))
  with sharding.use_mesh(mesh):
    given = None if params is None else jax.device_put(params, _given_shardings(params, shardings.params))
    return jax.jit(make, out_shardings=shardings)(rng, given)


def load_init_params(path: str, cfg: ModelConfig, mesh) -> Any:
  """Params of a previous stage: an export dir (params/) or a training workdir (its latest checkpoint)."""
  root = epath.Path(path)
  abstract, names = abstract_params(cfg)
  shardings = sharding.tree_shardings(names, abstract, mesh)
  if (root / "params").exists():  # restored straight onto the mesh (every process reads its shards); an export
    # may hold a subset of the model (a Qwen LM for stage 1): its own leaves, on the model's shardings
    flat = flax.traverse_util.flatten_dict(shardings)
    rep = NamedSharding(mesh, P())
    target = {k: jax.ShapeDtypeStruct(s, d, sharding=flat.get(k, rep))
              for k, (s, d) in params_io.param_metadata(root / "params").items()}
    return params_io.load_params(root / "params", flax.traverse_util.unflatten_dict(target))
  if (root / "checkpoints").exists():
    target = sharding.abstract_sharded(abstract, shardings)
    ckpt = Checkpointer(path, save_every=1)
    try:
      return ckpt.restore_params(None, target)
    finally:
      ckpt.close()
  raise FileNotFoundError(f"config.train.init_from={path!r} is neither an export (params/) nor a training "
                          f"workdir (checkpoints/); point it at the previous stage's WORKDIR or WORKDIR/export")


def _given_shardings(given: Any, param_shardings: Any) -> Any:
  flat_sh = flax.traverse_util.flatten_dict(param_shardings)
  flat = flax.traverse_util.flatten_dict(given)
  return flax.traverse_util.unflatten_dict({k: flat_sh[k] for k in flat})


def merge_params(fresh: Any, given: Any) -> Any:
  """`fresh` with every leaf that `given` has replaced (same path; shapes must match; dtype cast to fresh's)."""
  flat = flax.traverse_util.flatten_dict(fresh)
  for k, v in flax.traverse_util.flatten_dict(given).items():
    if k not in flat:
      raise KeyError(f"init_from has parameter {'/'.join(k)} that the model does not; is it the same architecture?")
    if tuple(flat[k].shape) != tuple(v.shape):
      raise ValueError(f"init_from parameter {'/'.join(k)} has shape {tuple(v.shape)}, model expects "
                       f"{tuple(flat[k].shape)}; check config.model against the previous stage")
    flat[k] = v.astype(flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat)


