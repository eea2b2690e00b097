"""DPO on the reduced CPU demo (benchmarks/dpo_demo.py): pairs of the demo model's own samples ranked by the shapes
evaluator raise the evaluator's score on held-out prompts, and samples for one prompt stay diverse.

Uses the session's reduced demo (the `reduced_demo` fixture in conftest.py; NEXTSTEP_DEMO_WORKDIR to reuse one)."""
import json
import os

import pytest

from conftest import ROOT, run_cli


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_dpo_raises_the_evaluator_score_of_the_demo_model_without_collapse(reduced_demo, tmp_path):
  demo, _ = reduced_demo
  out = run_cli(["benchmarks.dpo_demo", "--demo-workdir", demo, "--workdir", str(tmp_path / "dpo"),
                 "--config", os.path.join(ROOT, "configs", "demo", "dpo.py:ci")], timeout=2400)
  print(out[-1500:])
  r = json.loads((tmp_path / "dpo" / "dpo_demo.json").read_text())
  before, after = r["before"], r["after"]
  assert r["pairs"]["pairs"] >= 100 and r["dpo_last"]["reward_accuracy"] > 0.6  # DPO learned the preferences
  assert after["attribute_score"] >= before["attribute_score"] + 0.03, (before, after)
  assert after["fully_correct"] >= before["fully_correct"], (before, after)
  assert after["pixel_distance"] >= 0.5 * before["pixel_distance"], (before, after)
  assert after["distinct_layouts"] >= 0.5 * before["distinct_layouts"], (before, after)
