"""TFDS ArrayRecord builders (no TensorFlow needed): image-text, editing, text, synthetic shapes, latent caches.

Features are numpy-only (JAX_NOTES §1): images are the original encoded bytes (PNG/JPEG/…, copied verbatim, never
re-encoded — shapes images are PNG), texts are `tfds.features.Text` (read back as bytes), latent tokens are float32
tensors. Records keep their generation order (`disable_shuffling=True`), so index i of a dataset is stable and
warnings can name it. Bad inputs (unreadable image, missing caption) are stored as they are and skipped, with a
warning and a count, when the pipeline reads them (`nextstep_jax.data.records`).

Layout on disk: `<dst>/<builder name>/1.0.0/{dataset_info.json, features.json, *.array_record-*}`.
`open_dataset(path)` accepts that version directory or any parent holding exactly one dataset.
Writes are atomic: a dataset is built in `<dst>/.<builder name>.partial` and renamed into place when complete;
one with zero examples is never left behind (EmptyDatasetError). `build_dataset` warns (one line each) about
images without a caption and images smaller than their bucket at `check_resolution` px, which training skips.

  kind (CLI)    builder            features
  image_text    ns_image_text      image (bytes), caption, meta (json: file)
  shapes        ns_shapes          image (PNG bytes), caption, meta (json: scene, seed, index, size)
  edit          ns_edit            source (bytes), target (bytes), instruction, meta (json: files)
  text          ns_text            text, meta (json: file, line)
  (data encode) ns_latent_t2i      tokens (n, D) float32, grid (2,) int32 [rows, cols], caption, meta
  (data encode) ns_latent_edit     src_tokens, src_grid, tgt_tokens, tgt_grid, instruction, meta
  wds (edit / interleave)          ns_interleaved  images [bytes], caption (<image_n> tags), task, meta
  (data encode) ns_latent_interleaved  tokens (Σn, D), grids (k, 2) [rows, cols] per image, caption, task, meta
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nextstep_jax.data import shapes
from nextstep_jax.data.buckets import bucket_grids, nearest_bucket
from nextstep_jax.data.records import encode_png, meta_json
from nextstep_jax.errors import warn
from nextstep_jax.paths import resolve_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUILD_KINDS = ("image_text", "edit", "text", "shapes")
VERSION = "1.0.0"
SPLIT = "train"

# builder name → (pipeline kind, storage): kind ∈ {t2i, edit, text}; storage ∈ {pixels, latents, text}
DATASET_KINDS: dict[str, tuple[str, str]] = {
    "ns_image_text": ("t2i", "pixels"),
    "ns_shapes": ("t2i", "pixels"),
    "ns_edit": ("edit", "pixels"),
    "ns_text": ("text", "text"),
    "ns_latent_t2i": ("t2i", "latents"),
    "ns_latent_edit": ("edit", "latents"),
    "ns_interleaved": ("interleave", "pixels"),
    "ns_latent_interleaved": ("interleave", "latents"),
}


def _serialize_deterministically(self, example) -> bytes:
  """TFDS's example serializer with map fields in sorted order (the default order differs between processes), so
  a rebuilt shard — e.g. a redone encode part — is byte-identical."""
  return self.get_tf_example(example).SerializeToString(deterministic=True)


tfds.core.example_serializer.ExampleSerializer.serialize_example = _serialize_deterministically


class DatasetError(ValueError):
  """A dataset directory is missing, ambiguous or of the wrong kind."""


class EmptyDatasetError(DatasetError):
  """A build produced no examples (nothing was written)."""


Tensor = tfds.features.Tensor
Text = tfds.features.Text


def bytes_feature():
  return Tensor(shape=(), dtype=np.object_)


def tokens_feature():
  return Tensor(shape=(None, None), dtype=np.float32, encoding="bytes")


def grid_feature():
  return Tensor(shape=(2,), dtype=np.int32)


class NsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: examples (key, feature dict) come from a callable given at construction; order is kept."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, examples: Callable[[], Iterable[tuple[Any, dict]]] | None = None, **kwargs):
    self._examples = examples
    super().__init__(**kwargs)

  def _features(self) -> dict[str, Any]:
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(self._features()), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    if self._examples is None:
      raise DatasetError(f"{self.name}: nothing to build (no examples callable given)")
    yield from self._examples()


class NsImageText(NsBuilder):
  """Image-caption pairs (original encoded image bytes)."""

  def _features(self):
    return dict(image=bytes_feature(), caption=Text(), meta=Text())


class NsShapes(NsImageText):
  """Synthetic shapes scenes (PNG) with captions; meta holds the ground-truth scene."""


class NsEdit(NsBuilder):
  """Editing triplets: source image, instruction, target image (original encoded bytes)."""

  def _features(self):
    return dict(source=bytes_feature(), target=bytes_feature(), instruction=Text(), meta=Text())


class NsText(NsBuilder):
  """Plain-text documents."""

  def _features(self):
    return dict(text=Text(), meta=Text())


class NsLatentT2i(NsBuilder):
  """Latent cache of an image-text dataset: normalised, patchified VAE tokens + token grid + caption."""

  def _features(self):
    return dict(tokens=tokens_feature(), grid=grid_feature(), caption=Text(), meta=Text())


class NsLatentEdit(NsBuilder):
  """Latent cache of an editing dataset: source and target tokens + grids + instruction."""

  def _features(self):
    return dict(src_tokens=tokens_feature(), src_grid=grid_feature(), tgt_tokens=tokens_feature(), tgt_grid=grid_feature(), instruction=Text(),
                meta=Text())


class NsInterleaved(NsBuilder):
  """Several images with text between them (official `<image_n>` captions): edit (loss on the last image) or
  interleave (loss on every image), per record `task`."""

  def _features(self):
    return dict(images=tfds.features.Sequence(bytes_feature()), caption=Text(), task=Text(), meta=Text())


class NsLatentInterleaved(NsBuilder):
  """Latent cache of an interleaved dataset: every image's tokens concatenated in image order + their grids."""

  def _features(self):
    return dict(tokens=tokens_feature(), grids=Tensor(shape=(None, 2), dtype=np.int32), caption=Text(), task=Text(),
                meta=Text())


