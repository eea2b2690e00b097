"""Objectives are plug-ins: a third objective registered here (not in the package) trains through `loop.train`
and the AOT-style abstract lowering without any change to the loop."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from conftest import ROOT
from nextstep_jax import sharding
from nextstep_jax.config import load_config
from nextstep_jax.train import registry
from nextstep_jax.train.loop import train
from nextstep_jax.train.objective import StepProgram
from nextstep_jax.train.step import FlowMatching, jit_train_step


class ImageLossOnly(FlowMatching):
  """Flow matching without the text loss (lm_loss_weight 0): the reported loss is the image loss alone."""
  name = "image_only"

  def _program(self, ctx):
    cfg = dataclasses.replace(ctx.cfg, lm_loss_weight=0.0)
    with sharding.use_mesh(ctx.mesh):
      return jit_train_step(cfg, ctx.tx, ctx.schedule, ctx.run.microbatches, ctx.state_shardings,
                            ctx.batch_shardings, ctx.mesh)

  def make_step(self, ctx, init_params=None):
    self.built = getattr(self, "built", 0) + 1
    return StepProgram(self._program(ctx))


@pytest.fixture
def image_only(monkeypatch):
  objective = ImageLossOnly()
  monkeypatch.setitem(registry.OBJECTIVES, objective.name, objective)
  return objective


def test_a_registered_third_objective_trains_through_the_loop(image_only, tmp_path):
  cfg = load_config(os.path.join(ROOT, "configs", "tiny", "stage1_256px.py"),
                    ["--config.train.objective=image_only", "--config.train.export=False"])
  result = train(cfg, str(tmp_path / "run"), max_steps=2)
  assert result.step == 2 and image_only.built == 1
  m = result.last_metrics
  assert np.isfinite(m["loss"]) and m["text_loss"] > 0
  np.testing.assert_allclose(m["loss"], m["image_loss"], rtol=1e-6)  # the text loss no longer counts


def test_unknown_objective_names_the_registry(tmp_path):
  cfg = load_config(os.path.join(ROOT, "configs", "tiny", "stage1_256px.py"), ["--config.train.objective=nope"])
  with pytest.raises(ValueError, match="train/registry.py"):
    train(cfg, str(tmp_path / "run"), max_steps=1)
  assert jax.device_count() == 8  # nothing else touched
