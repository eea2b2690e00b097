"""Aspect-ratio buckets (official `HW_ASPECT_RATIOS`, spec §1.6): the list, scaling, nearest-bucket choice.

Buckets are token grids (rows, cols); one token covers `down_factor` pixels per side (16 for the f8 VAE with 2×2
patches). The official list is given for 256-px training (16×16 tokens ≈ 256 tokens per image) and is scaled by
`resolution / (16 · down_factor)` — ×2 at 512 px (e.g. 32×32, 16×64). `mode="fixed"` uses a single square bucket. Images are fitted into their bucket with
`nextstep_jax.images.resize_center_crop` (cover, then center-crop).
"""
from __future__ import annotations

import math
from typing import Sequence

# (rows, cols) in tokens at 256 px (16-px tokens); products ≈ 256.
HW_ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16),
    (17, 15), (18, 14), (19, 13), (21, 12), (23, 11), (25, 10), (28, 9), (32, 8),
)
BASE_SIDE = 16  # tokens per side of the square bucket the list is written for
BUCKET_MODES = ("aspect", "fixed")


def bucket_grids(resolution: int, down_factor: int = 16, mode: str = "aspect") -> tuple[tuple[int, int], ...]:
  """Token grids of the buckets at `resolution` px (the side of the square bucket)."""
  if mode not in BUCKET_MODES:
    raise ValueError(f"bucket mode {mode!r} is not one of {BUCKET_MODES}")
  if resolution <= 0 or resolution % down_factor:
    raise ValueError(f"resolution {resolution} is not a positive multiple of the token size {down_factor} px "
                     f"(VAE down factor × patch); use e.g. {max(1, resolution // down_factor) * down_factor}")
  side = resolution // down_factor
  if mode == "fixed":
    return ((side, side),)
  if side % BASE_SIDE:
    raise ValueError(f"aspect buckets need resolution/{down_factor} = {side} tokens per side to be a multiple of "
                     f"{BASE_SIDE}; use resolution {max(1, side // BASE_SIDE) * BASE_SIDE * down_factor} or "
                     f"buckets='fixed'")
  k = side // BASE_SIDE
  return tuple((h * k, w * k) for h, w in HW_ASPECT_RATIOS)


def nearest_bucket(height: int, width: int, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The bucket whose aspect ratio is closest to height/width (in log ratio; ties → earlier bucket)."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image size {height}x{width} must be positive")
  target = math.log(height / width)
  return min(grids, key=lambda g: abs(math.log(g[0] / g[1]) - target))