BUILDERS: dict[str, type] = {c.name: c for c in (NsImageText, NsShapes, NsEdit, NsText, NsLatentT2i, NsLatentEdit,
                                                  NsInterleaved, NsLatentInterleaved)}
assert set(BUILDERS) == set(DATASET_KINDS), BUILDERS


def build_atomically(builder_name: str, dst: str | os.PathLike, build: Callable[[str], None],
                     count: Callable[[], int | None], overwrite: bool = False) -> str:
  """Runs `build(data_dir)` (a TFDS builder's download_and_prepare under data_dir) in a temporary sibling of
  dst and renames the finished dataset into place; returns its version dir.

  `count()` says how many examples were written (None: not known after a failure), so a build of zero examples
  leaves nothing (EmptyDatasetError) and an existing dataset survives until its replacement is complete."""
  if builder_name not in BUILDERS:
    raise DatasetError(f"unknown dataset builder {builder_name!r}; known: {sorted(BUILDERS)}")
  dst = resolve_path(dst)
  out = dst / builder_name / VERSION
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another --dst")
  tmp = dst / f".{builder_name}.partial"
  shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted build
  empty = EmptyDatasetError(f"no examples to write to {out}; nothing was written")
  try:
    build(str(tmp))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if count() == 0:
      raise empty from None
    raise
  if count() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    raise empty
  if out.exists():
    shutil.rmtree(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  os.replace(tmp / builder_name / VERSION, out)
  shutil.rmtree(tmp, ignore_errors=True)
  return str(out)


def write_dataset(builder_name: str, dst: str | os.PathLike, examples: Callable[[], Iterable[tuple[Any, dict]]],
                  overwrite: bool = False) -> str:
  """Writes examples (key, feature dict) as an ArrayRecord TFDS dataset under dst (atomically, see
  `build_atomically`); returns its version dir."""
  count = 0

  def counted():
    nonlocal count
    for item in examples():
      count += 1
      yield item

  def build(data_dir: str) -> None:
    BUILDERS[builder_name](examples=counted, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return build_atomically(builder_name, dst, build, lambda: count, overwrite)


# ----------------------------------------------------------------------------------------------- sources


def read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError:
    return b""  # stored as is; the pipeline skips it as undecodable, naming the record


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
          raise DatasetError(f"{path}:{line_no}: not valid JSON ({e.msg}); every line must be one JSON object")


def _single_jsonl(src: Path) -> Path | None:
  if src.is_file() and src.suffix == ".jsonl":
    return src
  if src.is_dir():
    found = sorted(src.glob("*.jsonl"))
    if len(found) > 1:
      raise DatasetError(f"{src} holds several .jsonl files ({[p.name for p in found]}); pass one as --src")
    return found[0] if found else None
  raise DatasetError(f"source {src} does not exist")


def image_text_examples(src: str | os.PathLike) -> Callable[[], Iterator[tuple[int, dict]]]:
  """Image-caption pairs: `src` holds one `.jsonl` ({"file", "caption"}, files relative to it), or images with
  a sidecar `<stem>.txt` caption each (searched recursively, sorted by path)."""
  src = Path(src)
  index = _single_jsonl(src)
  if index is not None:
    rows = [(index.parent / r["file"], r.get("caption") or "", r["file"]) for _, r in jsonl_records(index)]
  else:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    rows = [(p, p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").is_file() else "",
             str(p.relative_to(src))) for p in files]
  if not rows:
    raise DatasetError(f"no images found in {src} (extensions {IMAGE_EXTENSIONS}; or give a .jsonl with "
                       f'{{"file", "caption"}} lines)')

  def gen():
    for i, (path, caption, name) in enumerate(rows):
      yield i, dict(image=read_bytes(path), caption=caption, meta=meta_json(file=name))
  gen.rows = [(name, path, caption) for path, caption, name in rows]  # for build_dataset's checks
  return gen


def edit_examples(src: str | os.PathLike) -> Callable[[], Iterator[tuple[int, dict]]]:
  """Editing triplets from a `.jsonl` of {"source", "target", "instruction"} (paths relative to the file)."""
  index = _single_jsonl(Path(src))
  if index is None:
    raise DatasetError(f"no .jsonl in {src}; editing data needs lines {{\"source\", \"target\", \"instruction\"}}")
  rows = []
  for line_no, r in jsonl_records(index):
    missing = [k for k in ("source", "target") if k not in r]
    if missing:
      raise DatasetError(f"{index}:{line_no}: missing key(s) {missing}; each line needs source, target, instruction")
    rows.append(r)

  def gen():
    for i, r in enumerate(rows):
      yield i, dict(source=read_bytes(index.parent / r["source"]), target=read_bytes(index.parent / r["target"]),
                    instruction=r.get("instruction") or "", meta=meta_json(source=r["source"], target=r["target"]))
  gen.rows = [(r["target"], index.parent / r["target"], r.get("instruction") or "") for r in rows]
  return gen


def text_examples(src: str | os.PathLike) -> Callable[[], Iterator[tuple[int, dict]]]:
  """Plain text: every `.txt` file is one document, every `.jsonl` line ({"text"}) one document."""
  src = Path(src)
  if not src.exists():
    raise DatasetError(f"source {src} does not exist")
  files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".jsonl"))
  if not files:
    raise DatasetError(f"no .txt or .jsonl files in {src}")

  def gen():
    i = 0
    for path in files:
      name = str(path.relative_to(src)) if src.is_dir() else path.name
      if path.suffix == ".jsonl":
        for line_no, r in jsonl_records(path):
          yield i, dict(text=r.get("text") or "", meta=meta_json(file=name, line=line_no))
          i += 1
      else:
        yield i, dict(text=path.read_text(encoding="utf-8"), meta=meta_json(file=name))
        i += 1
  return gen


