"""The Flux (BFL layout) autoencoder in Linen, with NextStep-1's latent normalisation.

Layout: **NHWC everywhere** — images (B, H, W, 3) in [-1, 1], latents (B, H/f, W/f, z_channels) with
f = 2^(len(ch_mult)-1). (The PyTorch references are NCHW; converters and tests transpose at the boundary.)

Architecture (spec §2, BFL `flux/modules/autoencoder.py`): GroupNorm(32, eps 1e-6), swish, 3×3 convs.
  encoder: conv_in → down_i (num_res_blocks ResnetBlocks; pad (0,1,0,1) + stride-2 conv on all but the last
           level) → mid (Res, single-head spatial attention with 1×1 conv q/k/v/proj_out, Res) → norm_out,
           swish, conv_out → 2·z_channels (mean ‖ logvar)
  decoder: conv_in → mid → up_i for i = deepest…0 (num_res_blocks+1 ResnetBlocks; nearest ×2 + conv on all
           but level 0) → norm_out, swish, conv_out → 3.  No quant convs.
NextStep extras: `encoder_norm` = parameter-free LayerNorm (eps 1e-6) of the posterior MEAN over channels,
after grouping psz×psz neighbours into channels (`latents.patchify`), then ungrouped; latents for the LM are
`(z − shift_factor)·scaling_factor`.

Parameter tree (mirrors the BFL key names, see convert/vae.py):
  encoder/conv_in/{kernel,bias}; encoder/down_{i}/block_{j}/{norm1,norm2}/{scale,bias},
  .../{conv1,conv2,nin_shortcut}/{kernel,bias}; encoder/down_{i}/downsample/conv/*;
  encoder/mid/{block_1,block_2}/*, encoder/mid/attn_1/{norm,q,k,v,proj_out}/*; encoder/{norm_out,conv_out}/*;
  decoder/conv_in, decoder/mid/*, decoder/up_{i}/block_{j}/*, decoder/up_{i}/upsample/conv/*, decoder/{norm_out,conv_out}
Conv kernels are (kh, kw, in, out) with logical axes (conv_h, conv_w, conv_in, conv_out); norms use `norm`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextstep_jax import sharding
from nextstep_jax.config import LATENT_PATCH_SIZE, VAEConfig
from nextstep_jax.models import latents
from nextstep_jax.models.layers import logical, parameter_free_layer_norm, to_dtype

LOGVAR_RANGE = (-30.0, 20.0)


def image_multiple(cfg: VAEConfig) -> int:
  """Image H and W must be multiples of this: VAE down factor × the LM patch (and the psz grouping)."""
  return cfg.downsample_factor * math.lcm(LATENT_PATCH_SIZE, cfg.psz or 1)


def check_image_shape(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
  """Raises a one-line ValueError unless `shape` is (B, H, W, in_channels) with H, W multiples of `image_multiple`."""
  if len(shape) != 4:
    raise ValueError(f"images must be a (batch, height, width, {cfg.in_channels}) array (NHWC), got shape {shape}")
  _, h, w, c = shape
  if c != cfg.in_channels:
    raise ValueError(f"expected {cfg.in_channels} RGB channels, got {c}; "
                     f"convert RGBA/greyscale with nextstep_jax.images.load_image")
  m = image_multiple(cfg)
  if h % m or w % m:
    fix = lambda n: max(m, round(n / m) * m)
    raise ValueError(f"image size {h}x{w} is not a multiple of {m}; use {fix(h)}x{fix(w)}")


def check_latent_shape(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
  if len(shape) != 4 or shape[-1] != cfg.z_channels:
    raise ValueError(f"latents must be (batch, h, w, {cfg.z_channels}) (NHWC, z_channels={cfg.z_channels}), "
                     f"got shape {shape}")


class _Ctx(nn.Module):
  """Base with dtype-aware conv / GroupNorm factories (all parameters carry logical axis names)."""
  cfg: VAEConfig

  def conv(self, features: int, k: int = 3, stride: int = 1, padding: Any = "pad", name: str | None = None):
    pad = ((k // 2, k // 2),) * 2 if padding == "pad" else padding
    return nn.Conv(features, (k, k), strides=stride, padding=pad, dtype=to_dtype(self.cfg.dtype),
                   param_dtype=to_dtype(self.cfg.param_dtype), name=name,
                   kernel_init=logical(nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
                   bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)))

  def norm(self, name: str):
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=to_dtype(self.cfg.dtype),
                        param_dtype=to_dtype(self.cfg.param_dtype), name=name,
                        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
                        bias_init=logical(nn.initializers.zeros_init(), ("norm",)))


class ResnetBlock(_Ctx):
  out_ch: int = 0

  @nn.compact
  def __call__(self, x_BxHxWxC):
    h = self.conv(self.out_ch, name="conv1")(nn.swish(self.norm("norm1")(x_BxHxWxC)))
    h = self.conv(self.out_ch, name="conv2")(nn.swish(self.norm("norm2")(h)))
    if x_BxHxWxC.shape[-1] != self.out_ch:
      x_BxHxWxC = self.conv(self.out_ch, k=1, name="nin_shortcut")(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(_Ctx):
  """Single-head self-attention over all H·W positions; q/k/v/proj_out are 1×1 convs, scale 1/sqrt(C)."""

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, c = x_BxHxWxC.shape
    h = self.norm("norm")(x_BxHxWxC)
    q, k, v = (self.conv(c, k=1, name=n)(h).reshape(b, hh * ww, 1, c) for n in ("q", "k", "v"))
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, hh, ww, c)
    return x_BxHxWxC + self.conv(c, k=1, name="proj_out")(out)


class Downsample(_Ctx):
  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x.shape[-1], stride=2, padding="VALID", name="conv")(x)


class Upsample(_Ctx):
  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return self.conv(x.shape[-1], name="conv")(x)


class Level(_Ctx):
  """One resolution level: `n_blocks` ResnetBlocks (block_j), then an optional down/up-sample."""
  out_ch: int = 0
  n_blocks: int = 0
  resample: str | None = None  # "downsample" | "upsample" | None

  @nn.compact
  def __call__(self, x):
    for j in range(self.n_blocks):
      x = ResnetBlock(self.cfg, self.out_ch, name=f"block_{j}")(x)
    if self.resample == "downsample":
      x = Downsample(self.cfg, name="downsample")(x)
    elif self.resample == "upsample":
      x = Upsample(self.cfg, name="upsample")(x)
    return x


class Mid(_Ctx):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name="block_1")(x)
    x = AttnBlock(self.cfg, name="attn_1")(x)
    return ResnetBlock(self.cfg, c, name="block_2")(x)


class Encoder(_Ctx):
  @nn.compact
  def __call__(self, x_BxHxWx3):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    h = self.conv(cfg.ch, name="conv_in")(x_BxHxWx3.astype(to_dtype(cfg.dtype)))
    for i, m in enumerate(cfg.ch_mult):
      h = Level(cfg, cfg.ch * m, cfg.num_res_blocks, "downsample" if i != n - 1 else None, name=f"down_{i}")(h)
    h = Mid(cfg, name="mid")(h)
    h = nn.swish(self.norm("norm_out")(h))
    return self.conv(2 * cfg.z_channels, name="conv_out")(h)


class Decoder(_Ctx):
  @nn.compact
  def __call__(self, z_BxhxwxC):
    cfg = self.cfg
    h = self.conv(cfg.ch * cfg.ch_mult[-1], name="conv_in")(z_BxhxwxC.astype(to_dtype(cfg.dtype)))
    h = Mid(cfg, name="mid")(h)
    for i in reversed(range(len(cfg.ch_mult))):
      h = Level(cfg, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, "upsample" if i != 0 else None,
                name=f"up_{i}")(h)
    h = nn.swish(self.norm("norm_out")(h))
    return self.conv(cfg.out_ch, name="conv_out")(h)


def normalize_mean(mean_BxhxwxC: jax.Array, psz: int | None, eps: float = 1e-6) -> jax.Array:
  """NextStep `encoder_norm`: parameter-free LayerNorm over channels of psz×psz-grouped latents (psz None/1: per pixel)."""
  if not psz or psz == 1:
    return parameter_free_layer_norm(mean_BxhxwxC, eps)
  _, h, w, _ = mean_BxhxwxC.shape
  tokens = latents.patchify(mean_BxhxwxC, psz)
  return latents.unpatchify(parameter_free_layer_norm(tokens, eps), h, w, psz)


class FluxVAE(nn.Module):
  """`encode(images)` → dict(mean_before_norm, logvar, mean); `decode(z)` → images. All NHWC, outputs fp32."""
  cfg: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, images_BxHxWx3: jax.Array) -> dict[str, jax.Array]:
    check_image_shape(self.cfg, images_BxHxWx3.shape)
    x = sharding.constrain(images_BxHxWx3, ("act_batch", None, None, None))
    moments = self.encoder(x).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    normed = normalize_mean(mean, self.cfg.psz) if self.cfg.encoder_norm else mean
    return {"mean_before_norm": mean, "logvar": logvar, "mean": normed}

  def decode(self, z_BxhxwxC: jax.Array) -> jax.Array:
    check_latent_shape(self.cfg, z_BxhxwxC.shape)
    z = sharding.constrain(z_BxhxwxC, ("act_batch", None, None, None))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images_BxHxWx3: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (also what `init` traces)."""
    return self.decode(self.encode(images_BxHxWx3)["mean"])


