"""DPO on the reduced CPU demo (benchmarks/dpo_demo.py): pairs of the demo model's own samples ranked by the shapes
evaluator raise the evaluator's score on held-out prompts, and samples for one prompt stay diverse.

Needs a trained reduced demo: NEXTSTEP_DEMO_WORKDIR (a finished `nextstep-jax demo --config
configs/demo/stage1.py:ci` workdir) or, when unset, one is trained here first (~15 min on 2 cores)."""
import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one CPU device, as the demo
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _run(cmd, timeout):
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_dpo_raises_the_evaluator_score_of_the_demo_model_without_collapse(tmp_path):
  demo = os.environ.get("NEXTSTEP_DEMO_WORKDIR") or str(tmp_path / "demo")
  if not os.path.isdir(os.path.join(demo, "train", "export", "params")):
    _run([sys.executable, "-m", "nextstep_jax.cli", "demo", "--workdir", demo, "--config",
          os.path.join(ROOT, "configs", "demo", "stage1.py:ci")], timeout=2400)
  out = _run([sys.executable, "-m", "benchmarks.dpo_demo", "--demo-workdir", demo, "--workdir", str(tmp_path / "dpo"),
              "--config", os.path.join(ROOT, "configs", "demo", "dpo.py:ci")], timeout=2400)
  print(out[-1500:])
  r = json.loads((tmp_path / "dpo" / "dpo_demo.json").read_text())
  before, after = r["before"], r["after"]
  assert r["pairs"]["pairs"] >= 100 and r["dpo_last"]["reward_accuracy"] > 0.6  # DPO learned the preferences
  assert after["attribute_score"] >= before["attribute_score"] + 0.03, (before, after)
  assert after["fully_correct"] >= before["fully_correct"], (before, after)
  assert after["pixel_distance"] >= 0.5 * before["pixel_distance"], (before, after)
  assert after["distinct_layouts"] >= 0.5 * before["distinct_layouts"], (before, after)
