"""NextStep model parity with the official PyTorch implementation (../shared/fixtures/nextstep_tiny), converted from
the fixture's release-layout files through our converter."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from nextstep_jax import params_io
from nextstep_jax.convert.nextstep import convert_nextstep, export_nextstep
from nextstep_jax.models.fm_head import timestep_features
from nextstep_jax.models.nextstep import NextStep, combine_losses, loss_counts


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("nextstep") / "model"
  cfg = convert_nextstep(fixtures_dir, out, with_vae=False)
  return cfg, params_io.load_params(out / "params"), out


def _npz(fixtures_dir, name):
  return dict(np.load(os.path.join(fixtures_dir, name)))


def _report(name, got, want, mask=None):
  d = np.abs(np.asarray(got, np.float64) - want)
  err = float(d[mask].max() if mask is not None else d.max())
  print(f"{name}: max abs error {err:.2e}")
  return err


def test_config_read_from_release(converted):
  cfg, _, _ = converted
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim) == (64, 2, 4, 2, 16)
  assert (cfg.boi_id, cfg.eoi_id, cfg.image_placeholder_id, cfg.image_area_id, cfg.pad_token_id) == (261, 262, 263,
                                                                                                       260, 259)
  assert (cfg.fm_head_dim, cfg.fm_head_layers, cfg.fm_head_batch_mul, cfg.rms_norm_eps) == (48, 2, 4, 1e-5)


def test_backbone_hidden_and_logits(converted, fixtures_dir):
  cfg, params, _ = converted
  f = _npz(fixtures_dir, "backbone.npz")
  ids, mask = jnp.asarray(f["input_ids"], jnp.int32), f["attention_mask"].astype(bool)
  toks = np.zeros((2, 16, 64), np.float32)
  toks[0] = f["image_tokens"][0]
  model = NextStep(cfg)
  emb = model.apply(params, ids, jnp.asarray(toks), method=NextStep.embed_inputs)
  h, _ = model.apply(params, emb, jnp.asarray(mask), jnp.asarray(f["position_ids"], jnp.int32),
                     method=NextStep.hidden)
  logits = model.apply(params, h, method=NextStep.logits)
  assert _report("inputs_embeds", emb, f["inputs_embeds"]) <= 1e-4
  assert _report("last_hidden_state", h, f["last_hidden_state"], mask) <= 1e-4
  assert _report("logits", logits, f["logits"], mask) <= 1e-4


def test_head_velocity_and_time_embedding(converted, fixtures_dir):
  cfg, params, _ = converted
  f = _npz(fixtures_dir, "head.npz")
  assert _report("t_freq", timestep_features(jnp.asarray(f["t"])), f["t_freq"]) <= 1e-5
  model = NextStep(cfg)
  x, t, c = (jnp.asarray(f[k]) for k in ("x", "t", "c"))
  v, state = model.apply(params, x, t, c, method=NextStep.velocity, capture_intermediates=True)
  inter = state["intermediates"]["image_head"]
  t_emb = inter["time_embed"]["__call__"][0]
  y = t_emb + inter["cond_embed"]["__call__"][0]
  assert _report("t_emb", t_emb, f["t_emb"]) <= 1e-4
  assert _report("y", y, f["y"]) <= 1e-4
  assert _report("velocity", v, f["velocity"]) <= 1e-4
  c_out = model.apply(params, c, method=NextStep.condition)
  assert _report("c_out_projected", c_out, f["c_out_projected"]) <= 1e-4
  v2 = model.apply(params, x, t, c_out, method=NextStep.velocity)
  assert _report("velocity_from_out_projected", v2, f["velocity_from_out_projected"]) <= 1e-4


@pytest.mark.parametrize("with_projector", [False, True])
def test_training_loss_with_recorded_draws(converted, fixtures_dir, with_projector):
  cfg, params, _ = converted
  cfg = dataclasses.replace(cfg, head_uses_out_projector=with_projector)
  f = _npz(fixtures_dir, "loss.npz")
  b, l = f["input_ids"].shape
  batch = {"input_ids": jnp.asarray(f["input_ids"], jnp.int32), "attention_mask": jnp.asarray(f["attention_mask"]),
           "positions": jnp.broadcast_to(jnp.arange(l), (b, l)), "labels": jnp.asarray(f["labels"], jnp.int32),
           "image_tokens": jnp.asarray(f["target_tokens"]),
           "image_loss_mask": jnp.asarray(np.repeat(f["latents_mask"][:, None], 16, 1), jnp.float32)}
  model = NextStep(cfg)
  noise, u = jnp.asarray(f["fm_noise"]).reshape(4, b, 16, 64), jnp.asarray(f["fm_u"]).reshape(4, b, 16)
  terms = model.apply(params, batch, noise, u, method=NextStep.loss_terms)
  out = combine_losses(cfg, terms, loss_counts(cfg, batch))
  suffix = "_with_out_projector" if with_projector else ""
  assert _report("ce_loss", out["text_loss"], f["ce_loss"]) <= 1e-4
  assert _report(f"fm_loss{suffix}", out["image_loss"], f[f"fm_loss{suffix}"]) <= 1e-4
  assert _report(f"total_loss{suffix}", out["loss"], f[f"total_loss{suffix}"]) <= 1e-4
  assert float(terms["fm_count"]) == 128.0


def test_export_reproduces_release_safetensors_bit_for_bit(converted, fixtures_dir, tmp_path):
  _, _, out = converted
  export_nextstep(out, tmp_path / "release")
  src = load_file(os.path.join(fixtures_dir, "model.safetensors"))
  got = load_file(str(tmp_path / "release" / "model.safetensors"))
  assert set(got) == set(src)
  for k, v in src.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
