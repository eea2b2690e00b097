"""The flow-matching head (official `SimpleMLPAdaLN`): predicts the velocity of a 64-d image token.

  y = time_embed(t) + cond_embed(c);  x = input_proj(x_t)
  N × ResBlock: (shift, scale, gate) = adaLN(SiLU(y)); x += gate · MLP(LN(x)·(1+scale)+shift)
  FinalLayer:   (shift, scale) = adaLN(SiLU(y)); v = Linear(LN(x)·(1+scale)+shift)

Shapes: x_t (N, token_dim), t (N,) in [0, 1] (0 = noise, 1 = data), c (N, hidden) → velocity (N, token_dim).
Width 1536, depth 12, condition 5120 gives exactly 157,228,096 parameters.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.models.layers import dense, logical, parameter_free_layer_norm, to_dtype

FREQ_DIM = 256
_XAVIER = nn.initializers.xavier_uniform()
_ZERO = nn.initializers.zeros_init()


def timestep_features(t_N: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
  """[cos(t·f_i), sin(t·f_i)] with f_i = exp(−ln(max_period)·i/(dim/2)); fp32 (N, dim); t is not scaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_N.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class _Dense:
  """Dense factory bound to the head's dtypes."""

  def __init__(self, cfg: ModelConfig):
    self.kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))

  def __call__(self, features, in_name, out_name, name, init=_XAVIER):
    return dense(features, (in_name,), (out_name,), use_bias=True, name=name, kernel_init=init, **self.kw)


class TimestepEmbedder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, t_N: jax.Array) -> jax.Array:
    d = _Dense(self.cfg)
    w = self.cfg.fm_head_dim
    h = d(w, "fm_freq", "fm_mlp", "mlp_0", nn.initializers.normal(0.02))(timestep_features(t_N))
    return d(w, "fm_mlp", "fm_embed", "mlp_2", nn.initializers.normal(0.02))(nn.silu(h))


class AdaLNLayerNorm(nn.Module):
  """LayerNorm (eps 1e-6, fp32) with optional affine parameters."""
  affine: bool
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = parameter_free_layer_norm(x.astype(jnp.float32), 1e-6)
    if self.affine:
      w = x.shape[-1]
      y = y * self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (w,), self.param_dtype)
      y = y + self.param("bias", logical(_ZERO, ("norm",)), (w,), self.param_dtype)
    return y.astype(x.dtype)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class ResBlock(nn.Module):
  """AdaLN residual MLP block (mlp_ratio 1); scanned, so it returns (x, None)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxW, y_NxW):
    d = _Dense(self.cfg)
    w = self.cfg.fm_head_dim
    shift, scale, gate = jnp.split(d(3 * w, "fm_embed", "fm_mlp", "adaLN_modulation", _ZERO)(nn.silu(y_NxW)), 3, -1)
    h = modulate(AdaLNLayerNorm(True, to_dtype(self.cfg.param_dtype), name="in_ln")(x_NxW), shift, scale)
    h = d(w, "fm_embed", "fm_mlp", "mlp_0")(h)
    h = d(w, "fm_mlp", "fm_embed", "mlp_2")(nn.silu(h))
    return x_NxW + gate * h, None


class FinalLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxW, y_NxW):
    d = _Dense(self.cfg)
    w = self.cfg.fm_head_dim
    shift, scale = jnp.split(d(2 * w, "fm_embed", "fm_mlp", "adaLN_modulation", _ZERO)(nn.silu(y_NxW)), 2, -1)
    h = modulate(AdaLNLayerNorm(False)(x_NxW), shift, scale)
    return d(self.cfg.token_dim, "fm_embed", "token", "linear", _ZERO)(h)


class FlowHead(nn.Module):
  """SimpleMLPAdaLN. `__call__(x_t, t, c) -> velocity` (fp32 out). Res blocks are scanned (`res_blocks` axis 0)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxT: jax.Array, t_N: jax.Array, c_NxC: jax.Array) -> jax.Array:
    cfg = self.cfg
    d = _Dense(cfg)
    dtype = to_dtype(cfg.dtype)
    x_NxT, c_NxC = (sharding.constrain(a, ("act_batch", None)) for a in (x_NxT, c_NxC))
    y = TimestepEmbedder(cfg, name="time_embed")(t_N) + d(cfg.fm_head_dim, "mlp", "fm_embed", "cond_embed")(
        c_NxC.astype(dtype))
    y = sharding.constrain(y, ("act_batch", None))
    x = d(cfg.fm_head_dim, "token", "fm_embed", "input_proj")(x_NxT.astype(dtype))
    blocks = nn.scan(ResBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,), length=cfg.fm_head_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(cfg, name="res_blocks")(x, y)
    return FinalLayer(cfg, name="final_layer")(x, y).astype(jnp.float32)
