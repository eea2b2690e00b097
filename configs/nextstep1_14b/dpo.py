"""NextStep-1 14B stage `dpo`: flow-matching DPO on preference pairs (recipe in nextstep_jax/train/recipe.py).

Policy and frozen reference both start from the SFT export (config.train.init_from); the reference is held in
bf16 (config.dpo.ref_dtype) with the policy's shardings. Pairs: `nextstep-jax data prefs` (ns_prefs datasets).

  nextstep-jax data prefs --model gs://BUCKET/nextstep1/sft/export --prompts prompts.txt --k 4 \
      --scorer mypkg.reward:score --size 512 --steps 50 --cfg 7.5 --dst gs://BUCKET/nextstep1/data/prefs_512px
  nextstep-jax train --config configs/nextstep1_14b/dpo.py --workdir gs://BUCKET/nextstep1/dpo --multihost
"""
from nextstep_jax.train.recipe import stage_config


def get_config(arg=None):
  return stage_config("dpo", "14b")
