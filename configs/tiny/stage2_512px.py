"""CPU-sized counterpart of stage `stage2_512px`: tiny model, synthetic batches, a handful of steps (tests)."""
from nextstep_jax.train.recipe import experiment_tiny


def get_config(arg=None):
  return experiment_tiny(train=dict(steps=6, lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule="constant"), resolution=512)
