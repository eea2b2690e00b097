"""NextStep-GRPO on the CPU demo model (configs/demo/stage1.py): the shapes evaluator as the reward, CPS rollouts
of the demo's export on the shapes world's captions. `benchmarks/grpo_demo.py` runs the experiment (GRPO →
before/after score on held-out prompts × 2 seeds, diversity; ≥ 2 training seeds):

  python -m benchmarks.grpo_demo --demo-workdir DEMO --workdir OUT [--config configs/demo/grpo.py:ci]

or by hand, after `nextstep-jax demo --workdir DEMO`:

  nextstep-jax train --config configs/demo/grpo.py --workdir OUT/grpo --config.train.init_from=DEMO/train/export \
      --config.train.vae_from=DEMO/vae --config.data.tokenizer=DEMO/vae/tokenizer
"""
import os

from nextstep_jax.config import load_config
from nextstep_jax.train.grpo_config import grpo_section
from nextstep_jax.train.recipe import as_grpo

_SIZES = {"full": dict(steps=60, prompts_per_step=16, eval_prompts=1000),
          "ci": dict(steps=8, prompts_per_step=8, eval_prompts=64)}


def get_config(arg=None):
  variant = arg or "full"
  cfg = load_config(f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stage1.py')}:{variant}")
  size = _SIZES[variant]
  t = cfg.train
  # lr: 1e-5 moved nothing, 3e-4 collapsed the model, 1e-4 gained (40-step pilots, docs/GRPO.md)
  t.steps, t.lr, t.end_lr, t.warmup_steps, t.schedule = size["steps"], 1e-4, 1e-4, 0, "constant"
  t.weight_decay, t.log_every, t.save_every, t.sample_every = 0.0, 1, 20, 0
  t.init_from = ""  # filled in: DEMO/train/export (also the reference)
  # 32 px images with the demo's f4 VAE and 2×2 patches: 4×4 tokens; the demo samples with 50 steps, RL rollouts
  # use 10 CPS steps (Flow-GRPO's "denoising reduction"); CFG off as in NextStep-1.1's RL
  grpo = grpo_section(group_size=8, sampler="cps", flow_steps=10, noise_level=0.7, grid_h=4, grid_w=4,
                      prompt_len=40, cfg=1.0, clip_range=1e-3, kl_weight=0.0, min_group_std=0.02,
                      max_group_mean=0.98, ref_dtype="float32", reward="shapes", prompts="shapes")
  cfg = as_grpo(cfg, grpo, rollout_rows=size["prompts_per_step"] * 8)
  # evaluation (benchmarks/grpo_demo.py): the demo's held-out prompts and sampler, as benchmarks/dpo_demo.py
  cfg.demo.grpo = dict(eval_prompts=size["eval_prompts"], eval_seeds=(0, 1), train_seeds=(0, 1), diversity_prompts=8,
                       diversity_seeds=8)
  return cfg
