"""NextStep-1 14B curriculum stage `sft` (recipe in nextstep_jax/train/recipe.py).

  nextstep-jax train --config configs/nextstep1_14b/sft.py --workdir gs://BUCKET/nextstep1/sft --multihost
  nextstep-jax aot --config configs/nextstep1_14b/sft.py --topology v5p-256
"""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("sft", "14b")
