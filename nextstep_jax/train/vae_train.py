"""Tokenizer fine-tuning: noise-regularised decoding and a jit-able reconstruction training step.

NextStep-1 fine-tunes the Flux VAE with reconstruction (+ perceptual) losses while decoding noisy latents
`z + α·ε`, α ~ U(0, γ) per sample, ε ~ N(0, I), γ = 0.2 (spec §2, issue #9), so the decoder tolerates the
imperfect latents the LM samples. Latents are the encoder's (normalised) posterior mean, or a posterior sample
when the config is not deterministic.

    step = make_train_step(cfg, optax.adam(1e-4))
    params, opt_state, metrics = step(params, opt_state, images_BxHxWx3, rng)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nextstep_jax.config import VAEConfig
from nextstep_jax.models.flux_vae import FluxVAE, posterior_sample

PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]  # (pred, target) images in [-1, 1] → scalar


@dataclasses.dataclass(frozen=True)
class ReconLoss:
  """Weights of the reconstruction objective; the perceptual term is used only when `perceptual_fn` is given."""
  l1_weight: float = 1.0
  l2_weight: float = 0.0
  perceptual_weight: float = 0.0
  perceptual_fn: PerceptualFn | None = None
  noise_gamma: float = 0.2


def noise_regularize(rng: jax.Array, z_BxhxwxC: jax.Array, gamma: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """(z + α·ε, α): α ~ U(0, γ) drawn once per sample (shape (B,)), ε ~ N(0, I) of z's shape."""
  k_alpha, k_eps = jax.random.split(rng)
  alpha = jax.random.uniform(k_alpha, (z_BxhxwxC.shape[0],), jnp.float32, 0.0, gamma)
  eps = jax.random.normal(k_eps, z_BxhxwxC.shape, jnp.float32)
  noisy = z_BxhxwxC + (alpha.reshape((-1,) + (1,) * (z_BxhxwxC.ndim - 1)) * eps).astype(z_BxhxwxC.dtype)
  return noisy, alpha


def reconstruction_loss(params: Any, cfg: VAEConfig, images_BxHxWx3: jax.Array, rng: jax.Array,
                        loss: ReconLoss = ReconLoss()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Encode → (sample) → noise-regularise → decode; returns (scalar loss, metrics)."""
  model = FluxVAE(cfg)
  k_post, k_noise = jax.random.split(rng)
  enc = model.apply(params, images_BxHxWx3, method=FluxVAE.encode)
  z = enc["mean"] if cfg.deterministic else posterior_sample(enc, k_post)
  z_noisy, alpha = noise_regularize(k_noise, z, loss.noise_gamma) if loss.noise_gamma > 0 else (z, jnp.zeros(z.shape[:1]))
  recon = model.apply(params, z_noisy, method=FluxVAE.decode)
  diff = recon - images_BxHxWx3.astype(jnp.float32)
  metrics = {"l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(jnp.square(diff)), "alpha_mean": jnp.mean(alpha)}
  total = loss.l1_weight * metrics["l1"] + loss.l2_weight * metrics["l2"]
  if loss.perceptual_fn is not None and loss.perceptual_weight:
    metrics["perceptual"] = loss.perceptual_fn(recon, images_BxHxWx3)
    total = total + loss.perceptual_weight * metrics["perceptual"]
  metrics["loss"] = total
  return total, metrics


def make_train_step(cfg: VAEConfig, optimizer: optax.GradientTransformation, loss: ReconLoss = ReconLoss(),
                    jit: bool = True) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
  """`step(params, opt_state, images, rng) -> (params, opt_state, metrics)`; `params` is `{"params": …}`.

  Initialise `opt_state = optimizer.init(params)`. To fine-tune only the decoder (the released "improved"
  tokenizer), pass e.g. `optax.multi_transform({...}, labels)` with the encoder labelled `set_to_zero`.
  """

  def step(params, opt_state, images_BxHxWx3, rng):
    (_, metrics), grads = jax.value_and_grad(reconstruction_loss, has_aux=True)(params, cfg, images_BxHxWx3, rng,
                                                                                 loss)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.global_norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1)) if jit else step
