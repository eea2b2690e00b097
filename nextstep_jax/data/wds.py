"""Foreign dataset layouts → our builders' examples: official NextStep WebDataset shards, img2dataset output, and
Hugging Face `datasets` directories (`save_to_disk`).

Official layout (NextStep-1 training release, `nextstep/data/build_wds.py`): a tar holds per sample `key.json`
(`caption` with `<image_n>` placeholders where image n goes, optional `metadata`) and `key-{n}.{png,jpg,…}`; a
single-image sample may also use `key.jpg`, a text-only sample `key.json` {"text"} or `key.txt`. Members of one
sample are consecutive; keys hold no '.' or '-'. Shards are named by brace patterns (`shards/{00000..01023}.tar`),
globs or a folder.

  task        record                                                builder
  text        text                                                  ns_text
  t2i         image bytes + caption (placeholders removed)          ns_image_text
  edit        images (order of n) + caption with <image_n> tags     ns_interleaved (task=edit: loss on the last image)
  interleave  images (order of n) + caption with <image_n> tags     ns_interleaved (task=interleave: loss on all)

Samples that cannot become a record are skipped at build time and counted per reason (`BUILD_SKIP_REASONS`);
image bytes are stored verbatim, so an unreadable image is skipped (and counted) later by `data encode`.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from braceexpand import braceexpand

from nextstep_jax.data.builders import IMAGE_EXTENSIONS, DatasetError, EmptyDatasetError, write_dataset
from nextstep_jax.data.interleaved import IMAGE_TAG_RE
from nextstep_jax.data.records import meta_json

TASKS = ("auto", "text", "t2i", "edit", "interleave")
TASK_BUILDERS = {"text": "ns_text", "t2i": "ns_image_text", "edit": "ns_interleaved", "interleave": "ns_interleaved"}
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_INDEXED_BASE = re.compile(r"^(.*)-(\d+)$")
logger = logging.getLogger("nextstep_jax.data")

BUILD_SKIP_REASONS: dict[str, str] = {
    "bad_json": "key.json is not valid JSON (or not an object)",
    "no_caption": "no caption / text field (json caption key, or .txt)",
    "missing_image": "a <image_n> placeholder names an image the sample does not have (or there is no image)",
    "wrong_task": "the sample's images / placeholders do not fit the build's --task",
    "corrupt_shard": "a tar shard is torn (truncated or not a tar from some point on): the sample in flight",
}


class SkipCounter(Counter):
  """Per-reason counts of skipped samples (also `total`)."""

  def skip(self, reason: str) -> None:
    assert reason in BUILD_SKIP_REASONS, reason
    self[f"skipped/{reason}"] += 1
    self["skipped_total"] += 1


# ----------------------------------------------------------------------------------------------- shard lists


def expand_shards(spec: str | os.PathLike, suffixes: tuple[str, ...] = (".tar",)) -> list[str]:
  """Brace patterns (`a/{000..009}.tar`, several joined by ',' inside braces), globs, files or a folder → sorted
  existing files. Raises DatasetError naming the first missing one."""
  spec = str(spec)
  if os.path.isdir(spec):
    found = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix in suffixes)
    if not found:
      raise DatasetError(f"{spec} holds no {'/'.join(suffixes)} files")
    return found
  out = []
  for pattern in braceexpand(spec):
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise DatasetError(f"shard {pattern} does not exist (from --src {spec!r}); check the pattern, e.g. "
                         f"'shards/{{00000..00009}}.tar'")
    out.extend(matches)
  return out


# ----------------------------------------------------------------------------------------------- tar streaming


def _split_name(name: str) -> tuple[str, str]:
  """'dir/key-1.png' → ('dir/key-1', 'png'): the extension is everything after the first '.' of the file name."""
  head, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{head}/{stem}" if head else stem), ext.lower()


def _has_end_marker(path: str) -> bool:
  """A complete tar ends with two zero 512-byte blocks; a shard cut at a member boundary reads as a shorter tar
  without them (tarfile does not complain), so this is how a torn shard is told from a short one."""
  size = os.path.getsize(path)
  if size < 1024 or size % 512:
    return False
  with open(path, "rb") as f:
    f.seek(size - 1024)
    return not any(f.read(1024))


def iter_tar_samples(path: str, counts: SkipCounter | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
  """Streams one tar shard → (key, {"json": bytes?, "txt": bytes?, "image": (ext, bytes)?, "images": {n: bytes}})
  grouping consecutive members of one sample (`key.*` and `key-{n}.*`, the official rule).

  A torn shard (truncated, or not a tar from some point on) yields the samples before the damage; the sample in
  flight is dropped, counted once as `corrupt_shard`, and one warning names the shard."""
  current, sample = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        base, ext = _split_name(member.name)
        if not ext or "/._" in f"/{member.name}":
          continue
        m = _INDEXED_BASE.match(base)
        key, n = (m.group(1), int(m.group(2))) if m else (base, None)
        if key != current:
          if current is not None:
            yield current, sample
          current, sample = key, {"images": {}}
        data = tar.extractfile(member).read()
        if n is not None:
          if ext in _IMAGE_EXTS:
            sample["images"][n] = data
        elif ext in _IMAGE_EXTS:
          sample["image"] = data
        elif ext in ("json", "txt"):
          sample[ext] = data
    if not _has_end_marker(path):
      raise tarfile.ReadError("truncated: no end-of-archive blocks")
  except (tarfile.TarError, OSError, EOFError) as e:
    if counts is not None:
      counts.skip("corrupt_shard")
    logger.warning("shard %s: %s: %s (the rest of the shard and the sample in flight are skipped)", path,
                   type(e).__name__, e)
    return
  if current is not None:
    yield current, sample


# ----------------------------------------------------------------------------------------------- samples → records


def _meta(sample: dict) -> dict | None:
  if sample.get("json") is None:
    return {}
  try:
    meta = json.loads(sample["json"].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return meta if isinstance(meta, dict) else None


def _text(meta: dict, sample: dict, keys: tuple[str, ...]) -> str | None:
  for k in keys:
    v = meta.get(k)
    if isinstance(v, str) and v.strip():
      return v
  if sample.get("txt") is not None:
    return sample["txt"].decode("utf-8", errors="replace")
  return None


def sample_task(sample: dict, caption: str | None) -> str:
  """What a sample is by its content: text (no image), t2i (one image, at most one placeholder) or interleave."""
  n_images = len(sample["images"]) + ("image" in sample)
  tags = IMAGE_TAG_RE.findall(caption or "")
  if n_images == 0 and not tags:
    return "text"
  if n_images <= 1 and len(tags) <= 1:
    return "t2i"
  return "interleave"


def official_record(key: str, sample: dict, task: str, counts: SkipCounter, caption_key: str = "caption",
                    source: str = "") -> dict | None:
  """One grouped tar sample → the feature dict of `TASK_BUILDERS[task]`, or None (skipped and counted)."""
  meta = _meta(sample)
  if meta is None:
    counts.skip("bad_json")
    return None
  keys = (caption_key, "text") if task == "text" else (caption_key,)
  caption = _text(meta, sample, keys)
  if caption is None:
    counts.skip("no_caption")
    return None
  kind = sample_task(sample, caption)
  if kind != task and not (task == "edit" and kind == "interleave"):
    counts.skip("wrong_task")
    return None
  info = meta_json(key=key, source=source, metadata=meta.get("metadata", {}))
  if task == "text":
    return dict(text=caption, meta=info)
  images = dict(sample["images"])
  if "image" in sample:
    images.setdefault(0, sample["image"])
  tags = [int(n) for n in IMAGE_TAG_RE.findall(caption)]
  if task == "t2i":
    if 0 not in images:
      counts.skip("missing_image")
      return None
    return dict(image=images[0], caption=IMAGE_TAG_RE.sub("", caption).strip(), meta=info)
  if not tags or any(n not in images for n in tags):
    counts.skip("missing_image")
    return None
  top = max(images)
  if sorted(images) != list(range(top + 1)):
    counts.skip("missing_image")
    return None
  return dict(images=[images[n] for n in range(top + 1)], caption=caption, task=task, meta=info)


def resolve_task(task: str, shards: list[str], caption_key: str = "caption") -> str:
  """`auto` → the task of the first readable sample of the first shard (else `task` itself)."""
  if task not in TASKS:
    raise DatasetError(f"--task {task!r} is not one of {TASKS}")
  if task != "auto":
    return task
  for key, sample in iter_tar_samples(shards[0]):
    meta = _meta(sample)
    if meta is not None:
      return sample_task(sample, _text(meta, sample, (caption_key, "text")))
  raise DatasetError(f"--task auto: no readable sample in {shards[0]}; pass --task text|t2i|edit|interleave")


SHARD_KEY_STRIDE = 10 ** 9  # record key = shard index · stride + sample index (int: TFDS's Beam writer sorts them)


def shard_examples(shard: str, shard_index: int, task: str, counts: SkipCounter, caption_key: str = "caption"
                   ) -> Iterator[tuple[int, dict]]:
  """(key, record) of one official shard; keys sort in (shard, sample) order."""
  name = os.path.basename(shard)
  for i, (key, sample) in enumerate(iter_tar_samples(shard, counts)):
    rec = official_record(key, sample, task, counts, caption_key, source=name)
    if rec is not None:
      yield shard_index * SHARD_KEY_STRIDE + i, rec


def wds_examples(src: str, task: str = "auto", caption_key: str = "caption"
                 ) -> tuple[str, Callable[[], Iterator[tuple[int, dict]]], SkipCounter]:
  """(builder name, examples callable, skip counter filled while it runs) for official shards at `src`."""
  shards = expand_shards(src)
  task = resolve_task(task, shards, caption_key)
  counts = SkipCounter()

  def gen():
    for j, shard in enumerate(shards):
      yield from shard_examples(shard, j, task, counts, caption_key)
  return TASK_BUILDERS[task], gen, counts


# ----------------------------------------------------------------------------------------------- img2dataset


def img2dataset_examples(src: str) -> tuple[str, Callable[[], Iterator[tuple[str, dict]]], SkipCounter]:
  """img2dataset output: tar shards (`key.jpg` + `key.txt` caption + `key.json`) or parquet shards with the
  image bytes in a `jpg` / `png` / `webp` column and a `caption` column (`--output_format parquet`)."""
  files = expand_shards(src, (".tar", ".parquet"))
  counts = SkipCounter()
  if all(f.endswith(".parquet") for f in files):
    return "ns_image_text", _parquet_gen(files, counts), counts
  if any(f.endswith(".parquet") for f in files):
    raise DatasetError(f"{src} mixes .tar and .parquet shards; pass one kind (e.g. 'out/*.tar')")

  def gen():
    for j, shard in enumerate(files):
      for i, (key, sample) in enumerate(iter_tar_samples(shard, counts)):
        meta = _meta(sample)
        if meta is None:
          counts.skip("bad_json")
          continue
        caption = _text(meta, sample, ("caption",))
        if caption is None:
          counts.skip("no_caption")
          continue
        image = sample.get("image", sample["images"].get(0))
        if image is None:
          counts.skip("missing_image")
          continue
        info = meta_json(key=key, source=os.path.basename(shard), url=meta.get("url", ""))
        yield j * SHARD_KEY_STRIDE + i, dict(image=image, caption=caption, meta=info)
  return "ns_image_text", gen, counts


def _parquet_gen(files: list[str], counts: SkipCounter) -> Callable[[], Iterator[tuple[str, dict]]]:
  import pyarrow.parquet as pq

  image_cols = {}
  for path in files:  # every shard's columns checked before the build starts
    try:
      names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 — pyarrow raises its own error types for unreadable files
      raise DatasetError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    image_cols[path] = next((c for c in ("jpg", "png", "webp", "image") if c in names), None)
    if image_cols[path] is None or "caption" not in names:
      raise DatasetError(f"{path}: img2dataset parquet needs an image bytes column (jpg/png/webp/image) and "
                         f"'caption'; it has {names}")

  def gen():
    for j, path in enumerate(files):
      pf = pq.ParquetFile(path)
      names = pf.schema_arrow.names
      image_col = image_cols[path]
      cols = [c for c in (image_col, "caption", "key", "url") if c in names]
      i = 0
      for batch in pf.iter_batches(columns=cols, batch_size=256):
        for row in batch.to_pylist():
          key = j * SHARD_KEY_STRIDE + i
          i += 1
          if not row.get("caption"):
            counts.skip("no_caption")
            continue
          if not row.get(image_col):
            counts.skip("missing_image")
            continue
          yield key, dict(image=row[image_col], caption=row["caption"],
                          meta=meta_json(key=str(row.get("key", "")), source=os.path.basename(path),
                                         url=row.get("url") or ""))
  return gen


# ----------------------------------------------------------------------------------------------- HF datasets


def hf_examples(src: str, image_column: str = "image", text_column: str = "") -> tuple[str, Callable, SkipCounter]:
  """A Hugging Face dataset saved with `save_to_disk` (read with `datasets.load_from_disk`, no hub access):
  image + caption columns → ns_image_text; no image column → text-only ns_text."""
  import datasets

  if not Path(src).is_dir():
    raise DatasetError(f"--src {src} is not a directory saved with datasets' save_to_disk")
  try:
    ds = datasets.load_from_disk(src)
  except (FileNotFoundError, ValueError) as e:
    raise DatasetError(f"{src} is not a `save_to_disk` directory ({e})") from None
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      raise DatasetError(f"{src} is a DatasetDict without a 'train' split ({list(ds)}); pass the split's folder")
    ds = ds["train"]
  columns = ds.column_names
  has_image = image_column in columns
  text_column = text_column or next((c for c in (("caption", "text") if has_image else ("text", "caption"))
                                     if c in columns), "")
  if text_column not in columns:
    raise DatasetError(f"{src}: no text column (tried caption/text; columns {columns}); pass --text-column")
  if has_image and isinstance(ds.features[image_column], datasets.Image):
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
  counts = SkipCounter()

  def gen():
    for i, row in enumerate(ds):
      text = row[text_column]
      if not isinstance(text, str) or not text.strip():
        counts.skip("no_caption")
        continue
      info = meta_json(row=i)
      if not has_image:
        yield i, dict(text=text, meta=info)
        continue
      image = row[image_column]
      data = image.get("bytes") if isinstance(image, dict) else image
      if not data and isinstance(image, dict) and image.get("path"):
        data = Path(image["path"]).read_bytes() if Path(image["path"]).is_file() else b""
      if not data:
        counts.skip("missing_image")
        continue
      yield i, dict(image=data, caption=text, meta=info)
  return ("ns_image_text" if has_image else "ns_text"), gen, counts


def summary(counts: Iterable[tuple[str, int]] | Counter) -> str:
  items = {k: v for k, v in dict(counts).items() if k.startswith("skipped/")}
  return ", ".join(f"{k[8:]} {v}" for k, v in sorted(items.items())) or "none"


FOREIGN_KINDS = ("wds", "img2dataset", "hf")


def build_foreign(kind: str, src: str, dst: str | os.PathLike, task: str = "auto", caption_key: str = "caption",
                  image_column: str = "image", text_column: str = "", overwrite: bool = False) -> tuple[str, dict]:
  """`data build --kind wds|img2dataset|hf` in this process → (version dir, skip counts)."""
  if not src:
    raise DatasetError(f"--kind {kind} needs --src (shard pattern, folder or saved dataset)")
  if kind == "wds":
    name, gen, counts = wds_examples(src, task, caption_key)
  elif kind == "img2dataset":
    name, gen, counts = img2dataset_examples(src)
  elif kind == "hf":
    name, gen, counts = hf_examples(src, image_column, text_column)
  else:
    raise DatasetError(f"--kind {kind!r} is not one of {FOREIGN_KINDS}")
  try:
    out = write_dataset(name, dst, gen, overwrite=overwrite)
  except EmptyDatasetError:
    why = f"all {counts['skipped_total']} samples were skipped ({summary(counts)})" if counts else "it holds no samples"
    raise EmptyDatasetError(f"--src {src}: {why}; nothing was written to {dst} — check --task / --caption-key "
                            f"(--text-column / --image-column for hf) or the shards") from None
  return out, dict(counts)
