"""Image files ⇄ arrays: load (uint8 RGB, HWC), [-1, 1] floats, resize/center-crop, PNG output, grids, PSNR.

Arithmetic follows the official pipeline: input `ToTensor()` + `Normalize(0.5, 0.5)` = (x/255 − 0.5)/0.5 in float32
(`to_float`), output `round(clamp(x/2 + 0.5, 0, 1)·255)` (`to_uint8`). Works on numpy and jax arrays alike.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

Array = Any  # numpy or jax array


def load_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """Reads an image file → (H, W, 3) uint8 RGB. Transparency is composited over `background`; greyscale,
  palette and CMYK images are converted. A missing or unreadable file raises a one-line error naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
      else:
        out = im.convert("RGB")
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"cannot read image {path}: {msg}; the file is corrupt or not an image") from None
  return np.asarray(out, dtype=np.uint8)


def to_float(x_uint8: Array) -> Array:
  """uint8 [0, 255] → float32 [-1, 1], bit-identical to torchvision ToTensor + Normalize(0.5, 0.5) (≈ x/127.5 − 1)."""
  return (x_uint8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def to_uint8(x: Array) -> Array:
  """float [-1, 1] → uint8: round(clip(x/2 + 0.5, 0, 1)·255) (the official pipeline's output conversion)."""
  y = (x.astype(np.float32) / np.float32(2.0) + np.float32(0.5)).clip(0.0, 1.0) * np.float32(255.0)
  return y.round().astype(np.uint8)


def resize_center_crop(img_HxWx3: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Scales (bicubic) so the image covers `size` = (height, width) (or a square side), then crops the center."""
  th, tw = (size, size) if isinstance(size, int) else tuple(size)
  h, w = img_HxWx3.shape[:2]
  if (h, w) == (th, tw):
    return np.asarray(img_HxWx3, np.uint8)
  scale = max(th / h, tw / w)
  nh, nw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
  im = Image.fromarray(np.asarray(img_HxWx3, np.uint8)).resize((nw, nh), Image.Resampling.BICUBIC)
  top, left = (nh - th) // 2, (nw - tw) // 2
  return np.asarray(im.crop((left, top, left + tw, top + th)), dtype=np.uint8)


def save_png(path: str | os.PathLike, img: np.ndarray) -> Path:
  """Writes an (H, W, 3) or (H, W) uint8 array (floats in [-1, 1] are converted with `to_uint8`) as PNG."""
  arr = np.asarray(img)
  if arr.dtype != np.uint8:
    arr = to_uint8(arr)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path, format="PNG")
  return path


def make_grid(images_NxHxWx3: Sequence[np.ndarray] | np.ndarray, ncols: int | None = None, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Tiles N same-sized uint8 images into one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) image, row-major."""
  imgs = np.asarray(images_NxHxWx3)
  if imgs.dtype != np.uint8:
    imgs = to_uint8(imgs)
  if imgs.ndim != 4:
    raise ValueError(f"make_grid expects (N, H, W, C) images, got shape {imgs.shape}")
  n, h, w, c = imgs.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = imgs[i]
  return grid


def psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
  """PSNR in dB of two uint8 images (inf when identical)."""
  mse = float(np.mean((np.asarray(a_uint8, np.float64) - np.asarray(b_uint8, np.float64)) ** 2))
  return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
