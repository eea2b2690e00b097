"""Where each image-token slot sits in its image: the batch key `image_token_grid` and what is derived from it.

`image_token_grid` (B, T, 4) int32 = (row, col, rows, cols) of the image token in each slot — its place in its
image's token grid and that grid's size; zeros in padding slots. The data pipeline writes it (a packed row may
hold several images of different grids); the model needs it only for
  * `gen_pos_embed`: token (row, col) takes entry row·base_grid + col of the base sin-cos table, the sub-grid
    the official sampler reads (`gen_pos_embed_with_ar`), so training and sampling see the same embedding;
  * the official training-only input noise (`noise_strength`): the LM reads `tokens + ε·σ`, σ growing linearly
    from 0 to `strength` over the image's latent pixels in raster order (targets stay clean).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

GRID_KEY = "image_token_grid"


def grid_slots(rows: int, cols: int) -> np.ndarray:
  """(rows·cols, 4) int32: (row, col, rows, cols) of one image's tokens in raster order."""
  r, c = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
  return np.stack([r, c, np.full_like(r, rows), np.full_like(r, cols)], axis=-1).astype(np.int32)


def check_grids_fit(cfg: Any, grids: Any, fix: str) -> None:
  """Raises when a (rows, cols) token grid is larger than gen_pos_embed's base table (only with gen_pos_embed)."""
  if not cfg.use_gen_pos_embed:
    return
  base = cfg.base_image_grid_size
  for h, w in grids:
    if max(h, w) > base:
      raise ValueError(f"a {h}×{w} token grid exceeds gen_pos_embed's {base}² table (model.base_image_grid_size); "
                       f"{fix}")


def batch_grid(cfg: Any, batch: dict[str, Any]) -> Any:
  """The batch's `image_token_grid`; None when absent and not needed (no gen_pos_embed, no input noise)."""
  if GRID_KEY in batch:
    return batch[GRID_KEY]
  if cfg.use_gen_pos_embed or cfg.input_noise_strength > 0:
    raise ValueError(f"the batch has no {GRID_KEY!r} (B, T, 4), which use_gen_pos_embed / input_noise_strength "
                     f"need; the data pipeline writes it — hand-built batches must add it "
                     f"(models.image_grid.grid_slots)")
  return None


def pos_index(grid_BxTx4: Any) -> tuple[Any, Any]:
  """(token index row·cols + col, grid width cols), each flattened to (B·T,) — `NextStep.condition`'s arguments."""
  row, col, _, cols = (grid_BxTx4[..., i].reshape(-1) for i in range(4))
  cols = jnp.maximum(cols, 1)
  return row * cols + col, cols


def input_noise_scale(grid_BxTx4: Any, patch: int, channels: int, strength: float) -> Any:
  """σ (B, T, channels·patch²) of the official input noise, in the token element order c·p² + pi·p + qi.

  Latent pixel (row·p + pi, col·p + qi) of an image of (rows·p) × (cols·p) latent pixels has raster index
  i and σ = strength · i / (n − 1), n = rows·cols·p² (torch.linspace(0, strength, n) over the latent).
  """
  row, col, rows, cols = (grid_BxTx4[..., i][..., None].astype(jnp.float32) for i in range(4))
  pi, qi = (jnp.asarray(a, jnp.float32).reshape(-1) for a in np.divmod(np.arange(patch * patch), patch))
  index = (row * patch + pi) * (cols * patch) + col * patch + qi  # (B, T, p²)
  n = jnp.maximum(rows * cols * patch * patch - 1, 1)
  sigma = strength * index / n
  return jnp.tile(sigma, (1, 1, channels))
