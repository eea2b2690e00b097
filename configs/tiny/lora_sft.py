"""CPU-sized counterpart of `lora_sft`: tiny model, synthetic batches, a handful of steps (tests). The base
(`--config.train.init_from`) is a tiny model directory, e.g. a `configs/tiny/sft.py` run's WORKDIR/export."""
from nextstep_jax.train.lora import lora_section
from nextstep_jax.train.recipe import as_lora, experiment_tiny


def get_config(arg=None):
  cfg = experiment_tiny(train=dict(steps=4, lr=1e-2, end_lr=1e-3, warmup_steps=1, schedule="cosine"),
                        resolution=512)
  return as_lora(cfg, lora_section(rank=4, alpha=8.0, dropout=0.0,
                                   targets=("q", "k", "v", "o", "gate", "up", "down"), base_dtype="bfloat16"))
