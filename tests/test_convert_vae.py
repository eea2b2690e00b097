"""VAE conversion round trips, bad-input errors (one clear line each), images I/O and the CLI commands."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from nextstep_jax import cli, images
from nextstep_jax.config import ConfigError, VAEConfig, flux_vae, tiny_vae
from nextstep_jax.convert import vae as cv
from nextstep_jax.convert.table import ConversionError
from nextstep_jax.models import flux_vae as fv


def read_all(path):
  with safe_open(str(path), framework="np") as h:
    return {k: h.get_tensor(k) for k in h.keys()}


@pytest.fixture(scope="module")
def vae_src(fixtures_dir):
  return os.path.join(fixtures_dir, "vae")


@pytest.fixture(scope="module")
def model_dir(vae_src, tmp_path_factory):
  dst = tmp_path_factory.mktemp("vae_model")
  cv.convert_vae(vae_src, dst)
  return dst


# ----------------------------------------------------------------------------------------------- round trips


def test_bfl_export_round_trip_bit_exact(model_dir, vae_src, tmp_path):
  out = cv.export_vae_bfl(model_dir, tmp_path / "ae.safetensors")
  want, got = read_all(os.path.join(vae_src, "model.safetensors")), read_all(out)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k
  # the exported file converts back on its own (config from its metadata) to identical parameters
  cfg2 = cv.convert_vae(out, tmp_path / "again")
  assert cfg2 == cv.load_vae(model_dir)[0]
  a, b = cv.load_vae(model_dir)[1], cv.load_vae(tmp_path / "again")[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(FileExistsError, match="already exists"):
    cv.export_vae_bfl(model_dir, out)


def test_config_json_written(model_dir, vae_src):
  meta = json.loads((model_dir / "nextstep_config.json").read_text())
  assert meta["vae"]["ch_mult"] == [2, 1] and meta["vae"]["psz"] == 2
  assert meta["vae_source"]["format"] == "nextstep"


def test_bfl_without_config_infers_architecture(vae_src, tmp_path):
  """A config-less BFL file (like Flux.1's ae.safetensors): architecture from shapes, stock Flux constants."""
  save_file(read_all(os.path.join(vae_src, "model.safetensors")), str(tmp_path / "ae.safetensors"))
  cfg = cv.convert_vae(tmp_path / "ae.safetensors", tmp_path / "out", layout="auto")
  assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (32, (2, 1), 1, 16)
  assert (cfg.scaling_factor, cfg.shift_factor, cfg.encoder_norm, cfg.deterministic) == (0.3611, 0.1159, False, False)
  assert json.loads((tmp_path / "out" / "nextstep_config.json").read_text())["vae_source"]["format"] == "bfl"


def test_diffusers_names_match_diffusers(tmp_path):
  """Our renamed table covers exactly diffusers' AutoencoderKL state dict (names and shapes)."""
  from test_flux_vae import make_diffusers_vae
  ref = make_diffusers_vae(str(tmp_path / "hf"), (32, 64, 64), 1)
  cfg = cv.vae_config_from_diffusers(dict(ref.config))
  assert cfg.ch_mult == (1, 2, 2)
  shapes = cv.vae_shapes(cfg)
  theirs = {}
  for r in cv.diffusers_rules(cfg):
    theirs[r.theirs] = r.their_shape(shapes[r.ours])
  assert theirs == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_extra_loss_keys_ignored_but_vae_like_keys_rejected(vae_src, tmp_path):
  tensors = read_all(os.path.join(vae_src, "model.safetensors"))
  shutil.copy(os.path.join(vae_src, "config.json"), tmp_path / "config.json")
  save_file({**tensors, "loss.perceptual.net.0.weight": np.zeros((2, 2), np.float32)},
            str(tmp_path / "model.safetensors"))
  cv.convert_vae(tmp_path, tmp_path / "ok")
  save_file({**tensors, "encoder.quant_conv.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ConversionError, match=r"unexpected 1 tensor\(s\): encoder.quant_conv.weight"):
    cv.convert_vae(tmp_path, tmp_path / "bad")

# ----------------------------------------------------------------------------------------------- bad input


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)


def test_bad_image_size_and_channels():
  cfg = VAEConfig(**flux_vae())
  init = lambda shape: jax.eval_shape(lambda: fv.FluxVAE(cfg).init(jax.random.key(0), jnp.zeros(shape)))
  with pytest.raises(ValueError, match=r"image size 250x256 is not a multiple of 16; use 256x256") as e:
    init((1, 250, 256, 3))
  _one_line(e)
  with pytest.raises(ValueError, match=r"expected 3 RGB channels, got 4; convert RGBA/greyscale with "
                                       r"nextstep_jax.images.load_image"):
    init((1, 256, 256, 4))
  tiny = VAEConfig(**tiny_vae())
  params = fv.init_params(tiny, jax.random.key(0))
  with pytest.raises(ValueError, match=r"latents must be \(batch, h, w, 16\)"):
    fv.decode_latents(params, tiny, jnp.zeros((1, 4, 4, 8)))
  with pytest.raises(ValueError, match=r"image size 18x16 is not a multiple of 4; use 16x16"):
    fv.encode_latents(params, tiny, jnp.zeros((1, 18, 16, 3)))


def test_corrupt_image_file(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
  with pytest.raises(ValueError, match=r"cannot read image .*bad\.png") as e:
    images.load_image(bad)
  _one_line(e)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    images.load_image(tmp_path / "missing.png")


def test_mismatched_checkpoint(vae_src, tmp_path):
  cfg = json.load(open(os.path.join(vae_src, "config.json")))
  shutil.copy(os.path.join(vae_src, "model.safetensors"), tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "ch_mult": [1, 2]}))
  with pytest.raises(ConversionError, match=r"does not match the model config: .*shape mismatch\(es\): .*"
                                            r"decoder.conv_in.weight has shape \(32, 16, 3, 3\), expected "
                                            r"\(64, 16, 3, 3\)") as e:
    cv.convert_vae(tmp_path, tmp_path / "out")
  _one_line(e)
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_res_blocks": 2}))
  with pytest.raises(ConversionError, match=r"missing \d+ tensor\(s\): decoder.up.0.block.2.conv1.bias"):
    cv.convert_vae(tmp_path, tmp_path / "out")


def test_corrupt_weight_files(vae_src, tmp_path):
  shutil.copy(os.path.join(vae_src, "config.json"), tmp_path / "config.json")
  data = open(os.path.join(vae_src, "model.safetensors"), "rb").read()
  (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
  with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors: .*corrupt") as e:
    cv.convert_vae(tmp_path, tmp_path / "out")
  _one_line(e)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "checkpoint.pt").write_bytes(b"garbage" * 100)
  with pytest.raises(ConversionError, match=r"cannot read torch checkpoint .*checkpoint\.pt") as e:
    cv.convert_vae(tmp_path, tmp_path / "out")
  _one_line(e)


def test_torch_checkpoint_without_torch(vae_src, tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ConversionError, match=r"needs PyTorch \(pip install torch\), or pass the safetensors copy"):
    cv.convert_vae(os.path.join(vae_src, "checkpoint.pt"), tmp_path / "out")


def test_diffusers_config_refusals():
  base = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, use_quant_conv=False,
              use_post_quant_conv=False)
  assert cv.vae_config_from_diffusers(base).ch_mult == (1, 2)
  with pytest.raises(ConfigError, match="use_quant_conv=True; only Flux-style autoencoders"):
    cv.vae_config_from_diffusers({**base, "use_quant_conv": True})
  with pytest.raises(ConfigError, match="use_post_quant_conv=true \\(default\\)"):
    cv.vae_config_from_diffusers({k: v for k, v in base.items() if k != "use_post_quant_conv"})
  with pytest.raises(ConfigError, match="norm_num_groups=16"):
    cv.vae_config_from_diffusers({**base, "norm_num_groups": 16})
  with pytest.raises(ConfigError, match="unknown VAE layout"):
    cv.open_vae_source(".", layout="sd")

