"""Parity with the official PyTorch code at production-like settings (tests/fixtures/production, README there):
a release checkpoint in four safetensors shards + index, the real Flux VAE's scale 0.3611 / shift 0.1159,
`use_gen_pos_embed` on, editing with cfg_img = 1, the `linear` CFG schedule without `use_norm`, prompts padded
beyond their exact length, and a training loss with partial image-loss masks and unequal token counts per row."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import PRODUCTION
from nextstep_jax import params_io
from nextstep_jax.convert.nextstep import export_nextstep
from nextstep_jax.convert.safetensors_io import SafetensorsReader
from nextstep_jax.models import flux_vae
from nextstep_jax.models.image_grid import grid_slots
from nextstep_jax.models.latents import patchify
from nextstep_jax.models.nextstep import NextStep, combine_losses, loss_counts, sincos_2d_table
from nextstep_jax.sampling.pipeline import Options, Sampler

SHARDS = sorted(PRODUCTION.glob("model-*-of-*.safetensors"))


def _npz(name):
  return dict(np.load(PRODUCTION / name))


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _err(name, got, want):
  e = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
  print(f"{name}: max abs error {e:.2e}")
  return e


@pytest.fixture(scope="module")
def model_dir(production_model_dir):
  return production_model_dir


@pytest.fixture(scope="module")
def sampler(model_dir):
  return Sampler.from_checkpoint(model_dir)


@pytest.fixture(scope="module")
def sampler_no_gpe(sampler):
  """The same weights with use_gen_pos_embed off (the official calls that toggled it off)."""
  s = sampler
  return Sampler(dataclasses.replace(s.cfg, use_gen_pos_embed=False), s.params, s.vae_cfg, s.vae_params, s.tokenizer,
                 s.mesh, s.param_shardings)


@pytest.fixture(scope="module")
def stacked_params(model_dir):
  return params_io.load_params(model_dir / "params")


def _official_tensors():
  index = json.loads((PRODUCTION / "model.safetensors.index.json").read_text())
  out = {}
  for shard in sorted(set(index["weight_map"].values())):
    out.update(load_file(str(PRODUCTION / shard)))
  assert set(out) == set(index["weight_map"])
  return out


# ------------------------------------------------------------------------------------------- checkpoint, VAE

def test_fixture_is_a_multi_file_release_with_production_vae_factors():
  assert len(SHARDS) >= 3 and not (PRODUCTION / "model.safetensors").exists()
  vae = json.loads((PRODUCTION / "vae" / "config.json").read_text())
  assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
  assert json.loads((PRODUCTION / "config.json").read_text())["use_gen_pos_embed"] is True


def test_sharded_release_round_trips_bit_for_bit(model_dir, tmp_path):
  """index.json + shards → our directory → release layout (sharded again): every tensor identical."""
  meta = params_io.read_model_config(model_dir)
  assert meta["model"]["use_gen_pos_embed"] is True
  assert (meta["vae"]["scaling_factor"], meta["vae"]["shift_factor"]) == (0.3611, 0.1159)
  files = export_nextstep(model_dir, tmp_path / "release", max_shard_bytes=300_000)
  assert len(files) > 1 and (tmp_path / "release" / "model.safetensors.index.json").is_file()
  reader = SafetensorsReader(tmp_path / "release")
  src = _official_tensors()
  assert set(reader.keys()) == set(src)
  for k, v in src.items():
    got = reader.get(k)
    assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), k


def test_vae_scale_and_shift_match_official(sampler):
  """encode_latents = (mean − shift)·scale, decode_latents = decoder(z/scale + shift), raw decoder = raw decoder."""
  f = _npz("vae_scaled.npz")
  cfg, params = sampler.vae_cfg, sampler.vae_params
  assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
  z = flux_vae.encode_latents(params, cfg, jnp.asarray(_nhwc(f["image"])))
  assert _err("latents", z, _nhwc(f["latents"])) <= 1e-4
  dec = flux_vae.decode_latents(params, cfg, jnp.asarray(_nhwc(f["lm_latents"])))
  assert _err("lm_decode_output", dec, _nhwc(f["lm_decode_output"])) <= 1e-4
  raw = flux_vae.FluxVAE(cfg).apply(flux_vae._variables(params), jnp.asarray(_nhwc(f["decode_input_raw"])),
                                    method=flux_vae.FluxVAE.decode)
  assert _err("decode_raw_output", raw, _nhwc(f["decode_raw_output"])) <= 1e-4


# ------------------------------------------------------------------------------------------- gen_pos_embed

def test_position_table_is_the_official_buffer():
  table = _npz("sample_gen_pos_embed.npz")["gen_pos_embed"][0]
  assert _err("gen_pos_embed", sincos_2d_table(64, 32), table) <= 1e-6


def test_head_condition_takes_row_times_base_plus_col(sampler, stacked_params):
  """Training-path conditions for a 3×4 image: image_out_projector(h + table[row·32 + col]) in numpy from the
  official weights and buffer (the Feb-2026 `gen_pos_embed_with_ar` convention the sampler also uses)."""
  tensors = _official_tensors()
  table = tensors["gen_pos_embed"][0]
  w, b = tensors["image_out_projector.weight"], tensors["image_out_projector.bias"]
  cfg = sampler.cfg
  rows, cols = 3, 4
  h = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
  grid = np.zeros((1, 12, 4), np.int32)
  grid[0] = grid_slots(rows, cols)
  ids = np.zeros((1, 16), np.int32)
  ids[0, 3:15] = cfg.image_placeholder_id
  params = stacked_params
  cond, valid = NextStep(cfg).apply(params, jnp.asarray(h), {"input_ids": jnp.asarray(ids),
                                                            "image_token_grid": jnp.asarray(grid)}, 12,
                                    method=NextStep.slot_conditions)
  r, c = np.divmod(np.arange(12), cols)
  want = (h[0, 2:14] + table[r * 32 + c]) @ w.T + b
  assert np.asarray(valid).all()
  assert _err("condition", cond, want) <= 1e-5
  # the sampler's call: token index k of an image `cols` wide
  got = NextStep(cfg).apply(params, jnp.asarray(h[0, 2:14]), jnp.arange(12), cols, method=NextStep.condition)
  assert _err("sampler condition", got, want) <= 1e-5


def test_text_to_image_with_gen_pos_embed_first_row_matches_official(sampler):
  """Free-running generation with use_gen_pos_embed and num_images_per_prompt 2. The Aug-2025 official sampler
  reads entry k of the table for token k (row 0, col k); ours (and the Feb-2026 code) reads row·32 + col: the
  two agree on the image's first row, compared here; later rows are checked by the numpy test above."""
  f, call = _npz("sample_gen_pos_embed.npz"), _call("sample_gen_pos_embed.npz")
  out = sampler.text_to_image(call["captions"], _options(call), noise_draws=f["noise_draws"])
  assert _err("cond_per_token[:4]", out.extras["cond_per_token"][:4], f["cond_per_token"][:4]) <= 1e-4
  assert _err("head_out_raw[:, :4]", out.extras["head_out_raw"][:, :4], f["head_out_raw"][:, :4]) <= 5e-4
  assert _err("cond_per_token[4]", out.extras["cond_per_token"][4], f["cond_per_token"][4]) > 1e-3


