"""NextStep-1 14B stage `grpo` (NextStep-1.1's "NextStep-GRPO"): on-policy RL from the annealed model (train/grpo.py).

Published (NextStep-1.1 release notes): full-parameter Flow-GRPO, PickScore + OCR rewards, CFG off during RL,
strictly on-policy (one update per rollout), log-probs recomputed in one parallel pass, a coefficients-preserving
(CPS) SDE for the log-prob, online rejection of groups whose rewards are all high or barely spread.
Not published — GUESSES, marked below: lr, steps, group size, prompts per step, flow steps, noise level, clip range,
KL weight, rejection thresholds (Flow-GRPO's values where it has one).

The reward runs as its own service (PickScore + OCR; request/response format in docs/GRPO.md):
  nextstep-jax train --config configs/nextstep1_14b/grpo.py --workdir gs://BUCKET/nextstep1/grpo --multihost \
      --config.grpo.reward=http://REWARD_HOST:8100/score --config.grpo.prompts=gs-fuse/prompts.txt
"""
from nextstep_jax.train.grpo_config import grpo_section
from nextstep_jax.train.recipe import ROOT, as_grpo, data_14b, experiment_14b


def get_config(arg=None):
  cfg = experiment_14b(
      train=dict(steps=1_000,  # GUESS
                 lr=1e-6, end_lr=1e-6, warmup_steps=10, schedule="constant",  # GUESS (full-parameter RL: small lr)
                 weight_decay=0.0,
                 microbatches=4,  # 64 rollout rows per micro-batch over v5p-128's 64 chips (docs/GRPO.md)
                 init_from=f"{ROOT}/anneal_512px/export"),  # the annealed model (published)
      data=data_14b(resolution=512, mix={"prefs": 1.0}),  # only the tokenizer is read: prompts come from config.grpo
      mesh=dict(data=1, fsdp=-1, tensor=1))
  grpo = grpo_section(
      sampler="cps",  # published: CPS
      cfg=1.0,  # published: CFG off
      group_size=16,  # GUESS (Flow-GRPO: 16–24)
      flow_steps=10, noise_level=0.7,  # GUESS (Flow-GRPO trains on 10-step rollouts, a = 0.7)
      grid_h=32, grid_w=32,  # 512 px (published resolution of the 1.1 release)
      prompt_len=256,
      clip_range=1e-3, adv_clip=5.0, kl_weight=0.04,  # GUESS (Flow-GRPO: clip 1e-4…1e-3, β 0.04)
      min_group_std=0.02, max_group_mean=0.95,  # GUESS thresholds for the published rejection rule
      ref_dtype="bfloat16",
      reward="http://127.0.0.1:8100/score",  # PickScore + OCR service (published rewards; the service is yours)
      prompts="prompts.txt")  # one prompt per line
  return as_grpo(cfg, grpo, rollout_rows=256)  # 16 prompts × 16 samples per step (GUESS)
