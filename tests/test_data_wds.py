"""Official NextStep WebDataset shards (written here with the `webdataset` package's TarWriter, as the official
`build_wds.py` does) → `data build --kind wds` → `data encode` (the fixture's tiny VAE) → training batches whose
decoded text, image grids, image tokens and loss masks match the source samples exactly.

Expected values come from the source samples and the bucket table by hand (not from the code under test):
64×64 px → 16×16 tokens, 48×96 (h×w) → 11×23, 96×48 → 23×11 (tiny VAE: 4 px per token).
"""
import json
import os
import re

import numpy as np
import pytest
from wds_fixtures import SOURCES, write_shards

from nextstep_jax import cli
from nextstep_jax.convert.vae import convert_vae
from nextstep_jax.data import pipeline
from nextstep_jax.data.builders import open_dataset
from nextstep_jax.data.config import default_data_config
from nextstep_jax.tokens import load_tokenizer, make_byte_tokenizer

PH = "<|image_placeholder|>"
GRID = {(64, 64): (16, 16), (48, 96): (11, 23), (96, 48): (23, 11)}


@pytest.fixture(scope="module")
def wds_data(fixtures_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("wds")
  vae = root / "vae"
  convert_vae(os.path.join(fixtures_dir, "vae", "model.safetensors"), vae)
  out = dict(root=root, vae=str(vae), tokenizer=make_byte_tokenizer(root / "tok"), built={}, latents={}, logs={})
  write_shards(root / "shards", SOURCES)
  return out


def _build_and_encode(wds_data, task, capsys):
  root = wds_data["root"]
  if task in wds_data["built"]:
    return
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(root / "shards" / task / "{00000..00001}.tar"),
                   "--task", task, "--dst", str(root / "built" / task)]) == 0
  wds_data["logs"][task] = capsys.readouterr().out
  wds_data["built"][task] = str(root / "built" / task)
  if task != "text":
    assert cli.main(["data", "encode", "--src", wds_data["built"][task], "--dst", str(root / "lat" / task),
                     "--vae", wds_data["vae"], "--batch", "2", "--resolution", "64"]) == 0
    wds_data["logs"][task + "/encode"] = capsys.readouterr().out
    wds_data["latents"][task] = str(root / "lat" / task)


def _rows(wds_data, task):
  c = default_data_config()
  path = wds_data["built"][task] if task == "text" else wds_data["latents"][task]
  c.sources = [dict(name=task, path=path, weight=1.0, kind="")]
  c.tokenizer = wds_data["tokenizer"]
  c.update(seq_len=2048, global_batch_size=2, read_threads=1, pack=False, num_epochs=1, resolution=64,
           down_factor=4, drop_text_prob=0.0, edit_tags_at_end_prob=0.0, edit_drop_prob=0.0)
  tok = load_tokenizer(c.tokenizer)
  it = pipeline.make_iterator(c, 0, 1)
  rows = []
  for batch in it:
    for r in range(len(batch["input_ids"])):
      n = int(batch["attention_mask"][r].sum())
      if n:
        m = int((batch["input_ids"][r] == tok.image_placeholder_id).sum())
        rows.append(dict(text=tok.decode(batch["input_ids"][r][:n]), grid=batch["image_token_grid"][r][:m],
                         loss=batch["image_loss_mask"][r][:m], tokens=batch["image_tokens"][r][:m]))
  it.close()
  return rows


def _collapse(text):
  return re.sub(f"(?:{re.escape(PH)})+", lambda m: f"[{len(m.group(0)) // len(PH)}]", text)


def _block(hw):
  h, w = GRID[hw]
  return f"<|image_area|>{h}*{w}<|begin_of_image|>[{h * w}]<|end_of_image|>"


def _expected_grid(sizes):
  out = []
  for hw in sizes:
    h, w = GRID[hw]
    r, c = np.divmod(np.arange(h * w), w)
    out.append(np.stack([r, c, np.full_like(r, h), np.full_like(r, w)], -1))
  return np.concatenate(out)


def test_text_and_t2i_batches_match_the_shards(wds_data, capsys):
  _build_and_encode(wds_data, "text", capsys)
  _build_and_encode(wds_data, "t2i", capsys)
  assert "wrote 3 records" in wds_data["logs"]["t2i"] and "bad_json 1" in wds_data["logs"]["t2i"]
  assert "encoded 2 records" in wds_data["logs"]["t2i/encode"] and "undecodable" in wds_data["logs"]["t2i/encode"]
  assert sorted(r["text"] for r in _rows(wds_data, "text")) == ["plain text one<|endoftext|>",
                                                               "second document<|endoftext|>"]
  rows = {_collapse(r["text"]): r for r in _rows(wds_data, "t2i")}
  expected = {f"{cap}{_block(hw)}<|endoftext|>": hw for cap, hw in (("a red square", (64, 64)),
                                                                     ("a wide blue field", (48, 96)))}
  assert sorted(rows) == sorted(expected)
  for text, hw in expected.items():
    np.testing.assert_array_equal(rows[text]["grid"], _expected_grid([hw]))
    assert rows[text]["loss"].min() == 1.0