def _call(name):
  return json.loads((PRODUCTION / "run_meta.json").read_text())["calls"][name]


def _options(call, **kw):
  """Official call → Options with the default prompt buckets (every prompt is padded beyond its exact length)."""
  return Options(height=call["hw"][0], width=call["hw"][1], cfg=call["cfg"], cfg_img=call["cfg_img"],
                 cfg_schedule=call["cfg_schedule"], steps=call["num_sampling_steps"], shift=call["timesteps_shift"],
                 use_norm=call["use_norm"], positive_prompt=call["positive_prompt"],
                 negative_prompt=call["negative_prompt"], num_images_per_prompt=call["num_images_per_caption"], **kw)


def _check_full(out, f):
  assert _err("cond_per_token", out.extras["cond_per_token"], f["cond_per_token"]) <= 1e-4
  assert _err("head_out_raw", out.extras["head_out_raw"], f["head_out_raw"]) <= 5e-4
  assert _err("decoded", out.extras["decoded"], _nhwc(f["decoded"])) <= 5e-4
  assert _err("images_uint8", out.images.astype(int), f["images_uint8"].astype(int)) <= 1


def test_editing_with_cfg_img_1_matches_official(sampler_no_gpe):
  """cfg_img = 1: two branches (cond with the source image, text-uncond without); scaled VAE on both ends."""
  f, call = _npz("sample_edit_cfg_img1.npz"), _call("sample_edit_cfg_img1.npz")
  assert not call["use_gen_pos_embed"]
  out = sampler_no_gpe.edit(call["captions"], f["source_image_uint8"], _options(call), noise_draws=f["noise_draws"])
  assert out.extras["prompt_ids"].shape[0] == 2 and out.extras["prompt_ids"].shape[1] % 32 == 0
  _check_full(out, f)


