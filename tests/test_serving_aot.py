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


def test_slots_that_fit_extrapolates_from_a_peak_that_grows():
  from nextstep_jax import aot
  from nextstep_jax.config import load_config
  from nextstep_jax.serving.aot import MIN_GROWTH, slots_that_fit
  settings = aot.SampleSettings(steps=4, prompt_len=32, resolution=32)
  fit = slots_that_fit(load_config(TINY1), "v5p-8", settings)
  (a, first), (b, second) = fit.probes
  assert b > a and second - first >= MIN_GROWTH * first and fit.per_slot_gib > 0, fit.probes
  assert fit.slots > b and fit.slots % 4 == 0, fit  # a multiple of data × fsdp (v5p-8: 4 chips)
  assert fit.fixed_gib + fit.slots * fit.per_slot_gib <= fit.hbm_gib < fit.fixed_gib + (fit.slots + 4) * fit.per_slot_gib
