"""Low-rank adapters (LoRA) on the model's dense layers, held in their own variable collection `"lora"`.

For a targeted `DenseGeneral` whose `params/…/kernel` has shape (lead…, in…, out…) (lead: the scanned `layers`
axis, if any) and logical names (lead, in, out), the collection holds, at the same module path,
  a (lead…, in…, r)  names (lead, in, "lora_rank")   — random N(0, 1/fan_in)
  b (lead…, r, out…) names (lead, "lora_rank", out)  — zeros, so a fresh adapter changes nothing
and while `lora_dense(rank, alpha, dropout)` is active every such layer computes
  y = base(x) + (dropout(x) · a) · b · alpha / r
(`base` is the layer itself, or the int8 dot of `models/quant.py` when the params hold `kernel_scale`; enter
`lora_dense` outside `quantized_dense`). The model is applied to {"params": base, "lora": adapters}; the scans over
layers map `"lora"` like `"params"`. Adapters stay fp32 (the branch computes in the layer's dtype); `merge`
folds them into float kernels: kernel + a·b·alpha/r.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextstep_jax import sharding
from nextstep_jax.models import quant
from nextstep_jax.models.layers import mixed_dot

COLLECTION = "lora"
RANK_AXIS = "lora_rank"

# target name → the module paths (inside params) it selects; a path matches when it starts with the prefix and
# ends with one of the module names ("*": every dense kernel under the prefix)
TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "q": (("backbone", "layers", "self_attn"), "q_proj"),
    "k": (("backbone", "layers", "self_attn"), "k_proj"),
    "v": (("backbone", "layers", "self_attn"), "v_proj"),
    "o": (("backbone", "layers", "self_attn"), "o_proj"),
    "gate": (("backbone", "layers", "mlp"), "gate_proj"),
    "up": (("backbone", "layers", "mlp"), "up_proj"),
    "down": (("backbone", "layers", "mlp"), "down_proj"),
    "head": (("image_head",), "*"),  # every linear of the flow head
    "image_in": ((), "image_in_projector"),
    "image_out": ((), "image_out_projector"),
}


def _selected(path: tuple[str, ...], targets: tuple[str, ...]) -> bool:
  """Whether the kernel at `path` ("params", …, module, "kernel") is adapted by one of `targets`."""
  if path[0] != "params" or path[-1] != "kernel":
    return False
  mod = path[1:-1]
  for t in targets:
    prefix, name = TARGETS[t]
    if mod[:len(prefix)] == prefix and (name == "*" or mod[-1] == name) and (name == "*" or len(mod) == len(prefix) + 1):
      return True
  return False


def adapter_layout(abstract: Any, names: Any, rank: int, targets: tuple[str, ...]) -> tuple[dict, dict]:
  """({"lora": ShapeDtypeStruct tree}, logical-names tree) of the adapters of an abstract base params tree
  ({"params": …}; int8 kernels count as float ones)."""
  flat, flat_names = traverse_util.flatten_dict(abstract), traverse_util.flatten_dict(names)
  out, out_names = {}, {}
  for path, k in flat.items():
    if not _selected(path, targets):
      continue
    contract = quant.contraction_axes(path)
    lead, last_in = contract[0], contract[-1] + 1
    kn = tuple(flat_names[path])
    mod = (COLLECTION,) + path[1:-1]
    out[mod + ("a",)] = jax.ShapeDtypeStruct(k.shape[:last_in] + (rank,), jnp.float32)
    out_names[mod + ("a",)] = kn[:last_in] + (RANK_AXIS,)
    out[mod + ("b",)] = jax.ShapeDtypeStruct(k.shape[:lead] + (rank,) + k.shape[last_in:], jnp.float32)
    out_names[mod + ("b",)] = kn[:lead] + (RANK_AXIS,) + kn[last_in:]
  if not out:
    raise ValueError(f"config.lora.targets={list(targets)} select no dense layer of this model")
  return traverse_util.unflatten_dict(out), traverse_util.unflatten_dict(out_names)


def init_adapters(rng: jax.Array, layout: Any, names: Any) -> Any:
  """Boxed (logically named) fresh adapters of `layout`: a ~ N(0, 1/fan_in), b = 0."""
  flat, flat_names = traverse_util.flatten_dict(layout), traverse_util.flatten_dict(names)
  out = {}
  for i, (path, s) in enumerate(sorted(flat.items())):
    if path[-1] == "a":
      fan_in = math.prod(s.shape[_lead(("params",) + path[1:-1] + ("kernel",)):-1])
      v = jax.random.normal(jax.random.fold_in(rng, i), s.shape, jnp.float32) / math.sqrt(fan_in)
    else:
      v = jnp.zeros(s.shape, jnp.float32)
    out[path] = nn.LogicallyPartitioned(v, names=tuple(flat_names[path]))
  return traverse_util.unflatten_dict(out)


def count(adapters: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


# ----------------------------------------------------------------------------------------------- compute


def _dot(x: jax.Array, k: jax.Array, n: int) -> jax.Array:
  """x (…, I₁…Iₙ) · k (I₁…Iₙ, O…) in x's dtype (the dense layers' CPU dot on CPU)."""
  k = k.astype(x.dtype)
  if sharding.target_platform() == "cpu":
    return mixed_dot(x, k, n)
  dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
  return jax.lax.dot_general(x, k, dims, preferred_element_type=jnp.float32).astype(x.dtype)


def _intercept(scale: float, dropout: float):
  def intercept(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    mod = context.module
    if (context.method_name != "__call__" or not isinstance(mod, nn.DenseGeneral)
        or not mod.has_variable(COLLECTION, "a")):
      return y
    a, b = mod.get_variable(COLLECTION, "a"), mod.get_variable(COLLECTION, "b")
    x = args[0]
    n_in = a.ndim - 1
    if dropout > 0:
      keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    delta = _dot(_dot(x.astype(y.dtype), a, n_in), b, 1)
    return y + (delta * jnp.asarray(scale, delta.dtype)).astype(y.dtype)
  return intercept


@contextlib.contextmanager
def lora_dense(rank: int, alpha: float, dropout: float = 0.0):
  """Within this context (while tracing) the DenseGeneral layers that hold `"lora"` a, b add their low-rank
  branch; `dropout` > 0 needs a "dropout" rng in `apply`."""
  with nn.intercept_methods(_intercept(alpha / rank, dropout)):
    yield


# ----------------------------------------------------------------------------------------------- merge


def _lead(path: tuple[str, ...]) -> int:
  """Leading (stacked) axes of the kernel at `path`: 1 under a scan over layers / res blocks, else 0."""
  return quant.contraction_axes(path)[0]


def delta_kernel(a: jax.Array, b: jax.Array, lead: int, scale: float) -> jax.Array:
  """a (lead…, in…, r) · b (lead…, r, out…) · scale → the kernel's shape (lead…, in…, out…), in fp32."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  r = a.shape[-1]
  d = jnp.matmul(a.reshape(a.shape[:lead] + (-1, r)), b.reshape(b.shape[:lead] + (r, -1)),
                 precision=jax.lax.Precision.HIGHEST) * scale
  return d.reshape(a.shape[:-1] + b.shape[lead + 1:])


