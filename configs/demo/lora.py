"""LoRA on the CPU demo model (configs/demo/stage1.py): teach the trained demo model something new with adapters
(benchmarks/lora_demo.py runs the LoRA vs full fine-tuning comparison). Base: the demo's export.

  nextstep-jax train --config configs/demo/lora.py --workdir OUT/lora --config.train.init_from=DEMO/train/export \
      --config.train.vae_from=DEMO/vae --config.data.tokenizer=DEMO/vae/tokenizer \
      --config.data.sources='[{"name": "new", "path": "OUT/data", "weight": 1.0, "kind": "t2i"}]'
"""
import os

from nextstep_jax.config import load_config
from nextstep_jax.train.lora import lora_section
from nextstep_jax.train.recipe import as_lora

_STEPS = {"full": 300, "ci": 60}


def get_config(arg=None):
  variant = arg or "full"
  stage1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")
  cfg = load_config(f"{stage1}:{variant}")
  t = cfg.train
  t.steps, t.lr, t.end_lr, t.warmup_steps, t.schedule = _STEPS[variant], 2e-3, 2e-4, 20, "cosine"
  t.log_every, t.save_every, t.sample_every = 10, 100, 0
  t.init_from = ""  # filled in: DEMO/train/export (the frozen base)
  cfg.data.sources = [dict(name="new", path="", weight=1.0, kind="t2i")]  # filled in
  return as_lora(cfg, lora_section(rank=8, alpha=16.0, dropout=0.0,
                                   targets=("q", "k", "v", "o", "gate", "up", "down", "image_in", "image_out",
                                            "head"), base_dtype="float32"))
