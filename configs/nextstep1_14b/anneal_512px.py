"""NextStep-1 14B curriculum annealing at 512 px, from stage 2.

Spec §5; what every stage shares: nextstep_jax/train/recipe.py.

  nextstep-jax train --config configs/nextstep1_14b/anneal_512px.py --workdir gs://BUCKET/nextstep1/anneal_512px --multihost
  nextstep-jax aot --config configs/nextstep1_14b/anneal_512px.py --topology v5p-128
"""
from nextstep_jax.train.recipe import ROOT, data_14b, experiment_14b


def get_config(arg=None):
  return experiment_14b(
      train=dict(steps=20_000, lr=1e-5, end_lr=0.0, warmup_steps=500, schedule="cosine",
                 # one packed 8192-token row per chip per micro-batch on v5p-128 (docs/AOT.md)
                 microbatches=4,
                 init_from=f"{ROOT}/stage2_512px/export"),
      data=data_14b(resolution=512, mix={"text": 0.1, "t2i": 0.8, "edit": 0.1}, global_batch_size=256),
      mesh=dict(data=1, fsdp=-1, tensor=1))