def check_compatible(base_abstract: Any, adapters: Any, where: str) -> None:
  """Raises ValueError (one line) unless every adapter sits on a base kernel of matching shape."""
  flat, flat_ad = traverse_util.flatten_dict(base_abstract), traverse_util.flatten_dict(adapters)
  for path, a in flat_ad.items():
    if path[-1] != "a":
      continue
    kpath = ("params",) + path[1:-1] + ("kernel",)
    b = flat_ad[path[:-1] + ("b",)]
    name = "/".join(path[1:-1])
    if kpath not in flat:
      raise ValueError(f"{where}: adapter {name} has no base kernel params/{name}/kernel; the adapters were "
                       f"trained on another architecture")
    want = tuple(a.shape[:-1]) + tuple(b.shape[_lead(kpath) + 1:])
    if tuple(flat[kpath].shape) != want:
      raise ValueError(f"{where}: adapter {name} fits a kernel of shape {want} but the base has "
                       f"{tuple(flat[kpath].shape)}; load the adapters onto the base they were trained on")


def merge(base: Any, adapters: Any, rank: int, alpha: float, int8_dtype: Any = jnp.float32) -> Any:
  """The base params ({"params": …}, float or int8) with every adapted kernel replaced by kernel + a·b·alpha/r,
  added in fp32 and cast back to the kernel's dtype; int8 kernels are dequantized to `int8_dtype` and their
  scales dropped. Traceable (jit it to merge on the mesh) and host-callable."""
  check_compatible(base, adapters, "merge")
  flat, ad = traverse_util.flatten_dict(base), traverse_util.flatten_dict(adapters)
  out = {}
  for path, w in flat.items():
    if path[-1] == quant.SCALE:
      continue
    scale_path = path[:-1] + (quant.SCALE,)
    dtype = w.dtype
    if path[-1] == "kernel" and scale_path in flat:
      contract = quant.contraction_axes(path)
      w = w.astype(jnp.float32) * jnp.expand_dims(flat[scale_path].astype(jnp.float32), contract)
      dtype = jnp.dtype(int8_dtype)
    apath = (COLLECTION,) + path[1:-1] + ("a",)
    if path[-1] == "kernel" and apath in ad:
      w = w.astype(jnp.float32) + delta_kernel(ad[apath], ad[apath[:-1] + ("b",)], _lead(path), alpha / rank)
    out[path] = jnp.asarray(w).astype(dtype)
  return traverse_util.unflatten_dict(out)