# ----------------------------------------------------------------------------------------------- images


def test_image_conversions_match_torch():
  import torch
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  # torchvision ToTensor (div 255) + Normalize(0.5, 0.5) (sub_, div_), float32
  want = torch.from_numpy(x).permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5).permute(1, 2, 0).numpy()
  got = images.to_float(x)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got, x / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(images.to_uint8(got), x)


def test_to_uint8_matches_fixture(fixtures_dir):
  a = np.load(os.path.join(fixtures_dir, "sample.npz"))
  np.testing.assert_array_equal(images.to_uint8(a["decoded"].transpose(0, 2, 3, 1)), a["images_uint8"])


def test_load_resize_grid(tmp_path):
  from PIL import Image
  rgba = np.zeros((10, 20, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :10, 3] = 255  # left half opaque red, right half transparent → white
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  img = images.load_image(tmp_path / "a.png")
  assert img.shape == (10, 20, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(img[0, 19], [255, 255, 255])
  Image.fromarray(np.full((5, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
  np.testing.assert_array_equal(images.load_image(tmp_path / "g.png"), np.full((5, 6, 3), 77))
  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, 10:70] = 255  # white center, black sides
  sq = images.resize_center_crop(wide, 16)  # 40×80 → 16×32 → center 16 columns (resized white spans 4..28)
  assert sq.shape == (16, 16, 3) and sq.min() >= 250
  full = images.resize_center_crop(wide, (16, 32))  # same aspect: nothing cropped, dark sides kept
  assert full.shape == (16, 32, 3) and full[:, 0].max() < 30 and full[:, 31].max() < 30
  grid = images.make_grid(np.zeros((3, 4, 5, 3), np.uint8), ncols=2, pad=1)
  assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
  assert grid[1:5, 1:6].max() == 0 and grid[6:10, 7:12].min() == 255  # image 3 slot left as padding
  images.save_png(tmp_path / "o.png", grid)
  np.testing.assert_array_equal(images.load_image(tmp_path / "o.png"), grid)
  assert images.psnr(grid, grid) == float("inf")

# ----------------------------------------------------------------------------------------------- CLI


def test_cli_convert_export_roundtrip(vae_src, tmp_path, capsys):
  dst = tmp_path / "m"
  assert cli.main(["convert", "vae", "--src", vae_src, "--dst", str(dst), "--layout", "nextstep"]) == 0
  assert "ch_mult [2, 1]" in capsys.readouterr().out
  assert cli.main(["convert", "export-vae", "--src", str(dst), "--dst", str(tmp_path / "ae.safetensors")]) == 0
  assert sorted(read_all(tmp_path / "ae.safetensors")) == sorted(read_all(os.path.join(vae_src, "model.safetensors")))
  rng = np.random.default_rng(0)
  images.save_png(tmp_path / "in.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
  assert cli.main(["vae", "roundtrip", "--checkpoint", str(dst), "--image", str(tmp_path / "in.png"),
                   "--out", str(tmp_path / "out.png")]) == 0
  assert "PSNR" in capsys.readouterr().out
  assert images.load_image(tmp_path / "out.png").shape == (16, 16, 3)
  # errors: one line on stderr, exit code 2
  images.save_png(tmp_path / "odd.png", np.zeros((18, 16, 3), np.uint8))
  assert cli.main(["vae", "roundtrip", "--checkpoint", str(dst), "--image", str(tmp_path / "odd.png"),
                   "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "nextstep-jax vae: error: image size 18x16 is not a multiple of 4; use 16x16"
  assert cli.main(["convert", "vae", "--src", vae_src, "--dst", str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err
