"""LM-side latent tokens: 2×2 patchify of NHWC VAE latents into 64-d tokens and its exact inverse.

Layout (official `NextStep.patchify`, spec §2): latents `z` (B, h, w, C) → tokens (B, (h/p)·(w/p), C·p·p).
Tokens are in raster order (token index r·(w/p) + c for grid row r, column c) and the element index inside a
token is `c·p·p + pi·p + qi` (channel-major, then the row `pi` and column `qi` inside the p×p patch).

Unlike the official `unpatchify` (which assumes a square token grid), `unpatchify` takes the latent height and
width explicitly, so non-square images (e.g. 256×512 pixels → a 16×32 token grid) round-trip exactly.
The VAE's `encoder_norm` grouping (psz) uses the same two functions.
"""
from __future__ import annotations

import jax


def _grid(h: int, w: int, p: int) -> tuple[int, int]:
  if p < 1:
    raise ValueError(f"patch size must be >= 1, got {p}")
  if h % p or w % p:
    raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {p}; "
                     f"use an image whose size is a multiple of (VAE down factor)·{p}")
  return h // p, w // p


def patchify(z_BxhxwxC: jax.Array, p: int) -> jax.Array:
  """(B, h, w, C) → (B, (h/p)(w/p), C·p·p); element index c·p·p + pi·p + qi, raster token order."""
  b, h, w, c = z_BxhxwxC.shape
  gh, gw = _grid(h, w, p)
  x = z_BxhxwxC.reshape(b, gh, p, gw, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, gh, gw, C, pi, qi)
  return x.reshape(b, gh * gw, c * p * p)


def unpatchify(tokens_BxNxD: jax.Array, h: int, w: int, p: int) -> jax.Array:
  """Exact inverse of `patchify`: tokens (B, (h/p)(w/p), C·p·p) → latents (B, h, w, C).

  `h`, `w` are the LATENT height and width (image size / VAE down factor), not the token-grid size.
  """
  b, n, d = tokens_BxNxD.shape
  gh, gw = _grid(h, w, p)
  if n != gh * gw:
    raise ValueError(f"got {n} tokens, but a {h}x{w} latent with patch {p} has {gh}x{gw}={gh * gw}")
  if d % (p * p):
    raise ValueError(f"token width {d} is not a multiple of patch² = {p * p}")
  c = d // (p * p)
  x = tokens_BxNxD.reshape(b, gh, gw, c, p, p)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, gh, pi, gw, qi, C)
  return x.reshape(b, h, w, c)


def token_grid(height: int, width: int, down_factor: int, p: int) -> tuple[int, int]:
  """Token grid (rows, cols) of a `height`×`width`-pixel image (e.g. 512×512, f8, p2 → (32, 32))."""
  m = down_factor * p
  if height % m or width % m:
    raise ValueError(f"image size {height}x{width} is not a multiple of {m} (VAE down factor {down_factor} × patch {p})")
  return height // m, width // m
