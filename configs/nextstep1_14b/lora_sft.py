"""LoRA supervised fine-tuning of NextStep-1-Large (14B) at 512 px on an 8-chip slice (train/lora.py).

Start from the converted release checkpoint (the base stays frozen in bf16; `--config.lora.base_dtype=int8`
for QLoRA, or convert with `--quantize int8`):

  nextstep-jax convert nextstep --src NextStep-1-Large --dst ckpt/nextstep1-large --dtype bfloat16
  nextstep-jax train --config configs/nextstep1_14b/lora_sft.py --workdir gs://BUCKET/lora_sft \
      --config.train.init_from=ckpt/nextstep1-large --config.data.sources='[...your t2i dataset...]'
  nextstep-jax aot --config configs/nextstep1_14b/lora_sft.py --topology v5e-8     # fit table: docs/LORA.md

Checkpoints hold the adapters only; WORKDIR/export is the merged model (`sample`/`serve` load it),
WORKDIR/export_adapters the adapters alone with a pointer to the base.
"""
from nextstep_jax.train.lora import lora_section
from nextstep_jax.train.recipe import ROOT, as_lora, data_14b, experiment_14b


def get_config(arg=None):
  cfg = experiment_14b(
      train=dict(steps=2_000, lr=1e-4, end_lr=1e-5, warmup_steps=100, schedule="cosine",
                 # two packed 8192-token rows per chip per step on 8 chips, one per micro-batch
                 microbatches=2, save_every=500,
                 init_from=f"{ROOT}/nextstep1-large"),  # converted release checkpoint (frozen base)
      data=data_14b(resolution=512, mix={"t2i": 1.0}, global_batch_size=16),
      mesh=dict(data=1, fsdp=-1, tensor=1))
  return as_lora(cfg, lora_section(rank=16, alpha=32.0, dropout=0.0,
                                   targets=("q", "k", "v", "o", "gate", "up", "down"), base_dtype="bfloat16"))
