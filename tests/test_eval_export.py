"""GenEval / DPG-Bench exporters: exact folder layouts, read back the way the official scorers read them."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.eval import export

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "dog", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red car and a blue dog"},
    {"tag": "position", "include": [{"class": "cat", "count": 1},
                                    {"class": "cup", "count": 1, "position": ["left of", 0]}],
     "exclude": [{"class": "cat", "count": 2}], "prompt": "a photo of a cup left of a cat"},
]


def _solid(value, h=8, w=6):
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0], img[..., 1], img[..., 2] = value, 255 - value, (7 * value) % 256
  return img


def _load(path):
  return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def geneval_file(tmp_path):
  path = tmp_path / "evaluation_metadata.jsonl"
  path.write_text("\n".join(json.dumps(m) for m in GENEVAL_LINES) + "\n\n")
  return path


def test_read_geneval_prompts(geneval_file, tmp_path):
  assert export.read_geneval_prompts(geneval_file) == GENEVAL_LINES
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "x", "tag": "single_object"}) + "\n")
  with pytest.raises(ValueError, match="include"):
    export.read_geneval_prompts(bad)


def _geneval_scorer_walk(imagedir):
  """What djghosh13/geneval evaluation/evaluate_images.py main() visits: (metadata, sample path) pairs."""
  seen = []
  for sub in sorted(os.listdir(imagedir)):
    folder = os.path.join(imagedir, sub)
    if not os.path.isdir(folder) or not sub.isdigit():
      continue
    with open(os.path.join(folder, "metadata.jsonl")) as fp:
      metadata = json.load(fp)
    for name in sorted(os.listdir(os.path.join(folder, "samples"))):
      if os.path.isfile(os.path.join(folder, "samples", name)) and re.match(r"\d+\.png", name):
        seen.append((metadata, os.path.join(folder, "samples", name)))
  return seen


def test_write_geneval_layout(geneval_file, tmp_path):
  meta = export.read_geneval_prompts(geneval_file)
  images = [[_solid(10 * i + k) for k in range(2)] for i in range(3)]
  out = tmp_path / "geneval_out"
  export.write_geneval(out, meta, images)
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert files == sorted(f"{i:05d}/{f}" for i in range(3)
                         for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png"))
  walk = _geneval_scorer_walk(out)
  assert len(walk) == 6
  for metadata, path in walk:
    i, k = int(path.split(os.sep)[-3]), int(os.path.basename(path)[:4])
    assert metadata == GENEVAL_LINES[i]
    assert np.array_equal(_load(path), _solid(10 * i + k))


def test_write_geneval_grid_and_float_images(tmp_path):
  float_img = np.linspace(0, 1, 8 * 6 * 3).reshape(8, 6, 3)
  export.write_geneval(tmp_path, [GENEVAL_LINES[0]], [[float_img, float_img]], grid=True)
  saved = _load(tmp_path / "00000" / "samples" / "0001.png")
  assert np.array_equal(saved, np.round(float_img * 255).astype(np.uint8))
  assert _load(tmp_path / "00000" / "grid.png").shape == (8, 12, 3)
  with pytest.raises(ValueError):
    export.write_geneval(tmp_path, GENEVAL_LINES, [[float_img]])


@pytest.fixture
def dpg_folder(tmp_path):
  folder = tmp_path / "prompts"
  folder.mkdir()
  (folder / "partiprompts17.txt").write_text("A red bicycle leaning on a wall.\n")
  (folder / "COCOval2014000000000139.txt").write_text("  two cats on a sofa  ")
  (folder / "notes.md").write_text("not a prompt")
  return folder


def test_read_dpg_prompts(dpg_folder):
  assert export.read_dpg_prompts(dpg_folder) == {"COCOval2014000000000139": "two cats on a sofa",
                                                 "partiprompts17": "A red bicycle leaning on a wall."}


def _dpg_crops(path, resolution):
  """The four tiles ELLA dpg_bench/compute_dpg_bench.py crops with --pic-num 4 --resolution R."""
  r = resolution
  img = Image.open(path)
  return [np.asarray(img.crop(box).convert("RGB"))
          for box in [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]]


def test_write_dpg_layout(tmp_path):
  imgs = {"a1": [_solid(v, 8, 8) for v in (1, 2, 3, 4)], "b2": [_solid(v, 8, 8) for v in (50, 60, 70, 80)]}
  out = tmp_path / "dpg_out"
  export.write_dpg(out, imgs)
  assert sorted(os.listdir(out)) == ["a1.png", "b2.png"]
  for name, group in imgs.items():
    assert _load(out / f"{name}.png").shape == (16, 16, 3)
    for crop, expected in zip(_dpg_crops(out / f"{name}.png", 8), group):
      assert np.array_equal(crop, expected)
  export.write_dpg(out, {"single": [_solid(9, 8, 8)]})  # --pic-num 1
  assert np.array_equal(_load(out / "single.png"), _solid(9, 8, 8))
  with pytest.raises(ValueError):
    export.write_dpg(out, {"three": [_solid(1, 8, 8)] * 3})
  with pytest.raises(ValueError):
    export.write_dpg(out, {"a.b": [_solid(1, 8, 8)] * 4})  # the scorer keys on basename.split('.')[0]
  with pytest.raises(ValueError):
    export.write_dpg(out, {"mixed": [_solid(1, 8, 8)] * 3 + [_solid(1, 4, 4)]})


def _fake_generate(calls):
  """Encodes the prompt and the repeat index into the pixels so the test can check where each image landed."""
  def generate(prompts):
    calls.append(list(prompts))
    out, counts = [], {}
    for p in prompts:
      k = counts.get(p, 0)
      counts[p] = k + 1
      out.append(_solid((len(p) * 3 + k) % 256, 8, 8))
    return np.stack(out)
  return generate


def test_export_benchmark_geneval(geneval_file, tmp_path):
  calls = []
  export.export_benchmark("geneval", geneval_file, tmp_path / "g", _fake_generate(calls), n_per_prompt=2,
                          prompts_per_call=2)
  prompts = [m["prompt"] for m in GENEVAL_LINES]
  assert calls == [[prompts[0]] * 2 + [prompts[1]] * 2, [prompts[2]] * 2]
  walk = _geneval_scorer_walk(tmp_path / "g")
  assert len(walk) == 6
  for metadata, path in walk:
    k = int(os.path.basename(path)[:4])
    assert np.array_equal(_load(path), _solid((len(metadata["prompt"]) * 3 + k) % 256, 8, 8))


def test_export_benchmark_dpg(dpg_folder, tmp_path):
  calls = []
  export.export_benchmark("dpg", dpg_folder, tmp_path / "d", _fake_generate(calls), n_per_prompt=4)
  assert len(calls) == 1 and len(calls[0]) == 8
  prompts = export.read_dpg_prompts(dpg_folder)
  assert sorted(os.listdir(tmp_path / "d")) == sorted(f"{n}.png" for n in prompts)
  for name, prompt in prompts.items():
    crops = _dpg_crops(tmp_path / "d" / f"{name}.png", 8)
    for k, crop in enumerate(crops):
      assert np.array_equal(crop, _solid((len(prompt) * 3 + k) % 256, 8, 8))
  with pytest.raises(ValueError):
    export.export_benchmark("parti", dpg_folder, tmp_path / "x", _fake_generate([]))
  with pytest.raises(ValueError):  # generate_fn must return one image per requested prompt
    export.export_benchmark("dpg", dpg_folder, tmp_path / "y", lambda ps: [_solid(0)] * (len(ps) - 1))
