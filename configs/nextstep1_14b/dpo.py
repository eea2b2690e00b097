"""NextStep-1 14B stage `dpo`: flow-matching DPO on preference pairs, from the SFT export (train/dpo.py).

Policy and frozen reference both start from the SFT export (config.train.init_from); the reference is held in
bf16 (config.dpo.ref_dtype) with the policy's shardings. Pairs: `nextstep-jax data prefs` (ns_prefs datasets).

  nextstep-jax data prefs --model gs://BUCKET/nextstep1/sft/export --prompts prompts.txt --k 4 \
      --scorer mypkg.reward:score --size 512 --steps 50 --cfg 7.5 --dst gs://BUCKET/nextstep1/data/prefs_512px
  nextstep-jax train --config configs/nextstep1_14b/dpo.py --workdir gs://BUCKET/nextstep1/dpo --multihost
"""
from nextstep_jax.train.dpo import dpo_section
from nextstep_jax.train.recipe import ROOT, as_dpo, data_14b, experiment_14b


def get_config(arg=None):
  cfg = experiment_14b(
      # a starting point (not tuned): a Diffusion-DPO-style small lr
      train=dict(steps=2_000, lr=1e-6, end_lr=1e-6, warmup_steps=100, schedule="constant",
                 # one pair (two policy rows of 1536 tokens) per chip per micro-batch on v5p-128 (docs/AOT.md)
                 microbatches=2,
                 init_from=f"{ROOT}/sft/export"),
      data=data_14b(resolution=512, mix={"prefs": 1.0}),
      mesh=dict(data=1, fsdp=-1, tensor=1))
  # caption (≤ ~500 tokens) + 32×32 image block + eos per row; 128 pairs = 256 policy rows
  return as_dpo(cfg, dpo_section(), seq_len=1536, max_image_tokens=1024, global_batch_size=128)
