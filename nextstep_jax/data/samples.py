"""Record → training sample: tokenise, build the official sequence, attach image tokens / pixels.

A sample is a dict of numpy arrays:
  ids          int32 (n,)       the training sequence (placeholders where image tokens go)
  tokens       float32 (m, D)   image tokens of every image in the sequence, in order (m = #placeholders)
  token_loss   float32 (m,)     1 where the flow-matching loss applies (t2i / interleave: all; edit: the target image
                                only — data/interleaved.py)
  token_grid   int32 (m, 4)     (row, col, rows, cols) of each image token (models/image_grid.py)
  pixels       uint8 (H, W, 3)  only with encode_on_the_fly (then m = 0 and the row's image is these pixels),
  pixel_grid   int32 (h·w, 4)   with `pixels`: the token_grid of the image the encoder will make of them
A record that cannot be used becomes a skip marker {"skip": reason, "source": name, "index": i, "detail": str}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from nextstep_jax.data.buckets import nearest_bucket
from nextstep_jax.data.interleaved import interleaved_sample
from nextstep_jax.data.records import BadRecord, decode_image, require_text
from nextstep_jax.images import resize_center_crop
from nextstep_jax.models.image_grid import grid_slots
from nextstep_jax.tokens import SPECIAL_TOKENS, EditDropProbs, load_tokenizer


def prepare_image(data: Any, grids, down_factor: int, min_size_ratio: float = 1.0) -> tuple[np.ndarray, tuple]:
  """Encoded bytes → (uint8 image resized + center-cropped to its nearest bucket, bucket grid).

  Raises BadRecord for undecodable bytes, unconvertible modes and images smaller than their bucket.
  """
  chosen = {}

  def bucket_px(h: int, w: int) -> tuple[int, int]:
    grid = chosen["grid"] = nearest_bucket(h, w, grids)
    bh, bw = grid[0] * down_factor, grid[1] * down_factor
    if h < bh * min_size_ratio or w < bw * min_size_ratio:
      raise BadRecord("too_small", f"{w}x{h} px is smaller than its bucket {bw}x{bh}")
    return bh, bw

  image = decode_image(data, bucket_px)  # picks the bucket from the stored size, before decoding
  grid = chosen["grid"]
  return resize_center_crop(image, (grid[0] * down_factor, grid[1] * down_factor)), grid


def clean_text(value: Any, what: str) -> str:
  text = require_text(value, what)
  if any(t in text for t in SPECIAL_TOKENS):
    raise BadRecord("special_tokens", f"{what} contains a special-token string")
  return text


def record_tokens(record: dict, tokens_key: str, grid_key: str, token_dim: int) -> tuple[np.ndarray, tuple[int, int]]:
  tokens = np.asarray(record[tokens_key], np.float32)
  grid = tuple(int(x) for x in np.asarray(record[grid_key]).reshape(-1))
  if tokens.ndim != 2 or len(grid) != 2 or tokens.shape != (grid[0] * grid[1], token_dim):
    raise BadRecord("bad_latents", f"{tokens_key} {tokens.shape} vs grid {grid} and token width {token_dim}")
  if not np.isfinite(tokens).all():
    raise BadRecord("bad_latents", f"{tokens_key} has non-finite values")
  return tokens, grid


@dataclasses.dataclass(frozen=True)
class ToSample:
  """Grain random-map transform for one source: ((index, record), rng) → sample or skip marker."""
  source: str
  kind: str  # t2i | edit | text
  storage: str  # pixels | latents | text
  tokenizer: str
  token_dim: int = 64
  seq_len: int = 2048
  drop_text_prob: float = 0.1
  edit_drops: EditDropProbs = EditDropProbs()
  grids: tuple = ((16, 16),)
  down_factor: int = 16
  min_size_ratio: float = 1.0

  def __call__(self, item: tuple[int, dict], rng: np.random.Generator) -> dict:
    index, record = item
    try:
      out = self._sample(record, rng)
      out.update(source=self.source, index=int(index))
      return out
    except BadRecord as e:
      return {"skip": e.reason, "source": self.source, "index": int(index), "detail": e.detail}

  def _sample(self, record: dict, rng: np.random.Generator) -> dict:
    tok = load_tokenizer(self.tokenizer)
    empty = np.zeros((0, self.token_dim), np.float32)
    if self.kind == "text":
      ids = tok.text_sequence(clean_text(record["text"], "text"))[:self.seq_len]
      return _sample(ids, empty, np.zeros((0,), np.float32))
    if self.kind == "t2i":
      caption = clean_text(record["caption"], "caption")
      drop_text = bool(rng.random() < self.drop_text_prob)
      if self.storage == "latents":
        tokens, grid = record_tokens(record, "tokens", "grid", self.token_dim)
        return _sample(tok.t2i_training_sequence(caption, *grid, drop_text=drop_text), tokens,
                       np.ones((len(tokens),), np.float32), [grid])
      pixels, grid = prepare_image(record["image"], self.grids, self.down_factor, self.min_size_ratio)
      out = _sample(tok.t2i_training_sequence(caption, *grid, drop_text=drop_text), empty, np.zeros((0,), np.float32))
      out["pixels"], out["pixel_grid"] = pixels, grid_slots(*grid)
      return out
    if self.kind == "edit":
      instruction = clean_text(record["instruction"], "instruction")
      if self.storage != "latents":
        raise ValueError(f"source {self.source}: editing data must be a latent cache (nextstep-jax data encode)")
      src, src_grid = record_tokens(record, "src_tokens", "src_grid", self.token_dim)
      tgt, tgt_grid = record_tokens(record, "tgt_tokens", "tgt_grid", self.token_dim)
      ids, images = tok.edit_training_sequence(instruction, src_grid, tgt_grid, self.edit_drops.choose(rng))
      parts = [(src, 0.0) if i == 0 else (tgt, 1.0) for i in images]
      grids = [src_grid if i == 0 else tgt_grid for i in images]
      return _sample(ids, np.concatenate([t for t, _ in parts]),
                     np.concatenate([np.full((len(t),), w, np.float32) for t, w in parts]), grids)
    if self.kind == "interleave":
      ids, tokens, loss, grids = interleaved_sample(tok, record, rng, self.token_dim, self.seq_len,
                                                    max(h * w for h, w in self.grids), self.edit_drops)
      return _sample(ids, tokens, loss, grids)
    raise ValueError(f"unknown source kind {self.kind!r}")


def _sample(ids: list[int], tokens: np.ndarray, token_loss: np.ndarray, grids: Sequence[tuple[int, int]] = ()) -> dict:
  """A sample; `grids` (rows, cols) of its images in order give `token_grid` (n_tokens, 4) (models/image_grid.py)."""
  token_grid = np.concatenate([grid_slots(*g) for g in grids]) if grids else np.zeros((0, 4), np.int32)
  return {"ids": np.asarray(ids, np.int32), "tokens": tokens, "token_loss": token_loss, "token_grid": token_grid}


def tag_index(index: int, record: Any) -> tuple[int, Any]:
  """map_with_index transform: remember each record's index in its dataset (for warnings)."""
  return index, record


def record_name(marker: dict) -> str:
  return f"{marker['source']}[{marker['index']}]"