def _cached_tokens(wds_data, task):
  """caption → per-image tokens of the latent cache, by the source record's caption."""
  ds = open_dataset(wds_data["latents"][task])
  out = {}
  for i in range(len(ds)):
    rec = ds[i]
    sizes = [int(h) * int(w) for h, w in rec["grids"]]
    out[rec["caption"].decode()] = np.split(rec["tokens"], np.cumsum(sizes)[:-1])
  return out


@pytest.mark.parametrize("task", ["edit", "interleave"])
def test_multi_image_sequences_match_the_shards(wds_data, task, capsys):
  _build_and_encode(wds_data, task, capsys)
  if task == "interleave":
    assert "wrote 2 records" in wds_data["logs"][task] and "missing_image 1" in wds_data["logs"][task]
  cases = {  # caption → (expected decoded text with images, image sizes in sequence order, loss per image)
      "edit": {"<image_0>make it blue<image_1>": (f"{_block((64, 64))}make it blue{_block((64, 64))}",
                                                 [(64, 64)] * 2, [0, 1]),
               "a cat <image_0> turn the cat around<image_1>":
                   (f"a cat {_block((48, 96))} turn the cat around{_block((48, 96))}", [(48, 96)] * 2, [0, 1])},
      "interleave": {"step one <image_0> then <image_1> finally <image_2> done":
                         (f"step one {_block((64, 64))} then {_block((48, 96))} finally {_block((96, 48))} done",
                          [(64, 64), (48, 96), (96, 48)], [1, 1, 1]),
                     "<image_0> and <image_1>": (f"{_block((96, 48))} and {_block((64, 64))}",
                                                 [(96, 48), (64, 64)], [1, 1])},
  }[task]
  cached = _cached_tokens(wds_data, task)
  rows = _rows(wds_data, task)
  assert len(rows) == len(cases)
  for caption, (text, sizes, loss) in cases.items():
    full = f"{text}<|endoftext|>"
    tags_only = "".join(_block(hw) for hw in sizes) + "<|endoftext|>"  # interleave: official 10 % tags-only
    row = next(r for r in rows if _collapse(r["text"]) in (full, tags_only) and r["grid"].shape[0] == len(
        _expected_grid(sizes)) and np.array_equal(r["tokens"], np.concatenate(cached[caption])))
    np.testing.assert_array_equal(row["grid"], _expected_grid(sizes))
    per_image = np.split(row["loss"], np.cumsum([GRID[hw][0] * GRID[hw][1] for hw in sizes])[:-1])
    assert [float(x.min()) for x in per_image] == loss and [float(x.max()) for x in per_image] == loss


def test_inspect_shows_an_interleaved_sequence(wds_data, tmp_path, capsys):
  _build_and_encode(wds_data, "interleave", capsys)
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"""
from nextstep_jax.data.config import default_data_config
import ml_collections
def get_config():
  d = default_data_config()
  d.sources = [dict(name="il", path={wds_data['latents']['interleave']!r}, weight=1.0, kind="interleave")]
  d.update(tokenizer={wds_data['tokenizer']!r}, seq_len=2048, global_batch_size=1, pack=False, resolution=64,
           down_factor=4, read_threads=1)
  return ml_collections.ConfigDict(dict(data=d))
""")
  assert cli.main(["data", "inspect", "--config", str(cfg), "--batches", "2", "--chars", "2000"]) == 0
  out = capsys.readouterr().out
  assert "image blocks: 16×16, 11×23, 23×11" in out or "image blocks: 23×11, 16×16" in out
  assert f"{PH}×256" in out


def test_bad_source_pattern_is_one_line(wds_data, capsys):
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(wds_data["root"] / "nope/{0..3}.tar"), "--dst",
                   str(wds_data["root"] / "x")]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nope/0.tar does not exist" in err[0], err


def _png_bytes(seed):
  import io

  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), seed, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _records(path):
  ds = open_dataset(path)
  return [ds[i] for i in range(len(ds))]


