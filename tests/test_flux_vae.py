"""Flux VAE parity: against diffusers.AutoencoderKL (torch, random weights, converted by our converter) and
against the official NextStep-1 fixture (vae.npz, both checkpoint.pt and model.safetensors)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.convert import vae as convert_vae_mod
from nextstep_jax.models import flux_vae, latents

TOL = 1e-4


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def make_diffusers_vae(path: str, block_out_channels=(32, 64), layers_per_block: int = 1, seed: int = 0,
                       **config):
  """A random Flux-like diffusers AutoencoderKL (no quant convs) saved with save_pretrained; every tensor random."""
  import torch
  from diffusers import AutoencoderKL

  n = len(block_out_channels)
  model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                        layers_per_block=layers_per_block, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, **config).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _diffusers_parity(tmp_path, block_out_channels, layers_per_block, size):
  import torch

  ref = make_diffusers_vae(str(tmp_path / "hf"), block_out_channels, layers_per_block)
  cfg = convert_vae_mod.convert_vae(tmp_path / "hf", tmp_path / "ours", layout="diffusers")
  assert not cfg.encoder_norm and cfg.ch_mult == tuple(b // block_out_channels[0] for b in block_out_channels)
  _, params = convert_vae_mod.load_vae(tmp_path / "ours")
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
  f = 2 ** (len(block_out_channels) - 1)
  z = rng.standard_normal((2, 16, size // f, size // f)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x)).latent_dist
    want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
    want_dec = ref.decode(torch.from_numpy(z)).sample.numpy()
  model = flux_vae.FluxVAE(cfg)
  enc = model.apply(params, jnp.asarray(nhwc(x)), method=flux_vae.FluxVAE.encode)
  dec = model.apply(params, jnp.asarray(nhwc(z)), method=flux_vae.FluxVAE.decode)
  errs = {"mean": np.abs(np.asarray(enc["mean_before_norm"]) - nhwc(want_mean)).max(),
          "logvar": np.abs(np.asarray(enc["logvar"]) - nhwc(want_logvar)).max(),
          "decode": np.abs(np.asarray(dec) - nhwc(want_dec)).max()}
  print(f"diffusers parity {block_out_channels} lpb={layers_per_block} {size}²: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        + f" (|decode| max {np.abs(want_dec).max():.2f})")
  assert np.abs(want_mean).max() > 0.1 and np.abs(want_dec).max() > 0.1  # nothing trivially zero
  for k, v in errs.items():
    assert v <= TOL, f"{k}: max abs error {v}"


def test_diffusers_parity_tiny(tmp_path):
  _diffusers_parity(tmp_path, (32, 64), 1, 16)


@pytest.mark.slow
def test_diffusers_parity_real_size(tmp_path):
  _diffusers_parity(tmp_path, (128, 256, 512, 512), 2, 64)


# ----------------------------------------------------------------------------------------------- official fixture


@pytest.fixture(scope="module")
def fixture_arrays(fixtures_dir):
  return dict(np.load(os.path.join(fixtures_dir, "vae.npz")))


@pytest.fixture(scope="module", params=["checkpoint.pt", "model.safetensors"])
def converted(request, fixtures_dir, tmp_path_factory):
  dst = tmp_path_factory.mktemp("vae_" + request.param.split(".")[0])
  cfg = convert_vae_mod.convert_vae(os.path.join(fixtures_dir, "vae", request.param), dst)
  return cfg, convert_vae_mod.load_vae(dst)[1]


def test_fixture_config(converted, fixtures_dir):
  cfg, _ = converted
  official = json.load(open(os.path.join(fixtures_dir, "vae", "config.json")))
  assert (cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels) == (
      official["ch"], official["ch_mult"], official["num_res_blocks"], official["z_channels"])
  assert (cfg.encoder_norm, cfg.psz, cfg.deterministic) == (True, 2, True)


def test_fixture_parity(converted, fixture_arrays):
  cfg, params = converted
  a = fixture_arrays
  image = jnp.asarray(nhwc(a["image"]))
  enc = flux_vae.FluxVAE(cfg).apply(params, image, method=flux_vae.FluxVAE.encode)
  z = flux_vae.encode_latents(params, cfg, image)
  got = {
      "mean_before_norm": (enc["mean_before_norm"], nhwc(a["mean_before_norm"])),
      "logvar": (enc["logvar"], nhwc(a["logvar"])),
      "posterior_mean": (enc["mean"], nhwc(a["posterior_mean"])),
      "latents": (z, nhwc(a["latents"])),
      "tokens": (latents.patchify(z, 2), a["tokens"]),
      # decode_output is the official raw decoder (no scale/shift undone): compare with ours raw
      "decode_output": (flux_vae.FluxVAE(cfg).apply(params, jnp.asarray(nhwc(a["decode_input"])),
                                                    method=flux_vae.FluxVAE.decode), nhwc(a["decode_output"])),
      "recon_output": (flux_vae.decode_latents(params, cfg, z), nhwc(a["recon_output"])),
  }
  errs = {k: float(np.abs(np.asarray(ours) - want).max()) for k, (ours, want) in got.items()}
  print("fixture parity: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  for k, v in errs.items():
    assert v <= TOL, f"{k}: max abs error {v}"
  # encoder_norm with psz 2: every 64-d token is zero-mean / unit-variance
  tok = np.asarray(latents.patchify(enc["mean"], 2))
  np.testing.assert_allclose(tok.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(tok.std(-1), 1, atol=1e-4)


def test_sampled_posterior_uses_logvar(converted, fixture_arrays):
  """Non-deterministic encode = mean + exp(clip(logvar)/2)·ε (same ε reproduced here from the same key)."""
  cfg, params = converted
  image = jnp.asarray(nhwc(fixture_arrays["image"]))
  key = jax.random.key(3)
  z = np.asarray(flux_vae.encode_latents(params, cfg, image, rng=key, deterministic=False))
  eps = np.asarray(jax.random.normal(key, z.shape, jnp.float32))
  std = np.exp(0.5 * np.clip(nhwc(fixture_arrays["logvar"]), -30, 20))
  np.testing.assert_allclose(z, nhwc(fixture_arrays["posterior_mean"]) + std * eps, atol=TOL)
  with pytest.raises(ValueError, match="needs rng"):
    flux_vae.encode_latents(params, cfg, image, deterministic=False)


def test_params_carry_logical_names():
  import flax.linen as nn
  from flax import traverse_util

  from nextstep_jax.config import VAEConfig, tiny_vae
  cfg = VAEConfig(**tiny_vae())
  boxed = jax.eval_shape(lambda: flux_vae.FluxVAE(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  flat = traverse_util.flatten_dict(boxed["params"], is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in flat.values())
  assert flat[("encoder", "down_0", "block_0", "conv1", "kernel")].names == ("conv_h", "conv_w", "conv_in", "conv_out")
  assert flat[("decoder", "mid", "attn_1", "norm", "scale")].names == ("norm",)
  assert ("decoder", "up_1", "upsample", "conv", "kernel") in flat


def test_scaled_vae_parity(tmp_path):
  """The production fixture's VAE (scale 0.3611, shift 0.1159): a latent-factor bug cannot hide behind 1 / 0."""
  prod = os.path.join(os.path.dirname(__file__), "fixtures", "production")
  cfg = convert_vae_mod.convert_vae(os.path.join(prod, "vae", "model.safetensors"), tmp_path)
  params = convert_vae_mod.load_vae(tmp_path)[1]
  assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
  a = dict(np.load(os.path.join(prod, "vae_scaled.npz")))
  z = flux_vae.encode_latents(params, cfg, jnp.asarray(nhwc(a["image"])))
  np.testing.assert_allclose(z, nhwc(a["latents"]), atol=TOL)
  np.testing.assert_allclose(flux_vae.decode_latents(params, cfg, jnp.asarray(nhwc(a["lm_latents"]))),
                             nhwc(a["lm_decode_output"]), atol=TOL)
