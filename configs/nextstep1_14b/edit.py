"""NextStep-1 14B curriculum stage `edit` (recipe in nextstep_jax/train/recipe.py).

  nextstep-jax train --config configs/nextstep1_14b/edit.py --workdir gs://BUCKET/nextstep1/edit --multihost
  nextstep-jax aot --config configs/nextstep1_14b/edit.py --topology v5p-256
"""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("edit", "14b")
