"""The NextStep-1 curriculum in one place: per-stage optimisation and data settings, and the stage chain.

Official recipe (spec §5): stage 1 from Qwen2.5-14B at 256 px, 300K steps, lr 1e-4 (warmup 5000); stage 2 at
512 px, 100K steps, lr 1e-5 (warmup 1000); annealing 20K steps at 512 px, lr 1e-5; editing 20K steps at 512 px,
lr 1e-5 from the annealed model; SFT and DPO afterwards. AdamW β (0.9, 0.95), wd 0.1, clip 1.0, sequences packed
to 8192 tokens, drop_text_prob 0.3, loss weights 0.01 / 1.0, head batch_mul 4.

`stage_config(stage, scale)` builds the experiment ConfigDict; `scale` is "14b" (pods), "tiny" (CPU tests,
synthetic data) or "demo" (CPU, shapes data). Stage files in configs/ are one-liners over this.
"""
from __future__ import annotations

import ml_collections

from nextstep_jax.config import experiment, flux_vae, mesh_section, nextstep1_14b, tiny, tiny_vae

STAGES = ("stage1_256px", "stage2_512px", "anneal_512px", "sft", "edit", "dpo")
PREVIOUS = {"stage1_256px": None, "stage2_512px": "stage1_256px", "anneal_512px": "stage2_512px",
            "sft": "anneal_512px", "edit": "anneal_512px", "dpo": "sft"}

# (steps, lr, end_lr, warmup, schedule, resolution)
_OPTIM = {
    "stage1_256px": (300_000, 1e-4, 1e-5, 5000, "cosine", 256),
    "stage2_512px": (100_000, 1e-5, 1e-5, 1000, "constant", 512),
    "anneal_512px": (20_000, 1e-5, 0.0, 500, "cosine", 512),
    "sft": (10_000, 1e-5, 1e-6, 500, "cosine", 512),
    "edit": (20_000, 1e-5, 1e-6, 500, "cosine", 512),
    "dpo": (2_000, 1e-6, 1e-6, 100, "constant", 512),  # starting point (not tuned): Diffusion-DPO-style small lr
}
# data mixes by source kind (weights); paths are placeholders the user overrides
_MIX = {
    "stage1_256px": {"text": 0.2, "t2i": 0.7, "edit": 0.1},
    "stage2_512px": {"text": 0.2, "t2i": 0.7, "edit": 0.1},
    "anneal_512px": {"text": 0.1, "t2i": 0.8, "edit": 0.1},
    "sft": {"text": 0.1, "t2i": 0.9},
    "edit": {"text": 0.1, "t2i": 0.3, "edit": 0.6},
    "dpo": {"prefs": 1.0},  # ns_prefs pairs (`nextstep-jax data prefs`)
}
ROOT = "gs://YOUR_BUCKET/nextstep1"
# 14B micro-batches: one packed 8192-token row per chip per micro-batch on the stage's recommended pod
# (benchmarks/aot_table.RECOMMENDED). Two rows per chip need ~690 GiB/chip on v5p (`nextstep-jax aot`), one ~52 GiB;
# DPO: 2 pairs (4 policy rows of 1536 tokens) per chip need 179 GiB, so one pair per chip per micro-batch.
_MICROBATCHES_14B = {"stage1_256px": 2, "stage2_512px": 2, "anneal_512px": 4, "sft": 4, "edit": 4, "dpo": 2}


