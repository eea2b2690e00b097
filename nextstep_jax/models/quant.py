"""int8 weights with per-output-channel scales for the dense layers (backbone decoder; optionally the flow head).

Stored format: a quantized `DenseGeneral` keeps its param names — `kernel` becomes int8 (same shape) — and gains
`kernel_scale` (fp32, the kernel's output axes, plus its leading `layers` axis when stacked):
  kernel ≈ int8 · scale,  scale = max|kernel| over the contraction axes / 127.
The scales' logical names are the kernel's minus its contraction axes, so the one rule table shards them.
While `quantized_dense()` is active, every `DenseGeneral` holding a `kernel_scale` computes:
  CPU (measured faster: int8×int8→int32 dots read ¼ of fp32's bytes; converting the kernel to fp32 in the program
  materialises it every step, ~7× slower):  x_int8 = round(x / s_x) with a dynamic per-row scale s_x,
    y = (x_int8 · kernel_int8) · s_x · scale;
  TPU/GPU (XLA fuses the convert into the dot): weight-only, y = (x · kernel_int8.astype(x.dtype)) · scale.
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextstep_jax import sharding

MODES = ("int8",)
SCALE = "kernel_scale"
_IN_AXES = {"o_proj": 2}  # contraction axes of a kernel (DenseGeneral: (in…, out…)); 1 for every other layer


def _targets(path: tuple[str, ...], include_head: bool) -> bool:
  """Whether the kernel at `path` of the model's (stacked) tree is quantized: the decoder layers' dense kernels,
  with `include_head` also the flow head's."""
  if path[-1] != "kernel":
    return False
  return ("backbone" in path and "layers" in path) or (include_head and "image_head" in path)


def contraction_axes(path: tuple[str, ...]) -> tuple[int, ...]:
  """Contraction axes of the kernel at `path` (after the leading `layers` axis of scanned stacks)."""
  lead = 1 if "layers" in path or "res_blocks" in path else 0
  return tuple(range(lead, lead + _IN_AXES.get(path[-2], 1)))


def quantize_array(w: np.ndarray, contract: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(int8 kernel, fp32 scale without the contraction axes); |w − q·scale| ≤ scale/2 elementwise."""
  w = np.asarray(w, np.float32)
  scale = np.max(np.abs(w), axis=contract) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / np.expand_dims(scale, contract)), -127, 127).astype(np.int8)
  return q, scale


def dequantize_array(q: np.ndarray, scale: np.ndarray, contract: tuple[int, ...]) -> np.ndarray:
  return np.asarray(q, np.float32) * np.expand_dims(np.asarray(scale, np.float32), contract)


def quantize_params(params: Any, include_head: bool = False) -> Any:
  """Host-side: the model's float params tree ({"params": …}, scanned stacks) → the int8 tree (module docstring);
  `decode_layout.split_for_decode` applies to it as to the float tree."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, w in flat.items():
    if _targets(path, include_head) and path[:-1] + (SCALE,) not in flat:
      out[path], out[path[:-1] + (SCALE,)] = quantize_array(np.asarray(jax.device_get(w)), contraction_axes(path))
    else:
      out[path] = w
  return traverse_util.unflatten_dict(out)


def dequantize_params(params: Any) -> Any:
  """The int8 tree → float32 kernels (what `convert export-*` writes back)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, v in flat.items():
    if path[-1] == SCALE:
      continue
    if path[-1] == "kernel" and path[:-1] + (SCALE,) in flat:
      v = dequantize_array(np.asarray(v), np.asarray(flat[path[:-1] + (SCALE,)]), contraction_axes(path))
    out[path] = v
  return traverse_util.unflatten_dict(out)


def quantized_abstract(abstract: Any, names: Any, include_head: bool = False) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, logical-names tree) of the int8 layout of an abstract float params tree."""
  flat, flat_names = traverse_util.flatten_dict(abstract), traverse_util.flatten_dict(names)
  out, out_names = {}, {}
  for path, a in flat.items():
    out[path], out_names[path] = a, flat_names[path]
    if _targets(path, include_head):
      keep = [i for i in range(len(a.shape)) if i not in contraction_axes(path)]
      out[path] = jax.ShapeDtypeStruct(a.shape, jnp.int8)
      out[path[:-1] + (SCALE,)] = jax.ShapeDtypeStruct(tuple(a.shape[i] for i in keep), jnp.float32)
      kernel_names = flat_names[path]
      out_names[path[:-1] + (SCALE,)] = None if kernel_names is None else tuple(kernel_names[i] for i in keep)
  return traverse_util.unflatten_dict(out), traverse_util.unflatten_dict(out_names)


def is_quantized(params: Any) -> bool:
  return any(path[-1] == SCALE for path in traverse_util.flatten_dict(params))


# ----------------------------------------------------------------------------------------------- compute


def quantized_dot(x: jax.Array, q: jax.Array, scale: jax.Array, n_contract: int, dtype: Any,
                  weight_only: bool = False) -> jax.Array:
  """x (…, I₁…Iₙ) · dequant(q (I₁…Iₙ, O…), scale (O…)) → (…, O…) in `dtype` (paths: module docstring);
  `weight_only`: the TPU/GPU path everywhere (training through int8 weights: rounding x has no gradient)."""
  x_axes = tuple(range(x.ndim - n_contract, x.ndim))
  dims = ((x_axes, tuple(range(n_contract))), ((), ()))
  if sharding.target_platform() == "cpu" and not weight_only:
    x32 = x.astype(jnp.float32)
    s_x = jnp.max(jnp.abs(x32), axis=x_axes, keepdims=True) / 127.0
    s_x = jnp.where(s_x > 0, s_x, 1.0)
    x_q = jnp.clip(jnp.round(x32 / s_x), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(x_q, q, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    s_x = s_x.reshape(s_x.shape[:x.ndim - n_contract] + (1,) * (q.ndim - n_contract))
    return (acc * s_x * scale).astype(dtype)
  y = jax.lax.dot_general(x.astype(dtype), q.astype(dtype), dims, preferred_element_type=jnp.float32)
  return (y * scale).astype(dtype)


def _interceptor(weight_only: bool):
  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    if (context.method_name != "__call__" or not isinstance(mod, nn.DenseGeneral)
        or not mod.has_variable("params", SCALE)):
      return next_fun(*args, **kwargs)
    x = args[0]
    axis = (mod.axis,) if isinstance(mod.axis, int) else tuple(mod.axis)
    y = quantized_dot(x, mod.get_variable("params", "kernel"), mod.get_variable("params", SCALE), len(axis),
                      mod.dtype or x.dtype, weight_only)
    if mod.use_bias:
      y = y + mod.get_variable("params", "bias").astype(y.dtype)
    return y
  return intercept


@contextlib.contextmanager
def quantized_dense(weight_only: bool = False):
  """Within this context (while tracing), DenseGeneral layers holding a `kernel_scale` run the int8 dot
  (`weight_only`: dequantize the kernel into the dot on every platform, as training through it needs)."""
  with nn.intercept_methods(_interceptor(weight_only)):
    yield