def _variables(params: Any) -> Any:
  return params if "params" in params else {"params": params}


def init_params(cfg: VAEConfig, rng: jax.Array, image_size: int | None = None) -> Any:
  """Random `{"params": …}` for `cfg` (unboxed), traced on one image of `image_size` (default: smallest legal)."""
  size = image_size or image_multiple(cfg)
  return nn.unbox(FluxVAE(cfg).init(rng, jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)))


def posterior_sample(enc: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """mean + exp(logvar/2)·ε with logvar clamped to [-30, 20] (diffusers/BFL DiagonalGaussian)."""
  std = jnp.exp(0.5 * jnp.clip(enc["logvar"], *LOGVAR_RANGE))
  return enc["mean"] + std * jax.random.normal(rng, enc["mean"].shape, enc["mean"].dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "deterministic"))
def encode_latents(params: Any, cfg: VAEConfig, images_BxHxWx3: jax.Array, rng: jax.Array | None = None,
                   deterministic: bool | None = None) -> jax.Array:
  """Images in [-1, 1] (NHWC) → LM latents `(z − shift)·scale` (B, H/f, W/f, z_channels).

  Deterministic (default: `cfg.deterministic`): z = the (normalised) posterior mean; otherwise z is sampled
  with `rng`. `params` is the `{"params": …}` tree (a bare params dict is accepted too).
  """
  enc = FluxVAE(cfg).apply(_variables(params), images_BxHxWx3, method=FluxVAE.encode)
  det = cfg.deterministic if deterministic is None else deterministic
  if det:
    z = enc["mean"]
  else:
    if rng is None:
      raise ValueError("a non-deterministic encode needs rng=jax.random.key(...) (or pass deterministic=True)")
    z = posterior_sample(enc, rng)
  return (z - cfg.shift_factor) * cfg.scaling_factor


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_latents(params: Any, cfg: VAEConfig, z_BxhxwxC: jax.Array) -> jax.Array:
  """LM latents → images (B, H, W, 3), float, about [-1, 1] (unclipped): decoder(z/scale + shift)."""
  return FluxVAE(cfg).apply(_variables(params), z_BxhxwxC / cfg.scaling_factor + cfg.shift_factor,
                            method=FluxVAE.decode)
