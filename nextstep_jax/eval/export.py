"""Write generated images in the folder layouts the official GenEval and DPG-Bench scorers read.

GenEval (github.com/djghosh13/geneval, `evaluation/evaluate_images.py`): prompts come from
`evaluation_metadata.jsonl`, one JSON object per line ({"tag": …, "include": [{"class": …, "count": …}, …],
"prompt": …, optionally "exclude"}). The scorer walks `<outdir>/<digits>/`, reads `metadata.jsonl` there with
`json.load` (so it holds exactly that prompt's one JSON object) and scores every `samples/<digits>.png`:

  <outdir>/00000/metadata.jsonl
  <outdir>/00000/samples/0000.png … 0003.png
  <outdir>/00000/grid.png            (optional; ignored by the scorer)

DPG-Bench (github.com/TencentQQGYLab/ELLA, `dpg_bench/compute_dpg_bench.py`): prompts are `prompts/<name>.txt`;
the scorer looks up each image by `basename.split('.')[0]` and, with `--pic-num 4 --resolution R`, crops the
four R×R tiles (0,0) (R,0) (0,R) (R,R) — so each prompt gets one `<name>.png` holding its 4 images in a 2×2
grid, row-major (`--pic-num 1` reads a single image: 1 image per prompt is also accepted).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

GENEVAL_REQUIRED_KEYS = ("prompt", "tag", "include")


def _to_uint8(image) -> np.ndarray:
  """(H, W, 3) uint8 from uint8, or from floats in [0, 1]."""
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
  if np.issubdtype(arr.dtype, np.floating):
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
  if arr.dtype != np.uint8:
    raise ValueError(f"integer images must be uint8, got {arr.dtype}")
  return arr


def _save_png(image, path: Path) -> None:
  Image.fromarray(_to_uint8(image)).save(path, format="PNG")


def grid_2x2(images: Sequence) -> np.ndarray:
  """Four equal-size images tiled row-major: [[0, 1], [2, 3]]."""
  ims = [_to_uint8(im) for im in images]
  if len(ims) != 4 or any(im.shape != ims[0].shape for im in ims):
    raise ValueError(f"a 2x2 grid needs 4 images of one shape, got {[im.shape for im in ims]}")
  return np.concatenate([np.concatenate(ims[:2], axis=1), np.concatenate(ims[2:], axis=1)], axis=0)


def read_geneval_prompts(path: str | os.PathLike) -> list[dict]:
  """The metadata objects of a GenEval `evaluation_metadata.jsonl` (blank lines skipped), in file order."""
  out = []
  for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    meta = json.loads(line)
    missing = [k for k in GENEVAL_REQUIRED_KEYS if k not in meta]
    if missing:
      raise ValueError(f"{path}:{lineno}: GenEval metadata lacks {missing}")
    out.append(meta)
  return out


def write_geneval(outdir: str | os.PathLike, metadata_list: Sequence[Mapping], images_per_prompt: Sequence,
                  grid: bool = False) -> list[Path]:
  """Writes prompt i's metadata and images to `<outdir>/<i:05d>/`; returns the prompt folders.

  `images_per_prompt[i]` is a sequence (or (k, H, W, 3) array) of the images generated for `metadata_list[i]`.
  `grid=True` also writes `grid.png` (a row of the samples), which GenEval's scorer ignores.
  """
  if len(metadata_list) != len(images_per_prompt):
    raise ValueError(f"{len(metadata_list)} prompts but {len(images_per_prompt)} image lists")
  folders = []
  for index, (meta, images) in enumerate(zip(metadata_list, images_per_prompt)):
    folder = Path(outdir) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(dict(meta)) + "\n", encoding="utf-8")
    for k, image in enumerate(images):
      _save_png(image, folder / "samples" / f"{k:04d}.png")
    if grid and len(images):
      _save_png(np.concatenate([_to_uint8(im) for im in images], axis=1), folder / "grid.png")
    folders.append(folder)
  return folders


def read_dpg_prompts(folder: str | os.PathLike) -> dict[str, str]:
  """{name: prompt} for every `<name>.txt` in a DPG-Bench prompt folder, sorted by name."""
  return {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(Path(folder).glob("*.txt"))}


def write_dpg(outdir: str | os.PathLike, name_to_images: Mapping[str, Sequence]) -> list[Path]:
  """Writes `<outdir>/<name>.png` per prompt: its 4 images as a 2×2 grid (or its single image as is)."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, images in name_to_images.items():
    if "." in name or "/" in name or not name:
      raise ValueError(f"DPG-Bench names images by basename.split('.')[0]; {name!r} would not map back")
    if len(images) == 4:
      image = grid_2x2(images)
    elif len(images) == 1:
      image = _to_uint8(images[0])
    else:
      raise ValueError(f"DPG-Bench wants 4 images per prompt (2x2 grid, --pic-num 4) or 1; {name!r} has "
                       f"{len(images)}")
    path = outdir / f"{name}.png"
    _save_png(image, path)
    paths.append(path)
  return paths


def _generate_grouped(prompts: Sequence[str], generate_fn: Callable, n_per_prompt: int,
                      prompts_per_call: int) -> list[list[np.ndarray]]:
  """Calls `generate_fn` on chunks of prompts, each repeated `n_per_prompt` times in a row; regroups per prompt."""
  groups = []
  for start in range(0, len(prompts), prompts_per_call):
    chunk = prompts[start:start + prompts_per_call]
    batch = [p for p in chunk for _ in range(n_per_prompt)]
    images = list(generate_fn(batch))
    if len(images) != len(batch):
      raise ValueError(f"generate_fn returned {len(images)} images for {len(batch)} prompts")
    groups.extend(images[i * n_per_prompt:(i + 1) * n_per_prompt] for i in range(len(chunk)))
  return groups


def export_benchmark(kind: str, prompt_path: str | os.PathLike, outdir: str | os.PathLike,
                     generate_fn: Callable[[list[str]], Sequence], n_per_prompt: int = 4,
                     prompts_per_call: int = 8) -> list[Path]:
  """Generates and writes a whole benchmark. kind: "geneval" (prompt_path: the metadata .jsonl) or "dpg"
  (prompt_path: the prompts folder). `generate_fn(prompts) -> images` gets each prompt `n_per_prompt` times in a
  row and returns one (H, W, 3) uint8 / [0, 1] float image per entry. Returns the written folders / files."""
  if kind == "geneval":
    metadata = read_geneval_prompts(prompt_path)
    groups = _generate_grouped([m["prompt"] for m in metadata], generate_fn, n_per_prompt, prompts_per_call)
    return write_geneval(outdir, metadata, groups)
  if kind == "dpg":
    if n_per_prompt not in (1, 4):
      raise ValueError(f"DPG-Bench reads 4 images per prompt (a 2x2 grid) or 1; got n_per_prompt={n_per_prompt}")
    prompts = read_dpg_prompts(prompt_path)
    groups = _generate_grouped(list(prompts.values()), generate_fn, n_per_prompt, prompts_per_call)
    return write_dpg(outdir, dict(zip(prompts, groups)))
  raise ValueError(f"unknown benchmark {kind!r}; expected 'geneval' or 'dpg'")
