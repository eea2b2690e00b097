"""Interleaved sequences: several images with text between them → one training sequence with several image blocks.

A record (`ns_interleaved` raw / `ns_latent_interleaved` cached) holds images 0..k-1 and a caption whose `<image_n>`
tags say where image n goes (the official WebDataset format). The training sequence (official `MixedDataset`
"interleave" / "image_editing" branches):

  lead + text_0 + I(h_0, w_0) + text_1 + I(h_1, w_1) + … + text_k + eos,  I = <|image_area|>h*w boi h·w×ph eoi

each image with its own token grid. Flow-matching loss: `task=interleave` on every image, `task=edit` on the last
image of the sequence only (`image_filtered_idx`). Random arrangement, as the official datasets do:
  interleave  10 % keep only the image tags (text dropped)
  edit        10 % tags moved to the end; 2-image samples: 20 % drop the source image / the text / both (thirds);
              3-image samples: 30 % drop the first (0.3) or second (0.7) image
and a sequence keeps at most seq_len // (2 · largest bucket's tokens) images (a random contiguous window).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from nextstep_jax.data.records import BadRecord, require_text, to_str
from nextstep_jax.tokens import IMAGE_PLACEHOLDER_TOKEN, SPECIAL_TOKENS, EditDropProbs

IMAGE_TAG_RE = re.compile(r"<image_(\d+)>")  # where image n goes in an official caption
INTERLEAVE_TAGS_ONLY_PROB = 0.1  # official video_interleave.py
THREE_IMAGE_DROP_PROB = 0.3  # official image_editing_interleave.py (first image 0.3, second 0.7 of those)


def arrange_caption(caption: str, task: str, rng: np.random.Generator, drops: EditDropProbs = EditDropProbs()) -> str:
  """The caption after the official random arrangement (module docstring)."""
  tags = [m.group(0) for m in IMAGE_TAG_RE.finditer(caption)]
  if task == "interleave":
    return "".join(tags) if rng.random() < INTERLEAVE_TAGS_ONLY_PROB else caption
  if len(tags) == 2:
    layout = drops.choose(rng)
  elif len(tags) == 3 and rng.random() < THREE_IMAGE_DROP_PROB:
    return caption.replace(tags[0] if rng.random() < 0.3 else tags[1], "", 1)
  else:
    layout = "tags_at_end" if rng.random() < drops.tags_at_end else "full"
  if layout == "tags_at_end":
    return IMAGE_TAG_RE.sub("", caption) + "".join(tags)
  if layout == "drop_image":
    return caption.replace(tags[0], "", 1)
  if layout == "drop_text":
    return "".join(tags)
  if layout == "drop_both":
    return tags[-1]
  return caption


def split_caption(caption: str) -> tuple[list[str], list[int]]:
  """'a<image_0>b<image_1>' → (['a', 'b', ''], [0, 1]): k+1 text pieces around k image references."""
  parts = IMAGE_TAG_RE.split(caption)
  return parts[0::2], [int(n) for n in parts[1::2]]


def window(texts: list[str], order: list[int], max_images: int, rng: np.random.Generator
           ) -> tuple[list[str], list[int]]:
  """At most `max_images` images: a random contiguous window, each with the text before it (official)."""
  if len(order) <= max_images:
    return texts, order
  start = int(rng.integers(0, len(order) - max_images + 1))
  keep = range(start, start + max_images)
  return [texts[i] for i in keep] + [""], [order[i] for i in keep]


def sequence(tok, texts: Sequence[str], order: Sequence[int], grids: Sequence[tuple[int, int]]) -> list[int]:
  """lead + text_0 + I(grid of image order[0]) + text_1 + … + eos."""
  ids = tok.encode(texts[0])
  for text, n in zip(texts[1:], order):
    ids += tok.image_block(*grids[n]) + tok.encode_plain(text)
  return ids + [tok.eos_id]


def _check_text(caption: str) -> str:
  text = require_text(caption, "caption")
  if any(t in text for t in SPECIAL_TOKENS):
    raise BadRecord("special_tokens", "caption contains a special-token string")
  return text


def latent_images(record: dict, token_dim: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
  """Per-image tokens and grids of an `ns_latent_interleaved` record (BadRecord('bad_latents') if inconsistent)."""
  tokens = np.asarray(record["tokens"], np.float32)
  grids = [tuple(int(x) for x in g) for g in np.asarray(record["grids"]).reshape(-1, 2)]
  sizes = [h * w for h, w in grids]
  if tokens.ndim != 2 or tokens.shape != (sum(sizes), token_dim) or not grids:
    raise BadRecord("bad_latents", f"tokens {tokens.shape} vs grids {grids} and token width {token_dim}")
  if not np.isfinite(tokens).all():
    raise BadRecord("bad_latents", "tokens have non-finite values")
  return np.split(tokens, np.cumsum(sizes)[:-1]), grids


def interleaved_sample(tok, record: dict, rng: np.random.Generator, token_dim: int, seq_len: int,
                       max_grid_tokens: int, drops: EditDropProbs) -> tuple[list[int], np.ndarray, np.ndarray, list]:
  """(ids, tokens (m, D), token_loss (m,), grids in sequence order) of one cached interleaved record."""
  caption = _check_text(to_str(record["caption"]))
  task = to_str(record.get("task")) or "interleave"
  per_image, grids = latent_images(record, token_dim)
  texts, order = split_caption(arrange_caption(caption, task, rng, drops))
  if not order or any(n >= len(grids) for n in order):
    raise BadRecord("bad_latents", f"caption references images {order} but the record has {len(grids)}")
  texts, order = window(texts, order, max(1, seq_len // (2 * max_grid_tokens)), rng)
  ids = sequence(tok, texts, order, grids)
  loss = [np.full((len(per_image[n]),), 1.0 if task == "interleave" or j == len(order) - 1 else 0.0, np.float32)
          for j, n in enumerate(order)]
  return ids, np.concatenate([per_image[n] for n in order]), np.concatenate(loss), [grids[n] for n in order]


def describe(tok, ids: Sequence[int]) -> str:
  """Decoded row with every run of image placeholders shortened to `<|image_placeholder|>×n`."""
  ph = IMAGE_PLACEHOLDER_TOKEN
  return re.sub(f"(?:{re.escape(ph)})+", lambda m: f"{ph}×{len(m.group(0)) // len(ph)}", tok.decode(list(ids)))


def image_blocks(grid_Tx4: np.ndarray, loss_T: np.ndarray) -> list[tuple[int, int, bool]]:
  """(rows, cols, has loss) of each image block of a row's `image_token_grid` (a block starts at (0, 0))."""
  out = []
  for t in np.flatnonzero((grid_Tx4[:, 0] == 0) & (grid_Tx4[:, 1] == 0) & (grid_Tx4[:, 2] > 0)):
    out.append((int(grid_Tx4[t, 2]), int(grid_Tx4[t, 3]), bool(loss_T[t] > 0)))
  return out
