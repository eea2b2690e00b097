"""A run whose loss stays non-finite stops with one line (exit code 4) and exports nothing."""
import os

from conftest import ROOT
from nextstep_jax import cli

TINY1 = os.path.join(ROOT, "configs", "tiny", "stage1_256px.py")


def test_consecutive_nonfinite_steps_stop_the_run_without_export(tmp_path, capsys):
  workdir = tmp_path / "work"
  # lr 1e30: the first update blows the weights up, every later loss is non-finite and its update skipped
  code = cli.main(["train", "--config", TINY1, "--workdir", str(workdir), "--config.train.lr=1e30",
                   "--config.train.end_lr=1e30", "--config.train.warmup_steps=0", "--config.train.steps=20",
                   "--config.train.max_nonfinite_steps=3", "--config.train.save_every=100"])
  lines = [l for l in capsys.readouterr().out.splitlines() if "error" in l]
  assert code == 4
  assert len(lines) == 1 and "non-finite for 3 consecutive steps (from step 2)" in lines[0], lines
  assert not (workdir / "export").exists() and not (workdir / "checkpoints" / "20").exists()
