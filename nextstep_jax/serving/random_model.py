"""A model directory with random weights (tests, load benchmarks): config, params, VAE params, byte tokenizer.

The layout is what `Sampler.from_checkpoint` and `nextstep-jax serve --checkpoint` read. Weights are the model's
init plus 0.02·N(0, 1) everywhere (the flow head's zero-initialised layers would otherwise make every image grey).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import linen as nn

from nextstep_jax import params_io
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.models.flux_vae import init_params
from nextstep_jax.models.nextstep import init_fn
from nextstep_jax.tokens import make_byte_tokenizer


def random_params(cfg: ModelConfig, seed: int = 0) -> Any:
  _, init = init_fn(cfg)
  params = nn.unbox(jax.jit(init)(jax.random.key(seed)))
  return jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(seed + 1), p.shape, p.dtype), params)


def write_random_model_dir(out: str | Path, model: dict, vae: dict, seed: int = 0) -> Path:
  """Writes `out/` (nextstep_config.json, params/, vae_params/, tokenizer/) and returns its path."""
  out = Path(out)
  cfg, vcfg = ModelConfig.from_dict(model).validate(), VAEConfig.from_dict(vae).validate()
  params_io.save_params(out / "params", random_params(cfg, seed))
  params_io.save_params(out / "vae_params", init_params(vcfg, jax.random.key(seed + 2)))
  make_byte_tokenizer(out / "tokenizer")
  params_io.write_model_config(out, {"model": cfg, "vae": vcfg})
  return out