def train_section(**overrides) -> ml_collections.ConfigDict:
  """`config.train` defaults."""
  d = dict(
      steps=1000, lr=1e-4, end_lr=1e-5, warmup_steps=100, schedule="cosine", b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, grad_clip=1.0, microbatches=1, seed=0,
      ema_decay=0.0,  # > 0: keep a moving average of the params (optimizer state) and export/sample with it
      log_every=10, save_every=1000, keep=3, async_checkpoint=True,
      init_from="",  # previous stage: an export dir (params/) or a training workdir (checkpoints/)
      vae_from="",  # model dir with vae_params/ (+ tokenizer/): copied into exports, used for sample grids
      export=True,  # write WORKDIR/export (params-only model dir that `sample` loads) at the end
      sample_every=0, sample_prompts=("a red circle above a blue square",), sample_size=64, sample_steps=20,
      sample_cfg=3.0,
      peak_flops_per_device=0.0,  # 0: from the device kind (TPU/GPU tables); CPU: pass a measured value
      synthetic_data=False,  # True: in-memory synthetic batches (tests, benchmarks) instead of config.data
      objective="fm",  # "fm": flow matching + CE (pre-training, SFT); "dpo": preference pairs (train/dpo.py)
  )
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def _data(stage: str, scale: str, resolution: int):
  from nextstep_jax.data.config import default_data_config
  data = default_data_config()
  data.resolution = resolution
  data.drop_text_prob = 0.3
  if scale == "14b":
    data.seq_len = 8192
    data.max_image_tokens = 4096
    data.global_batch_size = 256
    data.tokenizer = f"{ROOT}/qwen2.5-14b/tokenizer"
    data.sources = [dict(name=k, path=f"{ROOT}/data/{k}_{resolution}px", weight=w, kind="" if k == "prefs" else k)
                    for k, w in _MIX[stage].items()]
  return data


def _dpo(cfg: ml_collections.ConfigDict, scale: str) -> ml_collections.ConfigDict:
  """DPO stage (train/dpo.py): objective switch, `config.dpo`, one unpacked pair per row. The reference model is
  the stage's initial params (the SFT export, like the policy), kept in bf16."""
  from nextstep_jax.train.dpo import dpo_section
  cfg.train.objective = "dpo"
  cfg.dpo = dpo_section()
  cfg.data.drop_text_prob = 0.0
  cfg.data.pack = False
  if scale == "14b":  # caption (≤ ~500 tokens) + 32×32 image block + eos per row; 128 pairs = 256 policy rows
    cfg.data.seq_len, cfg.data.max_image_tokens, cfg.data.global_batch_size = 1536, 1024, 128
  else:  # fp32 compute: a bf16 reference would not reproduce the policy's errors at step 0
    cfg.data.seq_len, cfg.data.max_image_tokens = 48, 16
    cfg.dpo.ref_dtype = "float32"
  return cfg


def stage_config(stage: str, scale: str = "14b") -> ml_collections.ConfigDict:
  if stage not in _OPTIM:
    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
  steps, lr, end_lr, warmup, schedule, res = _OPTIM[stage]
  prev = PREVIOUS[stage]
  if scale == "14b":
    cfg = experiment(dict(nextstep1_14b(), dtype="bfloat16", remat_policy="full", attention_impl="auto"),
                     flux_vae(), train=train_section(
                         steps=steps, lr=lr, end_lr=end_lr, warmup_steps=warmup, schedule=schedule,
                         save_every=1000, log_every=10, microbatches=_MICROBATCHES_14B[stage],
                         init_from=f"{ROOT}/{prev}/export" if prev else f"{ROOT}/qwen2.5-14b",
                         vae_from=f"{ROOT}/nextstep1-tokenizer"),
                     data=_data(stage, scale, res))
    cfg.mesh = mesh_section(data=1, fsdp=-1, tensor=1)
    return _dpo(cfg, scale) if stage == "dpo" else cfg
  if scale == "tiny":
    cfg = experiment(tiny(), tiny_vae(), train=train_section(
        steps=6, lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule=schedule, save_every=2, log_every=1,
        synthetic_data=True, export=True), data=_data(stage, scale, res))
    cfg.data.global_batch_size = 8
    cfg.data.seq_len = 48 if res == 256 else 96
    cfg.data.max_image_tokens = 16 if res == 256 else 64
    return _dpo(cfg, scale) if stage == "dpo" else cfg
  raise ValueError(f"unknown scale {scale!r}; one of 14b, tiny (demo configs live in configs/demo/)")