def shapes_examples(num: int, size: int = 64, seed: int = 0) -> Callable[[], Iterator[tuple[int, dict]]]:
  """`num` procedurally generated shapes scenes (`nextstep_jax.data.shapes.make_example`), PNG-encoded."""
  if num <= 0:
    raise DatasetError(f"--num must be positive for the shapes dataset, got {num}")

  def gen():
    for i in range(num):
      ex = shapes.make_example(i, seed=seed, size=size)
      yield i, dict(image=encode_png(ex["image"]), caption=ex["caption"],
                    meta=meta_json(scene=json.loads(ex["scene"]), seed=seed, index=i, size=size))
  return gen


def check_images(items: Iterable[tuple[str, Path, str]], resolution: int, down_factor: int = 16) -> None:
  """Warns (one line per problem) about (name, image path, caption/instruction) rows that training would skip:
  missing captions, images smaller than their aspect bucket at `resolution` px."""
  side = resolution // down_factor
  grids = bucket_grids(resolution, down_factor, "aspect" if side and side % 16 == 0 else "fixed")
  items = list(items)
  no_caption = [name for name, _, text in items if not str(text).strip()]
  small = []
  for name, path, _ in items:
    try:
      with Image.open(path) as img:
        w, h = img.size
    except (OSError, ValueError, SyntaxError):
      continue  # unreadable: the pipeline skips and names it
    gh, gw = nearest_bucket(h, w, grids)
    if h < gh * down_factor or w < gw * down_factor:
      small.append(f"{name} {w}x{h}")
  n = len(items)
  if no_caption:
    warn(f"{len(no_caption)} of {n} images have no caption / instruction (e.g. {no_caption[0]}); training skips them "
         f"(empty_caption) — add a sidecar .txt / a \"caption\" per line")
  if small:
    warn(f"{len(small)} of {n} images are smaller than their {resolution}-px bucket (e.g. {small[0]}); training "
         f"and `data encode` at {resolution} px skip them (too_small) — use larger images or a lower resolution")


