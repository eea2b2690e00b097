"""Paths real runs take that the tiny defaults skip: the scanned (TPU-default) sampler sharded over (2, 2, 2),
remat policies (same loss and gradients as none), the parameter EMA recomputed by hand, and `<|image_area|>`
read from the tokenizer when its id differs from the pad + 1 fallback."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from conftest import PRODUCTION
from nextstep_jax import params_io, sharding
from nextstep_jax.config import REMAT_POLICIES
from nextstep_jax.convert.nextstep import convert_nextstep
from nextstep_jax.models.nextstep import abstract_params
from nextstep_jax.sampling.pipeline import Options, Sampler
from nextstep_jax.train.optimizer import make_optimizer, model_params
from nextstep_jax.train.step import loss_and_grads
from nextstep_jax.tokens import load_tokenizer
from nextstep_jax.train.synthetic import synthetic_batch
from sharding_harness import max_relative_error
from train_utils import TINY, random_params, train_cfg


@pytest.fixture(scope="module")
def model_dir(production_model_dir):
  return production_model_dir


def test_scanned_sampler_sharded_222_equals_single_device(model_dir):
  """unstack_layers=False (the TPU default: scanned stack, stacked KV cache) with params sharded over (2, 2, 2)
  against the single-device default program; gen_pos_embed on, 2 images per prompt."""
  opts = Options(height=16, width=16, steps=3, cfg=3.0, num_images_per_prompt=2, positive_prompt=None,
                 negative_prompt="", buckets=(32,))
  single = Sampler.from_checkpoint(model_dir)
  want = single.text_to_image(["a red cube", "sky"], opts)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  abstract, names = abstract_params(single.cfg)
  shardings = sharding.tree_shardings(names, abstract, mesh)
  target = sharding.abstract_sharded(abstract, shardings)
  params = params_io.load_params(model_dir / "params", target)
  scanned = Sampler(single.cfg, params, single.vae_cfg, single.vae_params, single.tokenizer, mesh, shardings,
                    unstack_layers=False)
  assert "unstacked_layers" not in scanned.params
  q = scanned.params["params"]["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8
  got = scanned.text_to_image(["a red cube", "sky"], opts)
  err = float(np.abs(got.tokens - want.tokens).max())
  print(f"scanned (2,2,2) vs single-device tokens: {err:.2e}")
  assert err <= 1e-4
  assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def remat_reference():
  params = random_params(TINY)
  batch = jax.tree.map(jax.numpy.asarray, synthetic_batch(TINY, 0, 4, 40, 16))
  return params, batch, _loss_grads(TINY, params, batch)


def _loss_grads(cfg, params, batch):
  loss, _, grads = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, jax.random.key(3)))(params, batch)
  return float(loss), grads


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_keeps_loss_and_gradients(remat_reference, policy):
  params, batch, (loss, grads) = remat_reference
  got_loss, got_grads = _loss_grads(dataclasses.replace(TINY, remat_policy=policy), params, batch)
  err = max_relative_error(got_grads, grads)
  print(f"remat {policy}: loss {abs(got_loss - loss):.1e}, grads {err:.1e} (relative)")
  assert abs(got_loss - loss) <= 1e-6 * abs(loss) and err <= 1e-5


def test_params_ema_recomputed_by_hand():
  """ema_n = d_n·ema_{n−1} + (1 − d_n)·params_n, d_n = min(decay, (1 + n)/(10 + n)), ema_0 = the initial params;
  `model_params` (what export and sampling use) returns it."""
  import optax
  decay = 0.8
  tx, _ = make_optimizer(train_cfg(lr=0.1, end_lr=0.01, steps=20, ema_decay=decay))
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
  state = tx.init(params)
  ema = {k: v.astype(np.float64) for k, v in params.items()}
  for n in range(15):
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = jax.device_get(optax.apply_updates(params, updates))
    d = min(decay, (1 + n) / (10 + n))
    ema = {k: d * ema[k] + (1 - d) * params[k] for k in ema}
  got = jax.device_get(model_params(params, state))
  for k in ema:
    np.testing.assert_allclose(got[k], ema[k], atol=1e-6, err_msg=k)
    assert np.abs(got[k] - params[k]).max() > 1e-3


def test_encode_on_the_fly_gives_the_official_latent_tokens(model_dir):
  """The trainer's encode-on-the-fly program (pixel_values → VAE → patchified tokens, `train.loop._PixelEncoder`)
  on the production VAE (scale 0.3611 / shift 0.1159) reproduces the official latents' tokens; the pipeline's
  uint8 → [−1, 1] conversion is the official ToTensor + Normalize(0.5, 0.5)."""
  import ml_collections
  from nextstep_jax.images import to_float
  from nextstep_jax.models.latents import patchify
  from nextstep_jax.train.config import TrainConfig
  from nextstep_jax.train.loop import _PixelEncoder
  f = dict(np.load(PRODUCTION / "vae_scaled.npz"))
  config = ml_collections.ConfigDict({"train": {"vae_from": str(model_dir)}, "model": {"latent_patch_size": 2}})
  mesh = sharding.mesh_from_shape((1, 1, 1), jax.devices()[:1])
  enc = _PixelEncoder(config, TrainConfig.from_config(config.train), mesh)
  pixels = np.transpose(f["image"], (0, 2, 3, 1))
  with sharding.use_mesh(mesh):
    got = enc({"pixel_values": jax.numpy.asarray(pixels), "input_ids": jax.numpy.zeros((2, 4), jax.numpy.int32)})
  want = np.asarray(patchify(jax.numpy.asarray(np.transpose(f["latents"], (0, 2, 3, 1))), 2))
  assert float(np.abs(np.asarray(got["image_tokens"]) - want).max()) <= 1e-4 and "pixel_values" not in got
  u = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  np.testing.assert_allclose(to_float(u), (u / 255.0 - 0.5) / 0.5, atol=1e-6)


def _release_with_area_id(tmp_path, area_id: int, update_ids: bool):
  """The production release with `<|image_area|>` and `<|end_of_thinking|>` swapped in tokenizer.json's added-token
  list (the tokenizer numbers added tokens by their order); `update_ids` also swaps the files' `id` fields."""
  src = tmp_path / "release"
  shutil.copytree(PRODUCTION, src, ignore=shutil.ignore_patterns("*.npz"))
  pad = json.loads((src / "config.json").read_text())["pad_token_id_added"]
  tok = json.loads((src / "tokenizer.json").read_text())
  added = tok["added_tokens"]
  i, j = (next(k for k, t in enumerate(added) if t["content"] == c) for c in ("<|image_area|>", "<|end_of_thinking|>"))
  assert (added[i]["id"], added[j]["id"]) == (pad + 1, area_id)
  added[i], added[j] = added[j], added[i]
  if update_ids:
    added[i]["id"], added[j]["id"] = pad + 1, area_id
    tc = json.loads((src / "tokenizer_config.json").read_text())
    dec = tc["added_tokens_decoder"]
    dec[str(area_id)], dec[str(pad + 1)] = dec[str(pad + 1)], dec[str(area_id)]
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
  (src / "tokenizer.json").write_text(json.dumps(tok))
  return src, pad


@pytest.mark.parametrize("update_ids", [True, False], ids=["consistent", "stale_id_fields"])
def test_image_area_id_read_as_the_tokenizer_loads_it(tmp_path, update_ids):
  """A release whose `<|image_area|>` is not pad + 1: the converted config holds the id the loaded tokenizer gives
  it (also when the files' `id` fields disagree with the token order the tokenizer goes by), so the sampler
  accepts the model and its prompts end in that id + "4*4" + boi."""
  src, pad = _release_with_area_id(tmp_path, 267, update_ids)
  cfg = convert_nextstep(src, tmp_path / "model")
  assert cfg.image_area_id == 267 == load_tokenizer(tmp_path / "model" / "tokenizer").image_area_id
  sampler = Sampler.from_checkpoint(tmp_path / "model")
  out = sampler.text_to_image(["a"], Options(height=16, width=16, steps=2, cfg=1.0, positive_prompt=None,
                                             buckets=(16,), decode=False))
  ids = list(out.extras["prompt_ids"][0])
  assert ids[-5:] == [267, ord("4"), ord("*"), ord("4"), cfg.boi_id]
  assert pad + 1 not in ids
