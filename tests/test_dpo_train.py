"""The DPO stage through `train` (objective dispatch): starts from `init_from` with the reference = those params
(loss ≈ log 2 at step 1), resumes exactly (the reference is rebuilt identically), exports; the 14B DPO config."""
import math
import os

import numpy as np
from flax import traverse_util

from conftest import ROOT
from nextstep_jax import params_io
from nextstep_jax.config import ModelConfig, load_config
from nextstep_jax.train.loop import train
from nextstep_jax.train.metrics import read_history
from train_utils import random_params

TINY_DPO = os.path.join(ROOT, "configs", "tiny", "dpo.py")


def _config(init_dir, **over):
  over = {"train.steps": 4, "train.save_every": 1, "train.init_from": str(init_dir), **over}
  return load_config(TINY_DPO, [f"--config.{k}={v}" for k, v in over.items()])


def test_dpo_stage_starts_at_log2_and_resumes_exactly(tmp_path):
  cfg = _config(tmp_path / "init")
  params = random_params(ModelConfig.from_dict(cfg.model))  # a "previous stage" export with nothing zero
  params_io.save_params(tmp_path / "init" / "params", params)
  straight = train(cfg, str(tmp_path / "a"))
  train(cfg, str(tmp_path / "b"), max_steps=2)
  resumed = train(cfg, str(tmp_path / "b"))
  assert straight.step == resumed.step == 4
  ha, hb = read_history(tmp_path / "a"), read_history(tmp_path / "b")
  first = ha[0]
  print(f"step 1: dpo_loss − log 2 = {first['dpo_loss'] - math.log(2):.1e}, margin {first['reward_margin']:.1e}; "
        f"step 4: dpo_loss {ha[-1]['dpo_loss']:.4f}, accuracy {ha[-1]['reward_accuracy']:.2f}")
  assert abs(first["dpo_loss"] - math.log(2)) <= 2e-7 * cfg.dpo.beta  # policy = reference (fp32 rounding × β)
  assert [h["step"] for h in hb] == [1, 2, 3, 4]
  for x, y in zip(ha, hb):
    for k in ("loss", "dpo_loss", "reward_margin", "error_w_gap", "grad_norm"):
      assert x[k] == y[k], (x["step"], k)
  pa = traverse_util.flatten_dict(params_io.load_params(tmp_path / "a" / "export" / "params"))
  pb = traverse_util.flatten_dict(params_io.load_params(tmp_path / "b" / "export" / "params"))
  assert all(pa[k].tobytes() == pb[k].tobytes() for k in pa)
  assert any(not np.array_equal(pa[k], v) for k, v in traverse_util.flatten_dict(params).items())


def test_14b_dpo_config_starts_from_sft_with_a_bf16_reference():
  from nextstep_jax.data.config import validate_data_config
  from nextstep_jax.train.dpo import DpoConfig
  cfg = load_config(os.path.join(ROOT, "configs", "nextstep1_14b", "dpo.py"))
  assert cfg.train.objective == "dpo" and cfg.train.init_from.endswith("/sft/export") and not cfg.dpo.ref_from
  d = DpoConfig.from_config(cfg.dpo)
  assert d.ref_dtype == "bfloat16" and d.beta > 0
  data = validate_data_config(cfg.data)
  assert not data.pack and data.drop_text_prob == 0 and data.image_slots == 1024 and data.seq_len > 1024
  assert ModelConfig.from_dict(cfg.model).dtype == "bfloat16"
