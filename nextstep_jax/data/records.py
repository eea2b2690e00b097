"""Decoding stored records, and the bad-record vocabulary: every reason a record can be skipped.

A bad record never crashes the pipeline and is never dropped silently: the transform that meets it raises
`BadRecord(reason, detail)`, the pipeline turns it into a skip marker that travels with the data (also out of
worker processes), and the main-process iterator logs a warning naming dataset + index and counts it.
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# reason → what it means (also the keys of `DataIterator.stats()`)
SKIP_REASONS: dict[str, str] = {
    "undecodable": "image bytes could not be decoded",
    "unsupported_mode": "image mode cannot be converted to RGB (e.g. 16-bit or float images)",
    "too_small": "image is smaller than its aspect-ratio bucket (would need upscaling)",
    "empty_caption": "caption / instruction / text missing or empty",
    "special_tokens": "caption / instruction / text contains a NextStep special-token string such as <|image_area|>",
    "bad_latents": "stored latent tokens do not match their grid or token width",
    "too_long": "the sample has more tokens (or image tokens) than one packed row holds",
}
# Modes the official `to_rgb` converts (PIL); anything else (I;16, I, F, …) is rejected.
CONVERTIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "P", "1")
_EXIF_ORIENTATION = 0x0112


class BadRecord(Exception):
  """A record that must be skipped; `reason` is a key of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def to_str(value: Any) -> str:
  """A TFDS text/bytes feature as str ('' for None)."""
  if value is None:
    return ""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def require_text(value: Any, what: str = "caption") -> str:
  """The stripped text, or BadRecord('empty_caption') when missing/empty."""
  text = to_str(value).strip()
  if not text:
    raise BadRecord("empty_caption", f"{what} is empty")
  return text


def decode_image(data: Any, min_size: Callable[[int, int], tuple[int, int]] | None = None) -> np.ndarray:
  """Encoded image bytes → uint8 (H, W, 3) RGB, like the official `to_rgb` (EXIF transpose, alpha on white).

  `min_size(h, w) -> (min_h, min_w)`, given the (EXIF-oriented) stored size, lets JPEGs decode at a reduced DCT
  scale that is still at least that large (much faster for photos far larger than their bucket); it may raise
  BadRecord itself (e.g. too small). Raises BadRecord('undecodable' | 'unsupported_mode').
  """
  if isinstance(data, np.ndarray):
    data = data.item()
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise BadRecord("undecodable", "no image bytes")
  try:
    img = Image.open(io.BytesIO(data))
    if min_size is not None:
      w, h = img.size
      if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        w, h = h, w
      mh, mw = min_size(h, w)
      if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        img.draft(img.mode, (mw, mh) if (w, h) == img.size else (mh, mw))
    img.load()
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadRecord("undecodable", f"{type(e).__name__}: {e}") from None
  if img.mode not in CONVERTIBLE_MODES:
    raise BadRecord("unsupported_mode", f"mode {img.mode}")
  try:
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")
    if img.mode == "LA":
      img = img.convert("RGBA")
    if img.mode == "RGBA":
      background = Image.new("RGBA", img.size, "white")
      img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
  except (OSError, ValueError) as e:
    raise BadRecord("unsupported_mode", f"{img.mode}: {e}") from None
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise BadRecord("undecodable", f"decoded to shape {arr.shape}")
  return arr


def encode_png(image_HxWx3: np.ndarray) -> bytes:
  """uint8 (H, W, 3) → PNG bytes (lossless; what the builders store for generated images)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image_HxWx3, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def meta_json(**fields: Any) -> str:
  return json.dumps(fields, sort_keys=True)