def test_img2dataset_tar_and_parquet_and_hf_save_to_disk(tmp_path, capsys):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  import webdataset

  images = [_png_bytes(s) for s in (10, 20, 30)]
  with webdataset.TarWriter(str(tmp_path / "00000.tar")) as sink:  # img2dataset's tar layout
    for i, im in enumerate(images):
      sink.write({"__key__": f"{i:09d}", "jpg": im, "txt": f"cap {i}".encode(),
                  "json": json.dumps({"url": f"u{i}", "caption": f"cap {i}"}).encode()})
  pq.write_table(pa.table({"key": ["0", "1", "2"], "caption": ["p0", "", "p2"], "jpg": images}),
                 tmp_path / "00000.parquet")  # img2dataset --output_format parquet; row 1 has no caption
  features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
  datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "caption": ["h0", "h1", "h2"]},
                             features=features).save_to_disk(str(tmp_path / "hf"))
  datasets.Dataset.from_dict({"text": ["only text", "more"]}).save_to_disk(str(tmp_path / "hf_text"))

  for kind, src, dst in (("img2dataset", "00000.tar", "i2d_tar"), ("img2dataset", "*.parquet", "i2d_pq"),
                         ("hf", "hf", "hf_out"), ("hf", "hf_text", "hf_text_out")):
    assert cli.main(["data", "build", "--kind", kind, "--src", str(tmp_path / src), "--dst", str(tmp_path / dst)]) == 0
  assert "no_caption 1" in capsys.readouterr().out
  tar = _records(tmp_path / "i2d_tar")
  assert [r["caption"] for r in tar] == [b"cap 0", b"cap 1", b"cap 2"] and [r["image"] for r in tar] == images
  assert [json.loads(r["meta"])["url"] for r in tar] == ["u0", "u1", "u2"]
  parquet = _records(tmp_path / "i2d_pq")
  assert [(r["caption"], r["image"]) for r in parquet] == [(b"p0", images[0]), (b"p2", images[2])]
  hf = _records(tmp_path / "hf_out")
  assert [(r["caption"], r["image"]) for r in hf] == [(f"h{i}".encode(), images[i]) for i in range(3)]
  assert [r["text"] for r in _records(tmp_path / "hf_text_out")] == [b"only text", b"more"]


def _torn(src, dst, cut_in_member: bool):
  """A copy of tar `src` cut inside member 7 (sample g3's image), or exactly after it (at a member boundary,
  which tarfile reads as a shorter tar without complaint)."""
  import tarfile
  with tarfile.open(src) as tar:
    m = tar.getmembers()[7]
  assert m.name == "g3-0.png"
  end = m.offset_data + (m.size // 2 if cut_in_member else -(-m.size // 512) * 512)
  dst.write_bytes(src.read_bytes()[:end])


@pytest.mark.parametrize("cut_in_member", [True, False], ids=["mid-member", "member-boundary"])
def test_torn_shard_keeps_the_samples_before_the_damage(tmp_path, capsys, cut_in_member):
  from wds_fixtures import write_tar
  write_tar(tmp_path / "good.tar", [(f"g{i}", {"caption": f"cap {i}"}, [(8, 8)], False) for i in range(6)])
  _torn(tmp_path / "good.tar", tmp_path / "torn.tar", cut_in_member)
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(tmp_path / "torn.tar"), "--task", "t2i", "--dst",
                   str(tmp_path / "out")]) == 0
  assert "skipped: corrupt_shard 1" in capsys.readouterr().out
  # g3 was in flight when the shard ended: dropped, never stored half-read
  assert [r["caption"] for r in _records(tmp_path / "out")] == [b"cap 0", b"cap 1", b"cap 2"]


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from wds_fixtures import write_tar
  write_tar(tmp_path / "bad.tar", [("a0", b"{bad", [(8, 8)], False), ("a1", {"title": "no caption key"}, [(8, 8)],
                                                                      False)])
  pq.write_table(pa.table({"key": ["0"], "jpg": [_png_bytes(1)]}), tmp_path / "nocap.parquet")
  cases = [
      (["build", "--kind", "wds", "--src", str(tmp_path / "bad.tar"), "--task", "t2i"],
       "all 2 samples were skipped (bad_json 1, no_caption 1); nothing was written"),
      (["build", "--kind", "img2dataset", "--src", str(tmp_path / "nocap.parquet")],
       "needs an image bytes column (jpg/png/webp/image) and 'caption'; it has ['key', 'jpg']"),
      (["build", "--kind", "hf", "--src", str(tmp_path / "bad.tar"), "--workers", "2"],
       "--workers (Beam) builds --kind wds only"),
      (["encode", "--src", str(tmp_path / "x"), "--vae", str(tmp_path / "v"), "--parts", "2", "--part", "2"],
       "give --parts P and --part N with 0 <= N < P"),
      (["encode", "--src", str(tmp_path / "x"), "--vae", str(tmp_path / "v"), "--merge", "2"],
       "part 0 of 2 is not finished"),
      (["encode", "--src", str(tmp_path / "x"), "--vae", str(tmp_path / "v"), "--dst", "gs://b/lat"],
       "--dst gs://b/lat: datasets are written to local paths; mount the bucket"),
  ]
  for args, message in cases:
    dst = [] if "--dst" in args else ["--dst", str(tmp_path / "out")]
    assert cli.main(["data", *args, *dst]) == 2, args
    raw = capsys.readouterr().err  # (TFDS's progress bars aside) one error line, no traceback
    err = [line for line in raw.splitlines() if line.startswith("nextstep-jax")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in raw, (args, raw)
  assert not list(tmp_path.rglob("dataset_info.json"))  # nothing half-written, no partial directory left
  assert not list(tmp_path.rglob("*.partial"))