def test_linear_schedule_without_norm_matches_official(sampler_no_gpe):
  """Three prompts of different lengths, `linear` CFG schedule, use_norm False, 4 steps, shift 1."""
  f, call = _npz("sample_linear_no_norm.npz"), _call("sample_linear_no_norm.npz")
  out = sampler_no_gpe.text_to_image(call["captions"], _options(call), noise_draws=f["noise_draws"])
  _check_full(out, f)
  np.testing.assert_allclose(out.tokens, f["head_out_raw"], atol=5e-4)  # no use_norm: tokens = raw head output


# ------------------------------------------------------------------------------------------- training loss

def official_loss_batch(cfg, f):
  """The official list-mode batch in our layout: each row's images' tokens in slot order, the per-image loss mask
  on its slots, and the official flat draws (replica-major over all images' tokens) put on the same slots."""
  b, l = f["input_ids"].shape
  mul, t = cfg.fm_head_batch_mul, 16
  tokens = np.zeros((b, t, 64), np.float32)
  loss_mask = np.zeros((b, t), np.float32)
  noise, u = np.zeros((mul, b, t, 64), np.float32), np.zeros((mul, b, t), np.float32)
  n_total = f["fm_u"].shape[0] // mul
  fill, g = np.zeros(b, int), 0
  for i, (row, m) in enumerate(zip(f["image_rows"], f["latents_mask"])):
    toks = np.asarray(patchify(jnp.asarray(_nhwc(f[f"latent_{i}"])), 2))[0]
    s = slice(fill[row], fill[row] + len(toks))
    tokens[row, s], loss_mask[row, s] = toks, m
    for r in range(mul):
      noise[r, row, s] = f["fm_noise"][r * n_total + g: r * n_total + g + len(toks)]
      u[r, row, s] = f["fm_u"][r * n_total + g: r * n_total + g + len(toks)]
    fill[row] += len(toks)
    g += len(toks)
  assert g == n_total and len(set(fill)) == len(fill)  # unequal token counts per row
  batch = {"input_ids": jnp.asarray(f["input_ids"], jnp.int32), "attention_mask": jnp.asarray(f["attention_mask"]),
           "positions": jnp.broadcast_to(jnp.arange(l), (b, l)), "labels": jnp.asarray(f["labels"], jnp.int32),
           "image_tokens": jnp.asarray(tokens), "image_loss_mask": jnp.asarray(loss_mask)}
  return batch, jnp.asarray(noise), jnp.asarray(u)


@pytest.mark.parametrize("with_projector", [False, True])
def test_training_loss_partial_masks_unequal_counts(sampler, stacked_params, with_projector):
  """The Aug-2025 training forward adds no gen_pos_embed (use_gen_pos_embed only acts in its sampler)."""
  f = _npz("loss_masked.npz")
  assert 0 < f["latents_mask"].sum() < len(f["latents_mask"])
  cfg = dataclasses.replace(sampler.cfg, head_uses_out_projector=with_projector, use_gen_pos_embed=False)
  batch, noise, u = official_loss_batch(cfg, f)
  terms = NextStep(cfg).apply(stacked_params, batch, noise, u, method=NextStep.loss_terms)
  out = combine_losses(cfg, terms, loss_counts(cfg, batch))
  sfx = "_with_out_projector" if with_projector else ""
  assert _err("ce_loss", out["text_loss"], f["ce_loss"]) <= 1e-4
  assert _err(f"fm_loss{sfx}", out["image_loss"], f[f"fm_loss{sfx}"]) <= 1e-4
  assert _err(f"total_loss{sfx}", out["loss"], f[f"total_loss{sfx}"]) <= 1e-4
