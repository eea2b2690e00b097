"""`nextstep-jax aot --program serve`: the engine's step compiles for a TPU pod (XLA:TPU, compile-only devices).
(The slots-that-fit search compiles it two or three times more: run by hand for the 14B table, not in CI.)"""
import json
import os

from nextstep_jax.cli import main

TINY1 = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "stage1_256px.py")
SMALL = ["--sample-resolution", "32", "--sample-prompt-len", "32", "--sample-steps", "4"]


def _json(capsys, *args):
  capsys.readouterr()
  code = main(["aot", "--json", "--config", TINY1, "--topology", "v5p-8", "--program", "serve", *SMALL, *args])
  return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_serve_step_compiles_for_v5p_8(capsys):
  code, r = _json(capsys, "--sample-batch", "4")
  assert code == 0 and r["fits"] and r["shape"]["slots"] == 4 and r["shape"]["rows"] == 8
  assert r["peak_gib"] < r["hbm_gib"]
