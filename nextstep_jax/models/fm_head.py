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


def split_modulation(mod_NxkW: jax.Array, k: int) -> list[jax.Array]:
  """The k chunks [shift ‖ scale (‖ gate)] of an adaLN output, after gathering its feature axis.

  XLA's SPMD partitioner miscomputes chunks of one batch-sharded product when one goes through a row-parallel
  (tensor, fsdp) kernel and multiplies another (O(1) wrong on the (2,2,2) mesh whatever the first kernel's
  sharding; negative control in tests/test_sharding.py)."""
  return jnp.split(sharding.constrain(mod_NxkW, ("act_batch", None)), k, -1)


class ResBlock(nn.Module):
  """AdaLN residual MLP block (mlp_ratio 1); scanned, so `__call__` returns (x, None).

  `modulation(y)` → (…, 3W) [shift ‖ scale ‖ gate] and `step(x, mod)` split the call so that a sampler can
  compute the modulations of all flow times at once."""
  cfg: ModelConfig

  def setup(self):
    d = _Dense(self.cfg)
    w = self.cfg.fm_head_dim
    self.adaLN_modulation = d(3 * w, "fm_embed", "fm_mlp", "adaLN_modulation", _ZERO)
    self.in_ln = AdaLNLayerNorm(True, to_dtype(self.cfg.param_dtype))
    self.mlp_0 = d(w, "fm_embed", "fm_mlp", "mlp_0")
    self.mlp_2 = d(w, "fm_mlp", "fm_embed", "mlp_2")

  def modulation(self, y):
    return self.adaLN_modulation(nn.silu(y))

  def step(self, x_NxW, mod_Nx3W):
    shift, scale, gate = split_modulation(mod_Nx3W, 3)
    h = self.mlp_0(modulate(self.in_ln(x_NxW), shift, scale))
    return x_NxW + gate * self.mlp_2(nn.silu(h))

  def __call__(self, x_NxW, y_NxW):
    return self.step(x_NxW, self.modulation(y_NxW)), None


class FinalLayer(nn.Module):
  """(shift, scale) = adaLN(SiLU(y)); Linear(LN(x)·(1+scale)+shift); split like ResBlock."""
  cfg: ModelConfig

  def setup(self):
    d = _Dense(self.cfg)
    self.adaLN_modulation = d(2 * self.cfg.fm_head_dim, "fm_embed", "fm_mlp", "adaLN_modulation", _ZERO)
    self.linear = d(self.cfg.token_dim, "fm_embed", "token", "linear", _ZERO)

  def modulation(self, y):
    return self.adaLN_modulation(nn.silu(y))

  def step(self, x_NxW, mod_Nx2W):
    shift, scale = split_modulation(mod_Nx2W, 2)
    return self.linear(modulate(parameter_free_layer_norm(x_NxW, 1e-6), shift, scale))

  def __call__(self, x_NxW, y_NxW):
    return self.step(x_NxW, self.modulation(y_NxW))


class FlowHead(nn.Module):
  """SimpleMLPAdaLN. `__call__(x_t, t, c) -> velocity` (fp32 out). Res blocks are scanned (`res_blocks` axis 0).

  Sampling evaluates the head at a fixed grid of S flow times per image token, so it splits the call:
  `modulations(t_S, c, blocks)` once per token (every adaLN matmul over all S·N rows: the weights are read once,
  not S times), then `from_modulations(x_t, mods_at_time, blocks)` per flow step. `blocks` are the per-block
  param trees of `sampling.decode_layout.split_head_blocks` (a loop that slices stacked weights makes XLA:CPU
  copy them every step)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d = _Dense(cfg)
    self.time_embed = TimestepEmbedder(cfg)
    self.cond_embed = d(cfg.fm_head_dim, "mlp", "fm_embed", "cond_embed")
    self.input_proj = d(cfg.fm_head_dim, "token", "fm_embed", "input_proj")
    self.res_blocks = nn.scan(ResBlock, variable_axes={"params": 0, "lora": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,), length=cfg.fm_head_layers,
                              unroll=min(cfg.scan_unroll, cfg.fm_head_layers),
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    self.final_layer = FinalLayer(cfg)

  def _embed(self, t, c):
    """time_embed(t) + cond_embed(c), broadcasting leading axes."""
    return self.time_embed(t) + self.cond_embed(c.astype(to_dtype(self.cfg.dtype)))

  def _input(self, x_NxT):
    return self.input_proj(sharding.constrain(x_NxT, ("act_batch", None)).astype(to_dtype(self.cfg.dtype)))

  def __call__(self, x_NxT: jax.Array, t_N: jax.Array, c_NxC: jax.Array) -> jax.Array:
    y = sharding.constrain(self._embed(t_N, sharding.constrain(c_NxC, ("act_batch", None))), ("act_batch", None))
    x, _ = self.res_blocks(self._input(x_NxT), y)
    return self.final_layer(x, y).astype(jnp.float32)

  def modulations(self, t_S: jax.Array, c_NxC: jax.Array, blocks) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """adaLN modulations at S times for N rows: (per block (S, N, 3W), final layer (S, N, 2W))."""
    c_NxC = sharding.constrain(c_NxC, ("act_batch", None))
    y = sharding.constrain(self._embed(t_S[:, None], c_NxC[None]), (None, "act_batch", None))
    block = ResBlock(self.cfg, parent=None)  # free-standing, applied functionally per block
    per_block = tuple(block.apply({"params": p}, y, method=ResBlock.modulation) for p in blocks)
    return per_block, self.final_layer.modulation(y)

  def from_modulations(self, x_NxT: jax.Array, mods, blocks) -> jax.Array:
    """Velocity (N, token_dim) fp32 given one time's modulations (per block (N, 3W), final (N, 2W))."""
    per_block, final = mods
    x = self._input(x_NxT)
    block = ResBlock(self.cfg, parent=None)
    for p, m in zip(blocks, per_block):
      x = block.apply({"params": p}, x, m, method=ResBlock.step)
    return self.final_layer.step(x, final).astype(jnp.float32)

