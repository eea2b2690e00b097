"""Latent caching (`nextstep-jax data encode`): run the VAE once over an image dataset, store LM tokens.

Every image is decoded, fitted to its nearest aspect-ratio bucket (editing pairs: both images to the target's
bucket), encoded in fixed-size batches per bucket (one compilation per bucket shape; the last batch of a bucket
is padded), split over the local devices when the batch divides evenly, patchified 2×2 into normalised 64-d
tokens (what `prepare_inputs_embeds` consumes) and written as an `ns_latent_t2i` / `ns_latent_edit` dataset that
the pipeline reads without the VAE in the train step; an `ns_interleaved` dataset (several images per record)
becomes `ns_latent_interleaved`, every image in its own bucket (`encode_interleaved`). Bad records are skipped
here too (warning + count). `indices` encodes a part of the source (`distributed_encode.py`).
Output records are in order of encoding (grouped by bucket); `meta.source_index` names the input record.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from nextstep_jax.config import LATENT_PATCH_SIZE
from nextstep_jax.convert.vae import load_vae
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.builders import DatasetError, EmptyDatasetError, TfdsSource, write_dataset
from nextstep_jax.data.records import BadRecord, SKIP_REASONS, require_text, to_str
from nextstep_jax.data.samples import prepare_image
from nextstep_jax.images import resize_center_crop, to_float
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.latents import patchify

logger = logging.getLogger("nextstep_jax.data")


def make_encoder(vae_cfg: Any, params: Any, shard: bool = True) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images (B, H, W, 3) → tokens (B, n, C·4) float32 with the given VAE (deterministic encode)."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("batch",)) if shard and len(devices) > 1 else None
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, P()))

  @jax.jit
  def tokens_fn(p, x):
    return patchify(encode_latents(p, vae_cfg, x, deterministic=True), LATENT_PATCH_SIZE)

  def encode(images_uint8: np.ndarray) -> np.ndarray:
    x = to_float(np.asarray(images_uint8))
    if mesh is not None and len(x) % len(devices) == 0:
      x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    return np.asarray(jax.device_get(tokens_fn(params, x)), np.float32)
  return encode


def encode_dataset(src: str | os.PathLike, dst: str | os.PathLike, encode: Callable[[np.ndarray], np.ndarray],
                   down_factor: int, batch_size: int = 16, resolution: int = 256, buckets: str = "aspect",
                   min_size_ratio: float = 1.0, overwrite: bool = False, progress: bool = True,
                   indices=None) -> tuple[str, dict]:
  """Encodes the image dataset at `src` (only records `indices`, default all) into a latent dataset under `dst`.

  `encode`: uint8 (B, H, W, 3) → tokens (B, n, D) (e.g. `make_encoder`); `down_factor`: pixels per token side
  (VAE factor × 2). Returns (the latent dataset's version dir, {"encoded": n, "skipped/<reason>": n, ...}).
  """
  source = TfdsSource(src)
  if source.storage != "pixels":
    raise DatasetError(f"{source.path} is a {source.name} dataset; `data encode` needs an image dataset "
                       f"(ns_image_text, ns_shapes or ns_edit)")
  if batch_size <= 0:
    raise ValueError(f"--batch must be positive, got {batch_size}")
  grids = bucket_grids(resolution, down_factor, buckets)
  if source.kind == "interleave":  # several images per record, each in its own bucket
    return encode_interleaved(source, dst, encode, grids, down_factor, batch_size, min_size_ratio, overwrite,
                              indices, progress)
  is_edit = source.kind == "edit"
  counts: dict[str, int] = defaultdict(int)

  def prepare(index: int) -> tuple[tuple[int, int], list[np.ndarray], dict]:
    rec = source[index]
    meta = json.loads(to_str(rec.get("meta")) or "{}")
    meta["source_index"] = index
    if is_edit:
      text = {"instruction": require_text(rec["instruction"], "instruction")}
      tgt, grid = prepare_image(rec["target"], grids, down_factor, min_size_ratio)
      src_img, _ = prepare_image(rec["source"], grids, down_factor, min_size_ratio)
      src_img = resize_center_crop(src_img, tgt.shape[:2])
      return grid, [src_img, tgt], dict(text, meta=json.dumps(meta, sort_keys=True))
    caption = require_text(rec["caption"], "caption")
    image, grid = prepare_image(rec["image"], grids, down_factor, min_size_ratio)
    return grid, [image], dict(caption=caption, meta=json.dumps(meta, sort_keys=True))

  def flush(grid, items):
    n = len(items)
    images = [np.stack([it[1][k] for it in items]) for k in range(len(items[0][1]))]
    out_tokens = []
    for imgs in images:  # (source, target) for editing, else (image,)
      padded = np.concatenate([imgs, np.repeat(imgs[-1:], batch_size - n, axis=0)]) if n < batch_size else imgs
      out_tokens.append(encode(padded)[:n])
    g = np.asarray(grid, np.int32)
    for j, (_, _, fields) in enumerate(items):
      counts["encoded"] += 1
      if is_edit:
        yield dict(src_tokens=out_tokens[0][j], src_grid=g, tgt_tokens=out_tokens[1][j], tgt_grid=g, **fields)
      else:
        yield dict(tokens=out_tokens[0][j], grid=g, **fields)

  def gen():
    pending: dict[tuple[int, int], list] = defaultdict(list)
    key = 0
    for index in tqdm(range(len(source)) if indices is None else indices, desc=f"encode {source.name}",
                      disable=not progress):
      try:
        grid, imgs, fields = prepare(index)
      except BadRecord as e:
        counts[f"skipped/{e.reason}"] += 1
        counts["skipped_total"] += 1
        logger.warning("skipping record %s[%d]: %s (%s)", source.name, index, SKIP_REASONS[e.reason], e.detail)
        continue
      pending[grid].append((index, imgs, fields))
      if len(pending[grid]) == batch_size:
        for ex in flush(grid, pending.pop(grid)):
          yield key, ex
          key += 1
    for grid, items in sorted(pending.items()):
      for ex in flush(grid, items):
        yield key, ex
        key += 1

  try:
    out = write_dataset("ns_latent_edit" if is_edit else "ns_latent_t2i", dst, gen, overwrite=overwrite)
  except EmptyDatasetError:
    reasons = ", ".join(f"{k.split('/', 1)[1]} ×{v}" for k, v in sorted(counts.items()) if k.startswith("skipped/"))
    raise EmptyDatasetError(f"all {len(source)} records of {source.path} skipped ({reasons or 'no records'}); "
                            f"nothing was written to {dst} — fix the data or --resolution / --min-size-ratio") \
        from None
  return out, dict(counts)


def encode_interleaved(source, dst: str | os.PathLike, encode: Callable[[np.ndarray], np.ndarray], grids,
                       down_factor: int, batch_size: int = 16, min_size_ratio: float = 1.0, overwrite: bool = False,
                       indices: Sequence[int] | None = None, progress: bool = True) -> tuple[str, dict]:
  """An `ns_interleaved` TfdsSource → `ns_latent_interleaved` under dst; every image fitted to its own bucket.

  Records are encoded in chunks of `batch_size` records; the chunk's images are grouped by bucket and encoded in
  fixed-size batches (one compilation per bucket). Output order = input order (of `indices`, default all).
  """
  counts: dict[str, int] = defaultdict(int)
  indices = list(range(len(source))) if indices is None else list(indices)

  def prepare(index: int):
    rec = source[index]
    caption = require_text(rec["caption"], "caption")
    meta = json.loads(to_str(rec.get("meta")) or "{}")
    meta["source_index"] = int(index)
    prepared = [prepare_image(data, grids, down_factor, min_size_ratio) for data in rec["images"]]
    if not prepared:
      raise BadRecord("undecodable", "record has no images")
    return prepared, dict(caption=caption, task=to_str(rec.get("task")) or "interleave",
                          meta=json.dumps(meta, sort_keys=True))

  def encode_chunk(chunk):
    by_grid = defaultdict(list)  # grid → [(record slot, image slot, pixels)]
    for r, (prepared, _) in enumerate(chunk):
      for j, (pixels, grid) in enumerate(prepared):
        by_grid[grid].append((r, j, pixels))
    tokens = [[None] * len(p) for p, _ in chunk]
    for grid, items in sorted(by_grid.items()):
      for lo in range(0, len(items), batch_size):
        part = items[lo:lo + batch_size]
        x = np.stack([p for _, _, p in part])
        if len(part) < batch_size:
          x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(part), axis=0)])
        out = encode(x)
        for (r, j, _), t in zip(part, out):
          tokens[r][j] = t
    for r, (prepared, fields) in enumerate(chunk):
      counts["encoded"] += 1
      yield dict(tokens=np.concatenate(tokens[r]).astype(np.float32),
                 grids=np.asarray([g for _, g in prepared], np.int32), **fields)

  def gen():
    chunk, key = [], 0
    for index in tqdm(indices, desc=f"encode {source.name}", disable=not progress):
      try:
        chunk.append(prepare(index))
      except BadRecord as e:
        counts[f"skipped/{e.reason}"] += 1
        counts["skipped_total"] += 1
        logger.warning("skipping record %s[%d]: %s (%s)", source.name, index, SKIP_REASONS[e.reason], e.detail)
        continue
      if len(chunk) == batch_size:
        for ex in encode_chunk(chunk):
          yield key, ex
          key += 1
        chunk = []
    for ex in encode_chunk(chunk):
      yield key, ex
      key += 1

  out = write_dataset("ns_latent_interleaved", dst, gen, overwrite=overwrite)
  return out, dict(counts)


def vae_encoder(vae_dir: str | os.PathLike) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """(`make_encoder` of the VAE of a model directory, pixels per LM token side) for `encode_dataset`."""
  vae_cfg, params = load_vae(vae_dir)
  return make_encoder(vae_cfg, params), vae_cfg.downsample_factor * LATENT_PATCH_SIZE


def encode_with_model(src: str | os.PathLike, dst: str | os.PathLike, vae_dir: str | os.PathLike,
                      batch_size: int = 16, resolution: int = 256, buckets: str = "aspect",
                      min_size_ratio: float = 1.0, overwrite: bool = False, progress: bool = True) -> tuple[str, dict]:
  """`encode_dataset` with the VAE of a model directory (`nextstep_config.json` + `vae_params/`)."""
  return encode_dataset(src, dst, *vae_encoder(vae_dir), batch_size=batch_size, resolution=resolution,
                        buckets=buckets, min_size_ratio=min_size_ratio, overwrite=overwrite, progress=progress)
