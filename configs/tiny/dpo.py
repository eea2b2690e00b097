"""CPU-sized counterpart of stage `dpo`: tiny model, synthetic preference pairs, a handful of steps (tests)."""
from nextstep_jax.train.dpo import dpo_section
from nextstep_jax.train.recipe import as_dpo, experiment_tiny


def get_config(arg=None):
  cfg = experiment_tiny(train=dict(steps=6, lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule="constant"), resolution=512)
  # fp32 compute: a bf16 reference would not reproduce the policy's errors at step 0
  return as_dpo(cfg, dpo_section(ref_dtype="float32"), seq_len=48, max_image_tokens=16)
