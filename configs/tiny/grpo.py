"""CPU-sized counterpart of stage `grpo`: tiny model, synthetic prompt rows, latent-preview images, a reward
callable over them (tests). 4 prompts × G = 2 rollouts of a 2×2-token image, 4 CPS flow steps."""
from nextstep_jax.train.grpo_config import grpo_section
from nextstep_jax.train.recipe import as_grpo, experiment_tiny


def get_config(arg=None):
  cfg = experiment_tiny(train=dict(steps=3, lr=1e-3, end_lr=1e-3, warmup_steps=0, schedule="constant"), resolution=256)
  # fp32 reference: at step 0 it reproduces the policy's transition means exactly (KL 0)
  grpo = grpo_section(group_size=2, sampler="cps", flow_steps=4, grid_h=2, grid_w=2, prompt_len=12, kl_weight=0.1,
                      ref_dtype="float32", reward="nextstep_jax.train.rewards:brightness_reward")
  return as_grpo(cfg, grpo, rollout_rows=8)
