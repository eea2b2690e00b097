"""LM-side patchify/unpatchify: element order, raster token order, exact inverses, non-square orientation."""
from __future__ import annotations

import os

import numpy as np
import pytest

from nextstep_jax.models.latents import patchify, token_grid, unpatchify


def reference_patchify(z, p):
  """Loop version written from the spec: token (r, c) element ch·p·p + pi·p + qi = z[r·p+pi, c·p+qi, ch]."""
  b, h, w, ch = z.shape
  gh, gw = h // p, w // p
  out = np.zeros((b, gh * gw, ch * p * p), z.dtype)
  for r in range(gh):
    for c in range(gw):
      for k in range(ch):
        for pi in range(p):
          for qi in range(p):
            out[:, r * gw + c, k * p * p + pi * p + qi] = z[:, r * p + pi, c * p + qi, k]
  return out


@pytest.mark.parametrize("shape,p", [((2, 6, 6, 4), 2), ((1, 4, 10, 3), 2), ((2, 6, 9, 2), 3), ((1, 3, 5, 4), 1)])
def test_matches_reference_and_inverts(shape, p):
  z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  tokens = np.asarray(patchify(z, p))
  np.testing.assert_array_equal(tokens, reference_patchify(z, p))
  np.testing.assert_array_equal(np.asarray(unpatchify(tokens, shape[1], shape[2], p)), z)
  t = np.random.default_rng(1).standard_normal(tokens.shape).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(patchify(unpatchify(t, shape[1], shape[2], p), p)), t)


def test_fixture_tokens(fixtures_dir):
  """The official NextStep.patchify output (vae.npz `tokens`) from the fixture latents (NCHW → NHWC)."""
  a = np.load(os.path.join(fixtures_dir, "vae.npz"))
  z = a["latents"].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(patchify(z, 2)), a["tokens"])
  np.testing.assert_array_equal(np.asarray(unpatchify(a["tokens"], 8, 8, 2)), z)


def test_non_square_orientation_256x512():
  """A 256-high, 512-wide image: f8 latents 32×64 → a 16-row × 32-column token grid in raster order."""
  assert token_grid(256, 512, 8, 2) == (16, 32)
  n = 16 * 32
  tokens = np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (1, n, 64))
  z = np.asarray(unpatchify(tokens, 32, 64, 2))
  assert z.shape == (1, 32, 64, 16)
  y, x = np.meshgrid(np.arange(32), np.arange(64), indexing="ij")
  np.testing.assert_array_equal(z[0, :, :, 0], (y // 2) * 32 + (x // 2))  # token k sits at row k//32, col k%32
  # and the top-right latent pixel comes from token 31 (end of the first row), bottom-left from token 480
  assert z[0, 0, 63, 5] == 31 and z[0, 31, 0, 5] == 480


def test_errors():
  with pytest.raises(ValueError, match="not divisible by the patch size 2"):
    patchify(np.zeros((1, 5, 4, 16), np.float32), 2)
  with pytest.raises(ValueError, match="got 16 tokens, but a 8x16 latent with patch 2 has 4x8=32"):
    unpatchify(np.zeros((1, 16, 64), np.float32), 8, 16, 2)
  with pytest.raises(ValueError, match="not a multiple of 16"):
    token_grid(250, 256, 8, 2)
