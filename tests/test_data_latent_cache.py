"""Latent cache round trip through the CLI: `data build` → `data encode` (the fixture's tiny VAE) → tokens read
back equal the tokens encoded in memory with `encode_latents` + `patchify`; also aspect buckets and editing."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from nextstep_jax import cli, images
from nextstep_jax.convert.vae import convert_vae, load_vae
from nextstep_jax.data import shapes
from nextstep_jax.data.builders import open_dataset
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.latents import patchify


@pytest.fixture(scope="module")
def vae_dir(fixtures_dir, tmp_path_factory):
  dst = tmp_path_factory.mktemp("vae")
  convert_vae(os.path.join(fixtures_dir, "vae", "model.safetensors"), dst)
  return str(dst)


def _in_memory_tokens(vae_dir, image_uint8):
  cfg, params = load_vae(vae_dir)
  z = encode_latents(params, cfg, images.to_float(image_uint8)[None])
  return np.asarray(patchify(z, 2))[0]


def test_shapes_round_trip_through_cli(vae_dir, tmp_path):
  src, dst = tmp_path / "shapes", tmp_path / "latents"
  assert cli.main(["data", "build", "--kind", "shapes", "--dst", str(src), "--num", "6", "--size", "16"]) == 0
  assert cli.main(["data", "encode", "--src", str(src), "--dst", str(dst), "--vae", vae_dir, "--batch", "4",
                   "--resolution", "16", "--buckets", "fixed"]) == 0
  ds = open_dataset(dst)
  assert ds.name == "ns_latent_t2i" and len(ds) == 6
  for i in range(6):
    rec = ds[i]
    meta = json.loads(rec["meta"])
    ex = shapes.make_example(meta["source_index"], seed=0, size=16)
    assert rec["caption"].decode() == ex["caption"]
    assert meta["scene"] == json.loads(ex["scene"])  # ground truth carried into the cache
    assert rec["grid"].tolist() == [4, 4] and rec["tokens"].shape == (16, 64)
    np.testing.assert_allclose(rec["tokens"], _in_memory_tokens(vae_dir, ex["image"]), atol=2e-5)
  assert sorted(json.loads(ds[i]["meta"])["source_index"] for i in range(6)) == list(range(6))


def test_edit_pairs_with_aspect_buckets(vae_dir, tmp_path):
  rng = np.random.default_rng(0)
  pairs = []
  for i in range(2):
    for role in ("src", "tgt"):
      Image.fromarray(rng.integers(0, 256, (64, 112, 3), dtype=np.uint8)).save(tmp_path / f"{role}{i}.png")
    pairs.append(dict(source=f"src{i}.png", target=f"tgt{i}.png", instruction=f"edit {i}"))
  (tmp_path / "edits.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  raw = tmp_path / "raw"
  assert cli.main(["data", "build", "--kind", "edit", "--src", str(tmp_path / "edits.jsonl"), "--dst", str(raw)]) == 0
  out = tmp_path / "lat"
  # 64 px with f2 × patch 2 → 16 tokens per side: the official bucket list itself. 64×112 (ratio 0.571) → 12×21.
  assert cli.main(["data", "encode", "--src", str(raw), "--dst", str(out), "--vae", vae_dir, "--batch", "4",
                   "--resolution", "64"]) == 0
  ds = open_dataset(out)
  assert ds.name == "ns_latent_edit" and len(ds) == 2
  for j in range(2):
    rec = ds[j]
    i = json.loads(rec["meta"])["source_index"]
    assert rec["instruction"].decode() == f"edit {i}"
    assert rec["src_grid"].tolist() == rec["tgt_grid"].tolist() == [12, 21]
    for role, key in (("src", "src_tokens"), ("tgt", "tgt_tokens")):
      img = np.asarray(Image.open(tmp_path / f"{role}{i}.png"))
      expected = _in_memory_tokens(vae_dir, images.resize_center_crop(img, (48, 84)))
      assert rec[key].shape == (252, 64)
      np.testing.assert_allclose(rec[key], expected, atol=2e-5)


def test_encode_errors(vae_dir, tmp_path):
  assert cli.main(["data", "build", "--kind", "shapes", "--dst", str(tmp_path / "s"), "--num", "2", "--size",
                   "16"]) == 0
  assert cli.main(["data", "build", "--kind", "shapes", "--dst", str(tmp_path / "s"), "--num", "2"]) == 2  # exists
  assert cli.main(["data", "encode", "--src", str(tmp_path / "s"), "--dst", str(tmp_path / "o"), "--vae", vae_dir,
                   "--resolution", "250"]) == 2  # not a multiple of the token size
  assert cli.main(["data", "encode", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "o"), "--vae",
                   vae_dir]) == 2
