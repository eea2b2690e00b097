"""A synthetic in-memory data source with the real batch contract, as a checkpointable Grain iterator.

Row layout (like the official t2i training sequence): random text ids, `<|image_area|>` + "h*w" digits
(random here), `<|begin_of_image|>`, n placeholders, `<|end_of_image|>`, eos, right padding. Image tokens are
random unit-variance 64-d vectors. Global batch `i` is a pure function of (seed, i); process p of n gets its
contiguous rows [p·B/n, (p+1)·B/n), so any process layout forms the same global batches (multi-host tests), and
runs are reproducible and resumable. Used by tests and benchmarks that must not depend on datasets.
"""
from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from nextstep_jax.config import ModelConfig
from nextstep_jax.data.packing import REJECTED
from nextstep_jax.models.image_grid import grid_slots


def unit_tokens(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Random image tokens normalised to zero mean and unit variance over their last axis."""
  toks = rng.standard_normal(shape).astype(np.float32)
  return (toks - toks.mean(-1, keepdims=True)) / toks.std(-1, keepdims=True)


def synthetic_batch(cfg: ModelConfig, index: int, batch: int, seq_len: int, image_tokens: int, seed: int = 0,
                    text_len: int | None = None) -> dict[str, np.ndarray]:
  """One process-local batch (numpy) following the NextStep batch contract."""
  rng = np.random.default_rng([seed, index])
  n = image_tokens
  text_len = text_len or max(1, seq_len - n - 8)
  ids = np.full((batch, seq_len), cfg.pad_token_id, np.int32)
  mask = np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    t = int(rng.integers(1, text_len + 1))
    text = rng.integers(0, min(256, cfg.vocab_size), t)
    row = np.concatenate([text, [cfg.image_area_id], rng.integers(48, 58, 3), [cfg.boi_id],
                          np.full(n, cfg.image_placeholder_id), [cfg.eoi_id, cfg.eos_token_id]])[:seq_len]
    ids[r, :len(row)], mask[r, :len(row)] = row, 1
  labels = np.where(mask > 0, ids, -100).astype(np.int32)
  toks = unit_tokens(rng, (batch, n, cfg.token_dim))
  rows = max((d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0), default=1)  # the squarest grid of n tokens
  return {"input_ids": ids, "attention_mask": mask,
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "labels": labels, "image_tokens": toks, "image_loss_mask": np.ones((batch, n), np.float32),
          "image_token_grid": np.broadcast_to(grid_slots(rows, max(n // rows, 1))[:n], (batch, n, 4)).copy()}


def synthetic_pair_batch(cfg: ModelConfig, index: int, batch: int, seq_len: int, image_tokens: int,
                         seed: int = 0) -> dict[str, np.ndarray]:
  """`synthetic_batch` plus an independent rejected token set in the same slots (the DPO batch contract)."""
  out = synthetic_batch(cfg, index, batch, seq_len, image_tokens, seed)
  rng = np.random.default_rng([seed, index, 1])
  out[REJECTED] = unit_tokens(rng, out["image_tokens"].shape)
  return out


def synthetic_iterator(cfg: ModelConfig, global_batch: int, seq_len: int, image_tokens: int, seed: int = 0,
                       process_index: int = 0, process_count: int = 1,
                       make_batch: Callable = synthetic_batch) -> grain.DatasetIterator:
  """Infinite checkpointable iterator of this process's rows of the synthetic global batches `make_batch(cfg, i,
  global_batch, seq_len, image_tokens, seed)` (default: the t2i contract)."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  ds = grain.MapDataset.range(1 << 40).map(
      lambda i: {k: v[rows] for k, v in make_batch(cfg, int(i), global_batch, seq_len, image_tokens, seed).items()})
  return iter(ds.to_iter_dataset())
