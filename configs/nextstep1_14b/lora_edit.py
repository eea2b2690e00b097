"""LoRA image-editing fine-tuning of NextStep-1-Large-Edit (14B) at 512 px on an 8-chip slice (train/lora.py).

  nextstep-jax convert nextstep --src NextStep-1-Large-Edit --dst ckpt/nextstep1-large-edit --dtype bfloat16
  nextstep-jax train --config configs/nextstep1_14b/lora_edit.py --workdir gs://BUCKET/lora_edit \
      --config.train.init_from=ckpt/nextstep1-large-edit --config.data.sources='[...your edit dataset...]'
  nextstep-jax aot --config configs/nextstep1_14b/lora_edit.py --topology v5p-8

Adapters also on the image in/out projectors: editing reads a source image through them.
"""
from nextstep_jax.train.lora import lora_section
from nextstep_jax.train.recipe import ROOT, as_lora, data_14b, experiment_14b


def get_config(arg=None):
  cfg = experiment_14b(
      train=dict(steps=4_000, lr=1e-4, end_lr=1e-5, warmup_steps=200, schedule="cosine",
                 microbatches=2, save_every=500,
                 init_from=f"{ROOT}/nextstep1-large-edit"),  # converted release checkpoint (frozen base)
      data=data_14b(resolution=512, mix={"t2i": 0.3, "edit": 0.7}, global_batch_size=16),
      mesh=dict(data=1, fsdp=-1, tensor=1))
  return as_lora(cfg, lora_section(rank=32, alpha=32.0, dropout=0.05,
                                   targets=("q", "k", "v", "o", "gate", "up", "down", "image_in", "image_out"),
                                   base_dtype="bfloat16"))
