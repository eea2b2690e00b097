"""NextStep-1 14B curriculum stage `anneal_512px` (recipe in nextstep_jax/train/recipe.py).

  nextstep-jax train --config configs/nextstep1_14b/anneal_512px.py --workdir gs://BUCKET/nextstep1/anneal_512px --multihost
  nextstep-jax aot --config configs/nextstep1_14b/anneal_512px.py --topology v5p-256
"""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("anneal_512px", "14b")