def build_dataset(kind: str, dst: str | os.PathLike, src: str | os.PathLike | None = None, num: int = 0,
                  size: int = 64, seed: int = 0, overwrite: bool = False, check_resolution: int = 0) -> str:
  """`nextstep-jax data build`: one of BUILD_KINDS into `dst`; returns the dataset's version directory.
  `check_resolution` > 0: warn about captionless images and images too small for that resolution's buckets."""
  src = resolve_path(src) if src else src
  if kind not in BUILD_KINDS:
    raise DatasetError(f"--kind {kind!r} is not one of {BUILD_KINDS}")
  if kind != "shapes" and not src:
    raise DatasetError(f"--kind {kind} needs --src (a folder or .jsonl)")
  examples, name = {
      "image_text": lambda: (image_text_examples(src), "ns_image_text"),
      "edit": lambda: (edit_examples(src), "ns_edit"),
      "text": lambda: (text_examples(src), "ns_text"),
      "shapes": lambda: (shapes_examples(num, size, seed), "ns_shapes"),
  }[kind]()
  if check_resolution and kind in ("image_text", "edit"):
    check_images(examples.rows, check_resolution)
  return write_dataset(name, dst, examples, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------- reading


def resolve_dataset_dir(path: str | os.PathLike) -> Path:
  """The version directory (holding dataset_info.json) at or below `path` (exactly one must exist)."""
  path = resolve_path(path)
  if (path / "dataset_info.json").is_file():
    return path
  if not path.is_dir():
    raise DatasetError(f"dataset directory {path} does not exist; build one with `nextstep-jax data build`")
  found = sorted(p.parent for p in path.glob("*/dataset_info.json")) + sorted(
      p.parent for p in path.glob("*/*/dataset_info.json"))
  if len(found) != 1:
    what = "no dataset" if not found else f"{len(found)} datasets ({[str(p) for p in found]})"
    raise DatasetError(f"{path} holds {what}; pass the directory of exactly one dataset")
  return found[0]


class TfdsSource:
  """Picklable random-access view of one TFDS ArrayRecord split (opened lazily in each process).

  `name` is the builder name (a key of DATASET_KINDS); `len()` is read from dataset_info.json.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = str(resolve_dataset_dir(path))
    info = json.loads((Path(self.path) / "dataset_info.json").read_text())
    self.name = info["name"]
    if self.name not in DATASET_KINDS:
      raise DatasetError(f"{self.path} is a {self.name!r} dataset, not one of {sorted(DATASET_KINDS)}")
    splits = {s["name"]: s for s in info.get("splits", [])}
    if SPLIT not in splits:
      raise DatasetError(f"{self.path} has no {SPLIT!r} split")
    self._len = sum(int(n) for n in splits[SPLIT].get("shardLengths", []))
    self._src = None
    self._lock = threading.Lock()

  @property
  def kind(self) -> str:
    return DATASET_KINDS[self.name][0]

  @property
  def storage(self) -> str:
    return DATASET_KINDS[self.name][1]

  def _open(self):
    with self._lock:  # reader threads share one source
      if self._src is None:
        self._src = tfds.builder_from_directory(self.path).as_data_source(SPLIT)
    return self._src

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return self._open()[int(index)]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_src", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _src=None, _lock=threading.Lock())

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {self._len} records, {self.path})"


def open_dataset(path: str | os.PathLike) -> TfdsSource:
  return TfdsSource(path)
