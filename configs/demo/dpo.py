"""DPO on the CPU demo model (configs/demo/stage1.py): flow-matching DPO on shapes-evaluator-ranked pairs of its
own samples. Policy and frozen reference start from the demo's export; `config.demo` (sampler settings) is the
demo's. `benchmarks/dpo_demo.py` runs the whole experiment (pairs → DPO → before/after score and diversity):

  python -m benchmarks.dpo_demo --demo-workdir DEMO --workdir OUT [--config configs/demo/dpo.py:ci]

or by hand, after `nextstep-jax demo --workdir DEMO`:

  nextstep-jax data prefs --model DEMO/train/export --shapes 512 --k 4 --scorer shapes --size 32 --steps 25 \
      --cfg 3 --sampler euler --dst OUT/prefs
  nextstep-jax train --config configs/demo/dpo.py --workdir OUT/dpo --config.train.init_from=DEMO/train/export \
      --config.train.vae_from=DEMO/vae --config.data.tokenizer=DEMO/vae/tokenizer \
      --config.data.sources='[{"name": "prefs", "path": "OUT/prefs", "weight": 1.0, "kind": ""}]'
"""
import os

from nextstep_jax.config import load_config
from nextstep_jax.train.dpo import dpo_section

# pairs per prompt set, DPO length — full demo vs reduced (CI) demo
_SIZES = {
    "full": dict(pair_prompts=1024, heldout_pair_prompts=256, steps=200, eval_prompts=200),
    "ci": dict(pair_prompts=384, heldout_pair_prompts=128, steps=120, eval_prompts=128),
}


def get_config(arg=None):
  variant = arg or "full"
  stage1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")
  cfg = load_config(f"{stage1}:{variant}")
  size = _SIZES[variant]
  t = cfg.train
  t.objective = "dpo"
  # lr / β / sft_weight: the best of a sweep on the reduced demo (benchmarks/dpo_demo.py; docs/DEMO.md)
  t.steps, t.lr, t.end_lr, t.warmup_steps, t.schedule = size["steps"], 2e-5, 2e-5, 10, "constant"
  t.weight_decay, t.log_every, t.save_every, t.sample_every = 0.0, 10, 50, 0
  t.init_from = ""  # filled in: DEMO/train/export (also the reference)
  # the reference's matrices are cast to the compute dtype like the policy's, so at step 0 their errors agree
  cfg.dpo = dpo_section(beta=500.0, sft_weight=1.0, ref_dtype="float32")
  d = cfg.data
  d.sources = [dict(name="prefs", path="", weight=1.0, kind="")]  # filled in: the ns_prefs dataset
  d.drop_text_prob, d.pack, d.global_batch_size = 0.0, False, 32
  # pair making (benchmarks/dpo_demo.py; `nextstep-jax data prefs` flags of the same names)
  cfg.demo.dpo = dict(pair_prompts=size["pair_prompts"], heldout_pair_prompts=size["heldout_pair_prompts"], k=4,
                      margin=0.15, prompt_seed=7, prompts_per_call=64, eval_prompts=size["eval_prompts"],
                      eval_seeds=(0, 1), diversity_prompts=8, diversity_seeds=8)
  return cfg
