"""NextStep-1 14B curriculum stage 1: 256 px pre-training from Qwen2.5-14B.

Spec §5; what every stage shares: nextstep_jax/train/recipe.py.

  nextstep-jax train --config configs/nextstep1_14b/stage1_256px.py --workdir gs://BUCKET/nextstep1/stage1_256px --multihost
  nextstep-jax aot --config configs/nextstep1_14b/stage1_256px.py --topology v5p-256
"""
from nextstep_jax.train.recipe import ROOT, data_14b, experiment_14b


def get_config(arg=None):
  return experiment_14b(
      train=dict(steps=300_000, lr=1e-4, end_lr=1e-5, warmup_steps=5000, schedule="cosine",
                 # one packed 8192-token row per chip per micro-batch on v5p-256 (docs/AOT.md)
                 microbatches=2,
                 init_from=f"{ROOT}/qwen2.5-14b"),  # `nextstep-jax convert qwen` output
      data=data_14b(resolution=256, mix={"text": 0.2, "t2i": 0.7, "edit": 0.1}, global_batch_size=256),
      mesh=dict(data=1, fsdp=-1, tensor=1))
