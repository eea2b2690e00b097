"""The training loop: exact resume after SIGKILL, SIGTERM save-and-exit, restore onto another mesh, stage chaining,
and the 14B stage configs (abstract, no allocation)."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import ROOT, subprocess_env
from nextstep_jax import params_io, sharding
from nextstep_jax.config import ModelConfig, load_config
from nextstep_jax.train.loop import train
from nextstep_jax.train.metrics import read_history
from nextstep_jax.train.recipe import STAGES, stage_config
from nextstep_jax.train.state import load_init_params
from sharding_harness import max_relative_error

TINY1 = os.path.join(ROOT, "configs", "tiny", "stage1_256px.py")


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "nextstep_jax.cli", "train", "--config", TINY1, "--workdir", str(workdir),
          "--config.train.steps=12", "--config.train.save_every=1", "--config.train.log_every=1",
          "--config.data.global_batch_size=16", *extra]


def _run_until(cmd, marker: str, sig: int):
  """Starts `cmd`, waits for a stdout line starting with `marker`, sends `sig`; returns (returncode, output)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(8),
                          cwd=ROOT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(marker):
      proc.send_signal(sig)
      break
  rest, _ = proc.communicate(timeout=600)
  return proc.returncode, "".join(lines) + rest


def _losses(workdir):
  return [(h["step"], h["loss"], h["text_loss"], h["image_loss"]) for h in read_history(workdir)]


def _export_params(workdir):
  return traverse_util.flatten_dict(params_io.load_params(os.path.join(workdir, "export", "params")))


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  out = subprocess.run(_cmd(straight), capture_output=True, text=True, env=subprocess_env(8), cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  code, log = _run_until(_cmd(resumed), "step 5:", signal.SIGKILL)
  assert code == -signal.SIGKILL, log
  assert len(_losses(resumed)) >= 5
  out = subprocess.run(_cmd(resumed), capture_output=True, text=True, env=subprocess_env(8), cwd=ROOT, timeout=900)
  assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout + out.stderr
  a, b = _losses(straight), _losses(resumed)
  assert [s for s, *_ in a] == list(range(1, 13)) and a == b
  pa, pb = _export_params(straight), _export_params(resumed)
  assert set(pa) == set(pb)
  for k in pa:
    assert pa[k].tobytes() == pb[k].tobytes(), "/".join(k)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
  code, log = _run_until(_cmd(tmp_path / "w"), "step 3:", signal.SIGTERM)
  assert code == 0, log
  assert "SIGTERM: saved step" in log and "preempted at step" in log
  saved = int(log.split("SIGTERM: saved step ")[1].split(",")[0])
  assert saved >= 3 and (tmp_path / "w" / "checkpoints" / str(saved)).is_dir()
  assert not (tmp_path / "w" / "export").exists()


def _tiny(**over):
  cfg = load_config(TINY1, [f"--config.{k}={v}" for k, v in over.items()])
  cfg.data.global_batch_size = 16
  return cfg


def test_restore_onto_a_different_mesh_and_continue(tmp_path):
  straight = train(_tiny(), str(tmp_path / "a"))
  train(_tiny(), str(tmp_path / "b"), max_steps=4)  # written on mesh (8, 1, 1)
  result = train(_tiny(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path / "b"))
  assert straight.step == result.step == 6
  err = max_relative_error(_export_params(tmp_path / "b"), _export_params(tmp_path / "a"))
  print(f"(8,1,1)→(2,2,2) restore vs straight run: params max relative error {err:.1e}")
  assert err <= 1e-5
  hist = read_history(tmp_path / "b")
  assert [h["step"] for h in hist] == list(range(1, 7))


def test_ema_run_exports_the_average_and_trains_the_same_params(tmp_path):
  """`train.ema_decay`: the export is the moving average; the trajectory itself is unchanged (the raw params in
  the EMA run's checkpoint == the export of the same run without EMA)."""
  train(_tiny(**{"train.ema_decay": 0.5}), str(tmp_path / "ema"))
  train(_tiny(), str(tmp_path / "plain"))
  mesh = sharding.make_mesh(_tiny().mesh)
  raw = traverse_util.flatten_dict(jax.device_get(
      load_init_params(str(tmp_path / "ema"), ModelConfig.from_dict(_tiny().model), mesh)))
  plain, ema = _export_params(tmp_path / "plain"), _export_params(tmp_path / "ema")
  assert max_relative_error(raw, plain) <= 1e-6
  assert max_relative_error(ema, plain) > 1e-3


def test_stage2_initialises_from_stage1_params_with_fresh_optimizer(tmp_path):
  from nextstep_jax.train.optimizer import make_optimizer
  from nextstep_jax.train.state import init_state
  train(_tiny(), str(tmp_path / "s1"))
  cfg2 = load_config(os.path.join(ROOT, "configs", "tiny", "stage2_512px.py"),
                     [f"--config.train.init_from={tmp_path / 's1'}"])
  model = ModelConfig.from_dict(cfg2.model)
  mesh = sharding.make_mesh(cfg2.mesh)
  given = load_init_params(cfg2.train.init_from, model, mesh)
  tx, _ = make_optimizer(cfg2.train)
  state = init_state(model, tx, mesh, jax.random.key(5), params=given)
  s1 = _export_params(tmp_path / "s1")
  for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items():
    np.testing.assert_array_equal(v, s1[k], err_msg="/".join(k))
  assert int(state.step) == 0
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  # and the stage-2 run itself starts from there (from the export dir this time)
  cfg2.train.init_from = str(tmp_path / "s1" / "export")
  cfg2.data.global_batch_size = 16
  res = train(cfg2, str(tmp_path / "s2"), max_steps=2)
  assert res.step == 2 and np.isfinite(res.last_metrics["loss"])


@pytest.mark.parametrize("stage", STAGES)
def test_14b_stage_configs_build_abstractly_and_shard(stage):
  from nextstep_jax.data.config import validate_data_config
  from nextstep_jax.models.nextstep import abstract_params
  cfg = stage_config(stage, "14b")
  model = ModelConfig.from_dict(cfg.model)
  validate_data_config(cfg.data)
  abstract, names = abstract_params(model)
  mesh = jax.sharding.AbstractMesh((1, 64, 1), sharding.MESH_AXES)
  frac = sharding.assert_params_sufficiently_sharded(abstract, sharding.tree_shardings(names, abstract, mesh))
  assert frac < 0.02
  assert cfg.train.init_from  # every stage starts from the previous one (stage 1 from converted Qwen2.5-14B)
