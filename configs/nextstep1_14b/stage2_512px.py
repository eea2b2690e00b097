"""NextStep-1 14B curriculum stage 2: 512 px, from stage 1.

Spec §5; what every stage shares: nextstep_jax/train/recipe.py.

  nextstep-jax train --config configs/nextstep1_14b/stage2_512px.py --workdir gs://BUCKET/nextstep1/stage2_512px --multihost
  nextstep-jax aot --config configs/nextstep1_14b/stage2_512px.py --topology v5p-256
"""
from nextstep_jax.train.recipe import ROOT, data_14b, experiment_14b


def get_config(arg=None):
  return experiment_14b(
      train=dict(steps=100_000, lr=1e-5, end_lr=1e-5, warmup_steps=1000, schedule="constant",
                 # one packed 8192-token row per chip per micro-batch on v5p-256 (docs/AOT.md)
                 microbatches=2,
                 init_from=f"{ROOT}/stage1_256px/export"),
      data=data_14b(resolution=512, mix={"text": 0.2, "t2i": 0.7, "edit": 0.1}, global_batch_size=256),
      mesh=dict(data=1, fsdp=-1, tensor=1))
