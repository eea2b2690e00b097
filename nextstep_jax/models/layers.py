"""Shared Linen building blocks with logical axis names: dense layers, RMSNorm, rotate-half RoPE, dtype helpers."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  """DenseGeneral with kernel axes `in_names + out_names` and bias axes `out_names`."""
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=logical(kernel_init, tuple(in_names) + tuple(out_names)),
      bias_init=logical(bias_init, tuple(out_names)))


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
