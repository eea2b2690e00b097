"""Planted corrupt and degenerate records: the pipeline reads to the end, skips each bad one with a warning
naming it, counts the reasons, and decodes the good ones exactly (pixel mode, encode on the fly)."""
import io

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.data import pipeline
from nextstep_jax.data.builders import build_dataset
from nextstep_jax.data.config import default_data_config
from nextstep_jax.data.records import decode_image
from nextstep_jax.images import load_image
from nextstep_jax.tokens import make_byte_tokenizer


def _png(arr, mode=None, fmt="PNG"):
  buf = io.BytesIO()
  img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
  img.save(buf, format=fmt)
  return buf.getvalue()


def _rgb(seed, size=16):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# file name → (bytes maker, caption or None for no sidecar, expected skip reason or None)
def _planted():
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:8, :, 3] = 255  # top half opaque red, bottom half fully transparent
  deep = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
  return {
      "a_good0.png": (_png(_rgb(0)), "good zero", None),
      "a_good1.png": (_png(_rgb(1)), "good one", None),
      "a_good2.jpg": (_png(_rgb(2), fmt="JPEG"), "good two", None),
      "b_truncated.png": (_png(_rgb(3))[:60], "truncated file", "undecodable"),
      "c_garbage.jpg": (np.random.default_rng(4).bytes(300), "random bytes", "undecodable"),
      "d_nocaption.png": (_png(_rgb(5)), None, "empty_caption"),
      "e_blankcaption.png": (_png(_rgb(6)), "  \n", "empty_caption"),
      "f_small.png": (_png(_rgb(7, size=8)), "too small", "too_small"),
      "g_16bit.png": (_png(deep), "sixteen bit", "unsupported_mode"),
      "h_palette.png": (_png(_rgb(8), mode="P"), "palette", None),
      "i_cmyk.jpg": (_png(_rgb(9), mode="CMYK", fmt="JPEG"), "cmyk", None),
      "j_rgba.png": (_png(rgba), "alpha", None),
      "k_special.png": (_png(_rgb(10)), "a <|image_area|> trick", "special_tokens"),
  }


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
  root = tmp_path_factory.mktemp("corrupt")
  folder = root / "images"
  folder.mkdir()
  planted = _planted()
  for name, (data, caption, _) in planted.items():
    (folder / name).write_bytes(data)
    if caption is not None:
      (folder / name).with_suffix(".txt").write_text(caption)
  assert Image.open(folder / "g_16bit.png").mode.startswith("I")  # really a 16-bit image
  return dict(path=build_dataset("image_text", root / "ds", src=folder), planted=planted,
              tokenizer=make_byte_tokenizer(root / "tok"))


def test_corrupt_records_skipped_counted_and_named(corrupt, caplog):
  c = default_data_config()
  c.sources = [dict(name="planted", path=corrupt["path"], weight=1.0, kind="t2i")]
  c.update(tokenizer=corrupt["tokenizer"], encode_on_the_fly=True, buckets="fixed", resolution=16, down_factor=4,
           pack=False, seq_len=32, global_batch_size=4, num_epochs=1, drop_text_prob=0.0)
  it = pipeline.make_iterator(c, 0, 1)
  batches = list(it)
  names = sorted(corrupt["planted"])  # the builder stores files in sorted path order
  expected = {}
  for name, (_, _, reason) in corrupt["planted"].items():
    if reason:
      expected[reason] = expected.get(reason, 0) + 1
      assert f"skipping record planted[{names.index(name)}]" in caplog.text, name
  stats = it.stats()
  assert {k.split("/")[1]: v for k, v in stats.items() if k.count("/") == 1} == expected
  assert stats["skipped_total"] == 7
  assert all(stats[f"skipped/planted/{r}"] == n for r, n in expected.items())

  rows = [(b, r) for b in batches for r in range(4) if b["attention_mask"][r].any()]
  assert len(rows) == 6  # 3 good + palette + CMYK + RGBA
  good0 = np.asarray(Image.open(io.BytesIO(corrupt["planted"]["a_good0.png"][0])), np.float32)
  rgba = [b["pixel_values"][r] for b, r in rows if b["input_ids"][r][:5].tolist() == list(b"alpha")]
  (rgba,) = rgba
  np.testing.assert_allclose(rgba[12, 3], [1.0, 1.0, 1.0])  # transparent → white background
  np.testing.assert_allclose(rgba[2, 3], [200 / 127.5 - 1, -1.0, -1.0], atol=1e-6)
  match = [b["pixel_values"][r] for b, r in rows if b["input_ids"][r][:9].tolist() == list(b"good zero")]
  np.testing.assert_allclose(match[0], good0 / 127.5 - 1.0, atol=1e-6)
  for b, r in rows:
    assert b["pixel_values"].shape == (4, 16, 16, 3) and b["image_loss_mask"].shape == (4, 16)
    assert b["image_loss_mask"][r].sum() == 16
    assert (b["input_ids"][r] == 263).sum() == 16


def test_encode_skips_and_counts_bad_records(corrupt, tmp_path, caplog):
  from nextstep_jax.data.builders import open_dataset
  from nextstep_jax.data.latent_cache import encode_dataset

  def fake_encode(images):  # mean colour per 4x4 patch repeated: enough to check which image was encoded
    b, h, w, _ = images.shape
    x = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4)).reshape(b, -1, 3)
    return np.repeat(x, 22, axis=-1)[..., :64].astype(np.float32)

  out, counts = encode_dataset(corrupt["path"], tmp_path, fake_encode, down_factor=4, batch_size=4, resolution=16,
                               buckets="fixed", progress=False)
  assert counts == {"encoded": 7, "skipped_total": 6, "skipped/undecodable": 2, "skipped/empty_caption": 2,
                    "skipped/too_small": 1, "skipped/unsupported_mode": 1}
  assert "skipping record ns_image_text[" in caplog.text
  ds = open_dataset(out)
  assert len(ds) == 7 and ds.name == "ns_latent_t2i"
  rec = [ds[i] for i in range(7) if ds[i]["caption"] == b"good zero"][0]
  img = np.asarray(Image.open(io.BytesIO(corrupt["planted"]["a_good0.png"][0])), np.float32)
  np.testing.assert_allclose(rec["tokens"][:, 0], img.reshape(4, 4, 4, 4, 3).mean((1, 3))[..., 0].reshape(-1))
  assert rec["grid"].tolist() == [4, 4]


def test_image_readers_keep_rgb_channel_order(tmp_path):
  """A PNG with distinct R, G, B values per pixel reads back as the array written (edit sources in `sample`
  and `serve` go through `images.load_image`, training records through `records.decode_image`)."""
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
  rgb[0, 0] = (10, 220, 40)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  (tmp_path / "x.png").write_bytes(buf.getvalue())
  np.testing.assert_array_equal(load_image(tmp_path / "x.png"), rgb)
  np.testing.assert_array_equal(decode_image(buf.getvalue()), rgb)
