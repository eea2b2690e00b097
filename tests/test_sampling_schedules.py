"""Per-token step schedules, guidance windows and the multistep solver in the compiled generation program
(fixture model, 4×4 token grid): each shortcut is checked against a run it must reproduce exactly."""
import dataclasses

import numpy as np
import pytest

from nextstep_jax.convert.nextstep import convert_nextstep
from nextstep_jax.sampling.pipeline import Options, Sampler

BASE = Options(height=16, width=16, steps=3, cfg=3.0, positive_prompt=None, negative_prompt="", buckets=(32,),
               independent_noise=True, num_images_per_prompt=2)


@pytest.fixture(scope="module")
def sampler(fixtures_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("schedules") / "model"
  convert_nextstep(fixtures_dir, out)
  return Sampler.from_checkpoint(out)


@pytest.fixture(scope="module")
def reference(sampler):
  return sampler.text_to_image(["a red cube"], dataclasses.replace(BASE, decode=False)).tokens


def _run(sampler, **kw):
  return sampler.text_to_image(["a red cube"], dataclasses.replace(BASE, decode=False, **kw)).tokens


def test_schedule_changes_only_the_later_segment(sampler, reference):
  """(3, 2) runs the dynamic-count program (padded grid table, traced trip count): tokens 0..7 take 3 steps with
  the same draws → identical to the static 3-step program; tokens 8..15 take 2."""
  got = _run(sampler, step_schedule=(3, 2))
  np.testing.assert_allclose(got[:, :8], reference[:, :8], atol=1e-5)
  assert np.abs(got[:, 8:] - reference[:, 8:]).max() > 1e-2


def test_guidance_windows_outside_run_the_conditional_branch_alone(sampler, reference):
  """Unguided evaluations equal cfg = 1 (a one-branch program): a token window from the middle on leaves the first
  half unguided (the time window takes the same `lax.cond`: tests/test_flow_solvers.py)."""
  unguided = _run(sampler, cfg=1.0)
  late = _run(sampler, guidance_tokens=(0.5, 1.0))
  np.testing.assert_allclose(late[:, :8], unguided[:, :8], atol=1e-5)
  assert np.abs(late[:, 8:] - unguided[:, 8:]).max() > 1e-2
  assert np.abs(unguided - reference).max() > 1e-2  # guidance matters for this model


def test_dpm_solver_samples(sampler):
  tokens = _run(sampler, method="dpm_2m", steps=4)
  assert tokens.shape == (2, 16, 64) and np.isfinite(tokens).all()
  with pytest.raises(ValueError, match="step_schedule"):
    sampler.text_to_image("x", dataclasses.replace(BASE, step_schedule=(4,)))
