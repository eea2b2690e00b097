"""What every NextStep-1 curriculum stage shares; each stage's own numbers live in its file under configs/.

Official recipe (spec §5): stage 1 from Qwen2.5-14B at 256 px, 300K steps, lr 1e-4 (warmup 5000); stage 2 at
512 px, 100K steps, lr 1e-5 (warmup 1000); annealing 20K steps at 512 px, lr 1e-5; editing 20K steps at 512 px,
lr 1e-5 from the annealed model; SFT and DPO afterwards. Shared by all stages (here): AdamW β (0.9, 0.95), wd 0.1,
clip 1.0 (`TrainConfig` defaults), sequences packed to 8192 tokens, drop_text_prob 0.3, loss weights 0.01 / 1.0,
head batch_mul 4, bf16 compute with full remat, the mesh all-FSDP.

A stage file (`configs/nextstep1_14b/stage2_512px.py`, `configs/tiny/…`) calls `experiment_14b` / `experiment_tiny`
with its resolution, steps, lr schedule, batch, micro-batches, init_from and mesh written out.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from nextstep_jax.config import experiment, flux_vae, load_config, mesh_section, nextstep1_14b, tiny, tiny_vae
from nextstep_jax.data.config import default_data_config
from nextstep_jax.paths import CONFIGS_DIR
from nextstep_jax.train.config import train_section

STAGES = ("stage1_256px", "stage2_512px", "anneal_512px", "sft", "edit", "dpo")
PREVIOUS = {"stage1_256px": None, "stage2_512px": "stage1_256px", "anneal_512px": "stage2_512px",
            "sft": "anneal_512px", "edit": "anneal_512px", "dpo": "sft"}
ROOT = "gs://YOUR_BUCKET/nextstep1"  # placeholder bucket the user overrides
CONFIG_DIRS = {"14b": "nextstep1_14b", "tiny": "tiny"}


def stage_file(stage: str, scale: str = "14b") -> Path:
  """configs/<scale dir>/<stage>.py."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
  if scale not in CONFIG_DIRS:
    raise ValueError(f"unknown scale {scale!r}; one of {sorted(CONFIG_DIRS)} (demo configs live in configs/demo/)")
  return CONFIGS_DIR / CONFIG_DIRS[scale] / f"{stage}.py"


def stage_config(stage: str, scale: str = "14b") -> ml_collections.ConfigDict:
  """The stage's experiment ConfigDict, loaded from its file."""
  return load_config(str(stage_file(stage, scale)))


def data_14b(resolution: int, mix: dict[str, float], global_batch_size: int = 256, seq_len: int = 8192,
             max_image_tokens: int = 4096) -> ml_collections.ConfigDict:
  """`config.data` of a 14B stage: one source per kind of `mix` (weights), placeholder paths under ROOT."""
  data = default_data_config()
  data.update(resolution=resolution, drop_text_prob=0.3, seq_len=seq_len, max_image_tokens=max_image_tokens,
              global_batch_size=global_batch_size, tokenizer=f"{ROOT}/qwen2.5-14b/tokenizer")
  data.sources = [dict(name=k, path=f"{ROOT}/data/{k}_{resolution}px", weight=w, kind="" if k == "prefs" else k)
                  for k, w in mix.items()]
  return data


def experiment_14b(train: dict, data: ml_collections.ConfigDict, mesh: dict) -> ml_collections.ConfigDict:
  """The 14B model (bf16 compute, full remat), the real Flux VAE, `train` over the shared defaults."""
  train = dict(dict(save_every=1000, log_every=10, vae_from=f"{ROOT}/nextstep1-tokenizer"), **train)
  cfg = experiment(dict(nextstep1_14b(), dtype="bfloat16", remat_policy="full", attention_impl="auto"), flux_vae(),
                   train=train_section(**train), data=data)
  cfg.mesh = mesh_section(**mesh)
  return cfg


def experiment_tiny(train: dict, resolution: int) -> ml_collections.ConfigDict:
  """The CPU-test counterpart: tiny model and VAE, synthetic batches of 8 rows, a handful of steps."""
  train = dict(dict(save_every=2, log_every=1, synthetic_data=True), **train)
  data = default_data_config()
  data.update(resolution=resolution, drop_text_prob=0.3, global_batch_size=8,
              seq_len=48 if resolution == 256 else 96, max_image_tokens=16 if resolution == 256 else 64)
  return experiment(tiny(), tiny_vae(), train=train_section(**train), data=data)


def as_dpo(cfg: ml_collections.ConfigDict, dpo: ml_collections.ConfigDict, seq_len: int, max_image_tokens: int,
           global_batch_size: int | None = None) -> ml_collections.ConfigDict:
  """A DPO stage (train/dpo.py): the objective, `config.dpo`, one unpacked pair per row, no text dropping."""
  cfg.train.objective = "dpo"
  cfg.dpo = dpo
  cfg.data.update(drop_text_prob=0.0, pack=False, seq_len=seq_len, max_image_tokens=max_image_tokens)
  if global_batch_size:
    cfg.data.global_batch_size = global_batch_size
  return cfg


def as_grpo(cfg: ml_collections.ConfigDict, grpo: ml_collections.ConfigDict, rollout_rows: int) -> ml_collections.ConfigDict:
  """A GRPO stage (train/grpo.py): the objective, `config.grpo`; `config.data` describes the rollout batch —
  global_batch_size = rollout rows (prompts × group_size), seq_len = the prompt length, max_image_tokens = the
  image's token count (what AOT and the FLOPs count read)."""
  cfg.train.objective = "grpo"
  cfg.grpo = grpo
  cfg.data.update(drop_text_prob=0.0, pack=False, seq_len=grpo.prompt_len, max_image_tokens=grpo.grid_h * grpo.grid_w,
                  global_batch_size=rollout_rows)
  return cfg


def as_lora(cfg: ml_collections.ConfigDict, lora: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A LoRA stage (train/lora.py): the objective, `config.lora`; adapters get no weight decay. The base is
  `config.train.init_from` (a converted release checkpoint or a stage's export)."""
  cfg.train.objective = "lora"
  cfg.train.weight_decay = 0.0
  cfg.lora = lora
  return cfg
