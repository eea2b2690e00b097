"""Per-slot image grids (models/image_grid.py): the training condition uses the same gen_pos_embed entries as the
sampler, and the official input noise has the official profile (torch.linspace over the latent, raster order)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.models.image_grid import GRID_KEY, grid_slots, input_noise_scale
from nextstep_jax.models.latents import patchify
from nextstep_jax.models.nextstep import NextStep, draw_fm_noise, draw_input_noise, sincos_2d_table
from nextstep_jax.train.synthetic import synthetic_batch
from train_utils import TINY, random_params

ROWS, COLS = 2, 3  # a 2×3 token grid: training must not read it as one row of the 8-wide base grid
CFG = dataclasses.replace(TINY, use_gen_pos_embed=True, base_image_grid_size=8)


@pytest.fixture(scope="module")
def setup():
  params = jax.tree.map(jnp.asarray, random_params(CFG))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(CFG, 0, 2, 24, ROWS * COLS).items()}
  return params, batch


def test_grid_slots_is_raster_order():
  np.testing.assert_array_equal(grid_slots(2, 3), [[0, 0, 2, 3], [0, 1, 2, 3], [0, 2, 2, 3],
                                                   [1, 0, 2, 3], [1, 1, 2, 3], [1, 2, 2, 3]])


def test_training_condition_uses_the_samplers_position_embeddings(setup):
  """The condition inside loss_terms equals `condition(h, k, grid_w=COLS)` — the sampler's call — and differs from
  reading the tokens as row 0 of the base grid (the old training convention)."""
  params, batch = setup
  model = NextStep(CFG)
  assert batch[GRID_KEY].shape == (2, ROWS * COLS, 4)
  noise, u = draw_fm_noise(CFG, jax.random.key(1), 2, ROWS * COLS)
  _, state = model.apply(params, batch, noise, u, method=NextStep.loss_terms,
                         capture_intermediates=lambda mdl, _: mdl.name == "image_out_projector")
  got = state["intermediates"]["image_out_projector"]["__call__"][0]  # (B·T, D)
  _, h = model.apply(params, batch["input_ids"], batch["image_tokens"], batch["attention_mask"])
  ph = [np.flatnonzero(np.asarray(batch["input_ids"][r]) == CFG.image_placeholder_id) for r in range(2)]
  h_prev = jnp.concatenate([h[r, ph[r] - 1] for r in range(2)])  # the hidden before each placeholder
  k = jnp.tile(jnp.arange(ROWS * COLS), 2)
  sampler_cond = model.apply(params, h_prev, k, COLS, method=NextStep.condition)
  np.testing.assert_allclose(got, sampler_cond, atol=1e-5)
  old_cond = model.apply(params, h_prev, k, None, method=NextStep.condition)
  assert float(jnp.max(jnp.abs(got - old_cond))) > 1e-2
  table = sincos_2d_table(CFG.hidden_size, 8)
  assert not np.allclose(table[3], table[8])  # token 3 = (1, 0) → entry 8, not entry 3


def test_input_noise_scale_is_the_official_linspace_over_the_latent():
  p, c, s = 2, 16, 0.7
  h, w = ROWS * p, COLS * p
  sigma = np.linspace(0.0, s, h * w, dtype=np.float32).reshape(1, h, w, 1)  # official: .view(1, 1, h, w) on NCHW
  want = patchify(jnp.asarray(np.broadcast_to(sigma, (1, h, w, c))), p)
  got = input_noise_scale(jnp.asarray(grid_slots(ROWS, COLS))[None], p, c, s)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_input_noise_changes_only_what_the_lm_reads(setup):
  params, batch = setup
  cfg = dataclasses.replace(CFG, input_noise_strength=0.5)
  b, t = batch["image_tokens"].shape[:2]
  noise, u = draw_fm_noise(cfg, jax.random.key(1), b, t)
  (eps,) = draw_input_noise(cfg, jax.random.key(1), b, t)
  assert draw_input_noise(CFG, jax.random.key(1), b, t) == ()
  terms = lambda c, *e: NextStep(c).apply(params, batch, noise, u, *e, method=NextStep.loss_terms)
  clean, noisy = terms(cfg), terms(cfg, eps[0])
  np.testing.assert_allclose(clean["fm_sum"], terms(CFG)["fm_sum"], rtol=1e-6)  # strength only acts with ε
  assert abs(float(noisy["fm_sum"]) - float(clean["fm_sum"])) > 1e-4 * abs(float(clean["fm_sum"]))
  assert float(noisy["fm_count"]) == float(clean["fm_count"])
  # the targets stay clean: noise on the LM input through a zero in-projector changes nothing
  zero_in = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "image_in_projector" in jax.tree_util.keystr(path) else x, params)
  z = lambda *e: NextStep(cfg).apply(zero_in, batch, noise, u, *e, method=NextStep.loss_terms)["fm_sum"]
  np.testing.assert_allclose(z(eps[0]), z(), rtol=1e-6)


def test_missing_grid_is_a_clear_error(setup):
  params, batch = setup
  noise, u = draw_fm_noise(CFG, jax.random.key(1), 2, ROWS * COLS)
  no_grid = {k: v for k, v in batch.items() if k != GRID_KEY}
  with pytest.raises(ValueError, match="image_token_grid"):
    NextStep(CFG).apply(params, no_grid, noise, u, method=NextStep.loss_terms)


def test_training_refuses_data_grids_larger_than_the_position_table(tmp_path):
  """tiny stage 1 reads 256 px at 16 px per token in aspect buckets up to 8×32, larger than an 8² gen_pos_embed
  table."""
  import os
  from nextstep_jax.config import load_config
  from nextstep_jax.train.loop import train
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  cfg = load_config(os.path.join(root, "configs", "tiny", "stage1_256px.py"),
                    ["--config.model.use_gen_pos_embed=True", "--config.model.base_image_grid_size=8",
                     "--config.train.synthetic_data=False"])
  with pytest.raises(ValueError, match=r"a 8×32 token grid exceeds gen_pos_embed's 8² table"):
    train(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
