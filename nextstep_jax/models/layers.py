"""Shared Linen building blocks with logical axis names: dense layers, RMSNorm, rotate-half RoPE, dtype helpers."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import sharding

Initializer = Callable[..., jax.Array]


def to_dtype(name: str | Any) -> Any:
  """'bfloat16' → jnp.bfloat16 (dtypes pass through)."""
  return jnp.dtype(name) if isinstance(name, str) else name


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """An initializer whose parameter carries logical axis `names`."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int | Sequence[int], in_names: Sequence[str], out_names: Sequence[str], *, use_bias: bool,
          dtype: Any, param_dtype: Any, name: str, axis: int | Sequence[int] = -1,
          kernel_init: Initializer = nn.initializers.lecun_normal(),
          bias_init: Initializer = nn.initializers.zeros_init()) -> nn.DenseGeneral:
  """DenseGeneral with kernel axes `in_names + out_names` and bias axes `out_names`. For CPU targets the dot is
  `mixed_dot`: half-precision compute stays half (XLA:CPU would otherwise upcast every bf16 dot, forward and
  backward, to fp32), and in fp32 its explicit 2-D backward spares XLA:CPU slow transposed copies of the
  activation gradients (the demo's train step: −12 %). TPU/GPU programs use the plain dot."""
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=logical(kernel_init, tuple(in_names) + tuple(out_names)),
      bias_init=logical(bias_init, tuple(out_names)),
      dot_general=_dense_dot if sharding.target_platform() == "cpu" else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot(x: jax.Array, k: jax.Array, n: int) -> jax.Array:
  """x (…, I₁…Iₙ) · k (I₁…Iₙ, O…) → (…, O…) in x's dtype, accumulated in fp32; the backward dots take the
  cotangent in x's dtype too (plain autodiff would feed them an fp32 cotangent, i.e. fp32 dots).

  Every dot (but the fp32 forward, which is the plain dot) is 2-D with the lhs contracted on its last axis; the
  weight gradient's transposed input is materialised behind an optimization barrier so XLA cannot fold it back
  into the dot: XLA:CPU runs bf16×bf16→fp32 only in its library (YNNPACK) path, and its fallback kernel rejects
  that type combination."""
  if jnp.dtype(x.dtype).itemsize >= 4:  # fp32: the plain dot (the forward-only decode program is unchanged)
    return jax.lax.dot_general(x, k, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
  x2, k2 = _as_matrices(x, k, n)
  return _matmul(x2, k2).astype(x.dtype).reshape(x.shape[:x.ndim - n] + k.shape[n:])


def _as_matrices(x, k, n):
  """x → (M, I), k → (I, O) with I the product of the n contracted axes."""
  ins = int(np.prod(x.shape[x.ndim - n:], dtype=np.int64))
  return x.reshape(-1, ins), k.reshape(ins, -1)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mixed_dot_fwd(x, k, n):
  return mixed_dot(x, k, n), (x, k)


def _mixed_dot_bwd(n, res, g):
  x, k = res
  x2, k2 = _as_matrices(x, k, n)
  g2 = g.astype(x.dtype).reshape(x2.shape[0], k2.shape[1])
  dx = jax.lax.dot_general(g2, k2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dk = _matmul(jax.lax.optimization_barrier(x2.T), g2)
  return dx.astype(x.dtype).reshape(x.shape), dk.astype(k.dtype).reshape(k.shape)


mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def _dense_dot(lhs, rhs, dims, precision=None, preferred_element_type=None):
  """DenseGeneral's dot (trailing input axes · leading kernel axes, no batch axes) as `mixed_dot`."""
  (lc, rc), (lb, rb) = dims
  n = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rc) != tuple(range(n)):
    return jax.lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)
  return mixed_dot(lhs, rhs, n)


class RMSNorm(nn.Module):
  """Llama/Qwen RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(x.dtype).astype(self.dtype)


def rope_cos_sin(positions_BxL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotate-half RoPE tables (B, L, head_dim) in fp32 for integer positions."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxK: jax.Array, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array) -> jax.Array:
  """x·cos + rotate_half(x)·sin, computed in fp32 and cast back to x's dtype."""
  x = x_BxLxHxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxLxK[:, :, None, :] + rotated * sin_BxLxK[:, :, None, :]
  return out.astype(x_BxLxHxK.dtype)


def parameter_free_layer_norm(x: jax.Array, eps: float = 1e-6, axis: int | tuple[int, ...] = -1) -> jax.Array:
  """LayerNorm without affine parameters (biased variance), in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=axis, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
