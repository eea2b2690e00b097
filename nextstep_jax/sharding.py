"""The one place that knows mesh axes: mesh construction, the logical→mesh rule table, born-sharded init.

Mesh axes are `data`, `fsdp`, `tensor`. Modules only use *logical* names (see `LOGICAL_RULES`); this module
resolves them to `PartitionSpec`s against a concrete mesh and shape: a rule is skipped when its mesh axes are
already used by an earlier dimension or do not divide the dimension, so any mesh produces a valid sharding.

The table is Megatron-shaped (row-parallel kernels are `(tensor, fsdp)` when column-parallel ones are
`(fsdp, tensor)`): JAX_NOTES §2 found XLA:CPU computing wrong gradients when two chained kernels share one
layout, and tests/test_sharding_parity.py guards every rule here against that.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes) — earlier entries win; a name may appear several times as fallbacks.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_batch", "data"),
    ("act_batch", "fsdp"),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_head_dim", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("token", None),  # 64-d image token
    ("fm_embed", "fsdp"),  # flow-head width
    ("fm_mlp", "tensor"),  # flow-head hidden / modulation outputs
    ("fm_freq", None),  # sinusoidal time features
    ("lora_rank", None),  # the low-rank axis of LoRA adapters (models/lora.py)
    # VAE (small; convolutions are kept replicated except their channel-out axis)
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("nextstep_mesh", default=None)


class MeshError(ValueError):
  """The requested mesh does not fit the available devices."""


# ----------------------------------------------------------------------------------------------- mesh


def _resolve_sizes(sizes: Sequence[int], total: int, what: str) -> list[int]:
  sizes = list(sizes)
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError(f"{what}: at most one axis may be -1 (\"the rest\"), got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if free:
    if total % fixed:
      raise MeshError(f"{what}: {dict(zip(MESH_AXES, sizes))} cannot fill {total} devices "
                      f"({total} is not a multiple of {fixed}); change the fixed axis sizes")
    sizes[free[0]] = total // fixed
  if math.prod(sizes) != total:
    raise MeshError(f"{what}: {' × '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes))} = {math.prod(sizes)} devices "
                    f"but {total} are available; set one axis to -1 (e.g. --config.mesh.data=-1) to use the rest")
  return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh from `config.mesh` (ici sizes + optional dcn_* sizes for multislice).

  `devices` defaults to `jax.devices()`; pass compile-only TPU devices for AOT.
  """
  devices = list(jax.devices() if devices is None else devices)
  get = (lambda k, d: mesh_cfg.get(k, d)) if hasattr(mesh_cfg, "get") else (lambda k, d: getattr(mesh_cfg, k, d))
  dcn = [int(get(f"dcn_{a}", 1)) for a in MESH_AXES]
  num_slices = _num_slices(devices) if -1 in dcn else math.prod(dcn)
  dcn = _resolve_sizes(dcn, num_slices, "config.mesh dcn_* sizes")
  if len(devices) % num_slices:
    raise MeshError(f"config.mesh: {len(devices)} devices cannot be split into {num_slices} slices")
  ici = _resolve_sizes([int(get(a, 1)) for a in MESH_AXES], len(devices) // num_slices, "config.mesh")
  if num_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.asarray(devices, dtype=object).reshape(ici)
  return _mesh(arr)


def _num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def _mesh(device_array: np.ndarray) -> Mesh:
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_shape(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with explicit (data, fsdp, tensor) sizes over the first prod(shape) devices (tests, benchmarks)."""
  if devices is None:
    devices = jax.devices()[:math.prod(shape)]
  return make_mesh(dict(zip(MESH_AXES, shape)), devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Makes `mesh` the active mesh for `constrain` (activation shardings) and the splash-attention shard_map."""
  token = _MESH.set(mesh)
  try:
    yield mesh
  finally:
    _MESH.reset(token)


def active_mesh() -> Mesh | None:
  return _MESH.get()


def target_platform() -> str:
  """Platform the code is being compiled for: the active mesh's devices (AOT topologies too), else the default."""
  mesh = active_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


# ----------------------------------------------------------------------------------------------- rules


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """Resolves logical dimension names to a PartitionSpec valid for `shape` on `mesh`."""
  if names is None:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    chosen = None
    for rule_name, axes in rules:
      if rule_name != name or axes is None:
        continue
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
      if not axes_t or used.intersection(axes_t):
        continue
      if dim % math.prod(mesh.shape[a] for a in axes_t):
        continue
      chosen = axes_t[0] if len(axes_t) == 1 else axes_t
      used.update(axes_t)
      break
    out.append(chosen)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when no mesh is active (single-device code)."""
  mesh = _MESH.get()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def logical_names(boxed_tree: Any) -> Any:
  """Tree of logical-name tuples (or None) for a tree of `nn.LogicallyPartitioned` boxes / plain leaves."""
  return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def tree_shardings(names_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logical names and a matching tree of arrays / ShapeDtypeStructs."""
  flat_names = jax.tree.leaves(names_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))
  flat_shapes, treedef = jax.tree.flatten(shapes_tree)
  if len(flat_names) != len(flat_shapes):
    raise ValueError(f"sharding names ({len(flat_names)} leaves) do not match the tree ({len(flat_shapes)} leaves)")
  return treedef.unflatten([NamedSharding(mesh, logical_to_spec(n, s.shape, mesh))
                            for n, s in zip(flat_names, flat_shapes)])


def abstract_sharded(shapes_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes_tree` carrying `shardings` (restore targets, AOT arguments)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes_tree, shardings)


def sharded_abstract_params(abstract: Any, names: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of a parameter tree on the rule table's shardings for `mesh`."""
  return abstract_sharded(abstract, tree_shardings(names, abstract, mesh))


def abstract_with_names(init_fn: Callable[..., Any], *args) -> tuple[Any, Any]:
  """`jax.eval_shape(init_fn)` split into (unboxed ShapeDtypeStruct tree, logical names tree); no allocation."""
  boxed = jax.eval_shape(init_fn, *args)
  return nn.unbox(boxed), logical_names(boxed)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` so every parameter is born on its sharding; returns (params, shardings)."""
  abstract, names = abstract_with_names(init_fn, *args)
  shardings = tree_shardings(names, abstract, mesh)
  with use_mesh(mesh):
    params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def replicated_fraction(abstract: Any, shardings: Any) -> float:
  """Fraction of parameters whose sharding uses no mesh axis of size > 1 (fully replicated)."""
  total = replicated = 0
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    n = math.prod(leaf.shape)
    total += n
    if all(ax is None for ax in sh.spec):
      replicated += n
  return replicated / max(total, 1)


def assert_params_sufficiently_sharded(abstract: Any, shardings: Any, max_replicated: float = 0.02) -> float:
  """Raises when more than `max_replicated` of all parameters would be replicated on every device."""
  frac = replicated_fraction(abstract, shardings)
  if frac > max_replicated:
    raise MeshError(f"{frac:.2%} of parameters are fully replicated (limit {max_replicated:.0%}); "
                    f"add fsdp/tensor axes to the mesh or sharding rules for the large tensors")
  return frac
