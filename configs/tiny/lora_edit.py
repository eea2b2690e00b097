"""CPU-sized counterpart of `lora_edit`: tiny model, synthetic batches, QLoRA (int8 base), adapters on the
projectors and the flow head too (tests). Base: `--config.train.init_from` (a tiny model directory)."""
from nextstep_jax.train.lora import lora_section
from nextstep_jax.train.recipe import as_lora, experiment_tiny


def get_config(arg=None):
  cfg = experiment_tiny(train=dict(steps=4, lr=1e-2, end_lr=1e-3, warmup_steps=1, schedule="cosine"),
                        resolution=512)
  return as_lora(cfg, lora_section(rank=4, alpha=4.0, dropout=0.1,
                                   targets=("q", "k", "v", "o", "gate", "up", "down", "image_in", "image_out",
                                            "head"), base_dtype="int8"))
