"""CPU-sized counterpart of stage `edit`: tiny model, synthetic batches, a handful of steps (tests)."""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("edit", "tiny")
