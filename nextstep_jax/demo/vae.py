"""Demo phase 2: train a small Flux-architecture VAE on the shapes images, resumably, and save a model directory.

The VAE starts from random initialisation (there is no pretrained tokenizer this small) and is trained with the
NextStep tokenizer objective of `nextstep_jax.train.vae_train`: reconstruction (L1 + L2) of images decoded from
noise-regularised latents z + α·ε, α ~ U(0, γ). Batches are drawn deterministically from (seed, step), and the
(params, optimizer state) are checkpointed with the training `Checkpointer`, so an interrupted run resumes exactly.
Output: a model directory (`nextstep_config.json` "vae" section, `vae_params/`, `tokenizer/` — the byte or word
tokenizer the LM uses, see `save_vae_model`), which `data encode --vae` and `config.train.vae_from` read.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm.auto import tqdm

from nextstep_jax import params_io
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.config import VAEConfig
from nextstep_jax.data.builders import TfdsSource
from nextstep_jax.data.records import decode_image
from nextstep_jax.demo.text import make_shapes_tokenizer
from nextstep_jax.images import to_float
from nextstep_jax.models.flux_vae import init_params
from nextstep_jax.tokens import make_byte_tokenizer
from nextstep_jax.train.metrics import MetricWriter
from nextstep_jax.train.vae_train import ReconLoss, make_train_step


def load_images(dataset_dir: str | Path) -> np.ndarray:
  """All images of an image dataset (`data build` output) as uint8 (N, H, W, 3)."""
  src = TfdsSource(dataset_dir)
  return np.stack([decode_image(src[i]["image"]) for i in range(len(src))])


def zero_init_residuals(params: Any) -> Any:
  """Zeroes the last layer of every residual branch (ResnetBlock conv2, attention proj_out): each block starts
  as the identity, which makes training from random initialisation markedly faster (Goyal et al., 2017)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: np.zeros_like(v) if {"conv2", "proj_out"} & set(k) else v
                                       for k, v in flat.items()})


def train_vae(cfg: VAEConfig, images_uint8: np.ndarray, workdir: str | Path, demo: Any) -> Any:
  """Trains (or resumes) `demo.vae_steps` steps; returns the `{"params": …}` tree. `demo` = `config.demo`."""
  steps = int(demo.vae_steps)
  warmup = min(int(demo.vae_warmup), steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, demo.vae_lr, warmup, steps, demo.vae_lr * 0.05)
  opt = optax.adam(schedule)
  key = jax.random.key(demo.vae_seed)
  params = jax.device_put(zero_init_residuals(jax.device_get(init_params(cfg, key, images_uint8.shape[1]))))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}
  ckpt = Checkpointer(workdir, demo.vae_save_every, keep=1, async_save=False)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state, None)
    print(f"  resumed VAE training at step {start}", flush=True)
  writer = MetricWriter(workdir, resume_step=start)
  step_fn = make_train_step(cfg, opt, ReconLoss(l1_weight=demo.vae_l1, l2_weight=demo.vae_l2,
                                                noise_gamma=demo.vae_noise_gamma))
  params, opt_state = state["params"], state["opt_state"]
  bar = tqdm(range(start, steps), initial=start, total=steps, desc="  VAE", unit="step", mininterval=2.0)
  for step in bar:
    idx = np.random.default_rng([demo.vae_seed, step]).integers(0, len(images_uint8), demo.vae_batch)
    params, opt_state, m = step_fn(params, opt_state, to_float(images_uint8[idx]), jax.random.fold_in(key, step))
    done = step + 1
    if done % demo.vae_log_every == 0 or done == steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      writer.scalars(done, m, console=False)
      bar.set_postfix(l1=f"{m['l1']:.4f}", l2=f"{m['l2']:.4f}")
    if ckpt.should_save(done) or done == steps:
      ckpt.save(done, {"step": jnp.asarray(done, jnp.int32), "params": params, "opt_state": opt_state}, None,
                force=done == steps)
  bar.close()
  ckpt.close()
  writer.close()
  return params


def save_vae_model(out_dir: str | Path, cfg: VAEConfig, params: Any, steps: int, tokenizer: str = "bytes") -> Path:
  """Model directory with `vae_params/`, the "vae" config section and the tokenizer (atomic rename): "bytes"
  (`make_byte_tokenizer`) or "words" (the same plus one token per shapes-world word, `demo.text`)."""
  out = Path(out_dir)
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  params_io.save_params(tmp / "vae_params", params)
  params_io.write_model_config(tmp, {"vae": cfg, "vae_source": {"format": "nextstep-jax demo", "steps": steps}})
  if tokenizer not in ("bytes", "words"):
    raise ValueError(f"tokenizer {tokenizer!r}: expected 'bytes' or 'words'")
  (make_shapes_tokenizer if tokenizer == "words" else make_byte_tokenizer)(tmp / "tokenizer")
  shutil.rmtree(out, ignore_errors=True)
  tmp.rename(out)
  return out
