"""CPU-sized counterpart of stage `dpo`: tiny model, synthetic preference pairs, a handful of steps (tests)."""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("dpo", "tiny")
