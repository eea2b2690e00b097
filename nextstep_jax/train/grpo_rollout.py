"""GRPO's rollout inputs and sampling (train/grpo.py's step 1): the prompt source, the group-major prompt batches
and their checkpointable iterator, and G samples per prompt with the log-prob sampler (trajectory + images)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.data.shapes import caption_space
from nextstep_jax.models.latents import unpatchify
from nextstep_jax.sampling.generate import Spec, compiled_program
from nextstep_jax.tokens import left_pad
from nextstep_jax.train.config import check
from nextstep_jax.train.grpo_config import GrpoConfig


def prompt_list(gcfg: GrpoConfig) -> list[str]:
  """The prompts of `config.grpo.prompts`: the shapes world's 540 captions or a text file's non-empty lines."""
  if gcfg.prompts == "shapes":
    return caption_space()
  path = Path(gcfg.prompts)
  check(path.is_file(), f"config.grpo.prompts={gcfg.prompts!r} is neither 'shapes' nor a text file; pass a file "
        f"with one prompt per line")
  lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
  check(bool(lines), f"config.grpo.prompts={gcfg.prompts!r} has no prompts")
  return lines


def prompt_batch(gcfg: GrpoConfig, cfg: ModelConfig, tokenizer: Any, n_prompts: int, index: int,
                 prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """Global rollout-input batch `index`: `n_prompts` prompt ids drawn without replacement by (prompt_seed, index),
  each repeated G times (group-major), tokenised and left-padded to prompt_len; a tokenizer of None gives random
  ids (synthetic runs). Keys: input_ids, attention_mask, prompt_index (+ the uncond rows with CFG)."""
  rng = np.random.default_rng([gcfg.prompt_seed, index])
  ids = rng.choice(len(prompts), size=n_prompts, replace=n_prompts > len(prompts))
  index_r = np.repeat(ids, gcfg.group_size).astype(np.int32)
  if tokenizer is None:
    r, p = len(index_r), gcfg.prompt_len
    ids_p = np.random.default_rng([gcfg.prompt_seed, 1 << 20]).integers(0, min(256, cfg.vocab_size), (len(prompts), p))
    out = {"input_ids": ids_p[index_r].astype(np.int32), "attention_mask": np.ones((r, p), np.int32)}
    if gcfg.branches == 2:
      out.update(uncond_input_ids=np.full((r, p), cfg.pad_token_id, np.int32),
                 uncond_attention_mask=np.zeros((r, p), np.int32).copy())
      out["uncond_attention_mask"][:, -1] = 1
  else:
    rows = tokenizer.t2i_cfg_rows([prompts[i] for i in index_r], gcfg.grid_h, gcfg.grid_w, 1, None, "",
                                  cfg=gcfg.branches == 2)
    tok_ids, mask = left_pad(rows, cfg.pad_token_id, (gcfg.prompt_len,))
    r = len(index_r)
    out = {"input_ids": tok_ids[:r], "attention_mask": mask[:r]}
    if gcfg.branches == 2:
      out.update(uncond_input_ids=tok_ids[r:], uncond_attention_mask=mask[r:])
  out["prompt_index"] = index_r
  return out


def prompt_iterator(gcfg: GrpoConfig, cfg: ModelConfig, tokenizer: Any, rows: int, process_index: int,
                    process_count: int) -> grain.DatasetIterator:
  """Infinite checkpointable iterator of this process's rows of the global prompt batches."""
  check(rows % gcfg.group_size == 0, f"config.data.global_batch_size={rows} (rollout rows) must be a multiple of "
        f"config.grpo.group_size={gcfg.group_size}")
  check(rows % process_count == 0, f"rollout rows {rows} do not split over {process_count} processes")
  prompts = prompt_list(gcfg)
  local = rows // process_count
  sl = slice(process_index * local, (process_index + 1) * local)
  ds = grain.MapDataset.range(1 << 40).map(lambda i: {k: v[sl] for k, v in prompt_batch(
      gcfg, cfg, tokenizer, rows // gcfg.group_size, int(i), prompts).items()})
  return iter(ds.to_iter_dataset())


def latent_preview(tokens_RxNxK: np.ndarray, grid_h: int, grid_w: int, patch: int) -> np.ndarray:
  """uint8 stand-in images without a VAE (synthetic runs): the first three latent channels through a sigmoid."""
  lat = np.asarray(unpatchify(jnp.asarray(tokens_RxNxK), grid_h * patch, grid_w * patch, patch))[..., :3]
  return np.round(255 / (1 + np.exp(-lat))).astype(np.uint8)


def sample_rollout(cfg: ModelConfig, gcfg: GrpoConfig, vae_cfg: VAEConfig | None, vae_params: Any, params: Any,
                   batch: dict[str, jax.Array], key: jax.Array) -> dict[str, np.ndarray]:
  """G samples per prompt with `params` → trajectory (states, logp), images (VAE-decoded, else `latent_preview`)
  and tokens, as numpy."""
  r = batch["input_ids"].shape[0]
  spec = Spec(num_images=r, branches=gcfg.branches, prompt_len=gcfg.prompt_len, grid_h=gcfg.grid_h, grid_w=gcfg.grid_w,
              flow=gcfg.flow_config(), noise_repeat=r, use_norm=gcfg.use_norm, decode=vae_cfg is not None)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if gcfg.branches == 2:
    ids = jnp.concatenate([ids, batch["uncond_input_ids"]])
    mask = jnp.concatenate([mask, batch["uncond_attention_mask"]])
  program = compiled_program(cfg, vae_cfg, spec)
  out = jax.device_get(program(params, vae_params, ids, mask, None, jnp.float32(gcfg.cfg), jnp.float32(1.0), key, None))
  images = out.get("images")
  if images is None:
    images = latent_preview(out["tokens"], gcfg.grid_h, gcfg.grid_w, cfg.latent_patch_size)
  return {"states": out["trajectory_states"], "logp": out["trajectory_logp"], "images": images,
          "tokens": out["tokens"]}
