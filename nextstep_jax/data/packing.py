"""Packing samples into fixed-length rows and rows into batches (a checkpointable Grain IterDataset).

Next-fit packing: samples are appended to the open row while both its tokens (≤ seq_len) and its image tokens
(≤ T slots) fit; a sample that does not fit closes the row and opens the next one. Samples are never split, so
an image block is always whole inside one row. A sample longer than a row is skipped and counted ("too_long";
or raises with on_too_long="error"). Rows of all aspect buckets share packs: in latent mode the image tokens are
flat (each image still carries its own `h*w` area tag), so only the sequence length matters.

Batch (B rows, L = seq_len, T image slots) — the contract the model and trainer are written against:
  input_ids (B, L) int32, attention_mask (B, L) int32, positions (B, L) int32, labels (B, L) int32 (pads −100),
  image_tokens (B, T, D) float32 + image_loss_mask (B, T) float32 — or, with encode_on_the_fly,
  pixel_values (B, H, W, 3) float32 in [−1, 1] + image_loss_mask (B, h·w); image_token_grid (B, T or h·w, 4)
  int32 (row, col, rows, cols) of every slot's token (models/image_grid.py), zeros in empty slots.
  `_skipped`: list of skip markers met while building this batch (stripped by the DataIterator); at the end of
  finite data a batch may be only {"_skipped": [...], "_empty": True}.
  Preference (DPO) batches add `rejected_image_tokens` (B, T, D): the rejected image's tokens in the same slots.

Checkpointing: every sample read since the last emitted batch is still pending (in the open row or in closed,
not yet batched rows), and those samples are contiguous in the parent stream. The state is therefore the parent
state before the first pending sample plus how many samples were read since; `set_state` restores the parent
there and replays them (no batch can be completed during the replay).

Data that yields nothing: with `records_per_epoch` set (the pipeline sets it to the records of one pass over this
process's shards), a run of that many skipped records in a row raises `NoUsableRecordsError` ("all N records
skipped: empty_caption ×N") instead of looping forever; after one pass, a skip rate above HIGH_SKIP_RATE is
warned about once.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from nextstep_jax.images import to_float
from nextstep_jax.tokens import IGNORE_INDEX

logger = logging.getLogger("nextstep_jax.data")
HIGH_SKIP_RATE = 0.5


REJECTED = "rejected_image_tokens"  # the preference-pair batch key


class TooLongError(ValueError):
  """A sample does not fit in one row and on_too_long='error'."""


class NoUsableRecordsError(ValueError):
  """A whole pass over the data was skipped: no batch can ever be formed."""


@dataclasses.dataclass(frozen=True)
class PackSpec:
  batch_size: int  # rows per (process-local) batch
  seq_len: int
  image_slots: int  # T
  token_dim: int
  pad_id: int
  placeholder_id: int
  pack: bool = True
  reset_positions: bool = False
  pixel_hw: tuple[int, int] | None = None  # (H, W) px when rows carry pixel_values (encode on the fly)
  pixel_tokens: int = 0  # image tokens of that bucket (h·w)
  on_too_long: str = "drop"
  records_per_epoch: int = 0  # records in one pass (0: unknown, no fail-fast / skip-rate warning)


class PackBatchIterDataset(grain.IterDataset):
  """Samples/skip markers → packed, batched numpy dicts (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec

  def __iter__(self) -> "PackBatchIterator":
    return PackBatchIterator(self._parent.__iter__(), self._spec)

  def __str__(self) -> str:
    return f"PackBatchIterDataset({self._spec})"


class PackBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec
    self._reset()
    self._anchor = None
    self._exhausted = False
    self._skip_run: collections.Counter = collections.Counter()  # reasons since the last usable sample
    self._seen = self._dropped = 0
    self._rate_checked = False

  def _reset(self) -> None:
    self._open: list[dict] = []
    self._open_len = 0
    self._open_img = 0
    self._ready: list[list[dict]] = []
    self._skipped: list[dict] = []
    self._n_read = 0

  # -- packing
  def _close_open(self) -> None:
    if self._open:
      self._ready.append(self._open)
      self._open, self._open_len, self._open_img = [], 0, 0

  def _add(self, el: dict) -> None:
    s = self._spec
    if "skip" in el:
      self._skip(el)
      return
    n, m = len(el["ids"]), len(el["tokens"])
    if int(np.count_nonzero(el["ids"] == s.placeholder_id)) != (s.pixel_tokens if "pixels" in el else m):
      raise AssertionError(f"sample has {np.count_nonzero(el['ids'] == s.placeholder_id)} placeholders but "
                           f"{m} image tokens")  # a bug in sample building, not bad data
    if n > s.seq_len or m > s.image_slots:
      what = f"{n} tokens / {m} image tokens; a row holds {s.seq_len} / {s.image_slots}"
      if s.on_too_long == "error":
        raise TooLongError(f"sample is too long ({what}); raise config.data.seq_len or max_image_tokens, or set "
                           f"on_too_long='drop'")
      self._skip({"skip": "too_long", "source": el.get("source", "?"), "index": el.get("index", -1),
                  "detail": what})
      return
    self._skip_run.clear()
    self._count()
    if not s.pack or self._open_len + n > s.seq_len or self._open_img + m > s.image_slots:
      self._close_open()
    self._open.append(el)
    self._open_len += n
    self._open_img += m
    if not s.pack:
      self._close_open()

  def _skip(self, marker: dict) -> None:
    self._skipped.append(marker)
    self._skip_run[marker["skip"]] += 1
    self._dropped += 1
    n = self._spec.records_per_epoch
    if n and sum(self._skip_run.values()) >= n:
      reasons = ", ".join(f"{r} ×{c}" for r, c in self._skip_run.most_common())
      raise NoUsableRecordsError(f"all {n} records skipped: {reasons}; no batch can be formed — fix the data "
                                 f"(nextstep-jax data inspect shows why) or the config.data fields that reject it")
    self._count()

  def _count(self) -> None:
    """One more record read; after the first pass, warns once if most of it was skipped."""
    self._seen += 1
    n = self._spec.records_per_epoch
    if n and not self._rate_checked and self._seen >= n:
      self._rate_checked = True
      if self._dropped > HIGH_SKIP_RATE * self._seen:
        logger.warning("%d of the first %d records (%.0f %%) were skipped; check the data and config.data",
                       self._dropped, self._seen, 100 * self._dropped / self._seen)

  def __next__(self) -> dict[str, Any]:
    s = self._spec
    while len(self._ready) < s.batch_size and not self._exhausted:
      state = self._parent.get_state()
      try:
        el = next(self._parent)
      except StopIteration:
        self._exhausted = True
        self._close_open()
        break
      self._record_read(state)
      self._add(el)
    if self._exhausted and not self._ready:
      if not self._skipped:
        raise StopIteration
      batch, self._skipped = {"_skipped": self._skipped, "_empty": True}, []
      return batch  # finite data ending in skipped records: report them, no rows
    rows, self._ready = self._ready, []
    assert len(rows) <= s.batch_size, "at most one row closes per sample read"
    batch = assemble_batch(rows, s)  # fewer rows only at the end of finite data: padded with empty rows
    batch["_skipped"], self._skipped = self._skipped, []
    # Pending now: only the open row (its samples are the last ones read; a full batch is emitted as soon as the
    # sample that closed its last row was read, so that sample is the open row's first and only one).
    if self._open:
      assert len(self._open) == 1 and self._n_read >= 1
      self._anchor, self._n_read = self._last_state, 1
    else:
      self._n_read = 0
    return batch

  def _record_read(self, state: Any) -> None:
    if self._n_read == 0:
      self._anchor = state
    self._n_read += 1
    self._last_state = state

  def get_state(self) -> dict[str, Any]:
    if self._n_read == 0:
      return {"parent": self._parent.get_state(), "n_read": 0, "exhausted": self._exhausted}
    return {"parent": self._anchor, "n_read": self._n_read, "exhausted": self._exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset()
    self._exhausted = bool(state.get("exhausted", False))
    for _ in range(int(state["n_read"])):
      st = self._parent.get_state()
      el = next(self._parent)
      self._record_read(st)
      self._add(el)
    assert len(self._ready) < self._spec.batch_size, "replay completed a batch: inconsistent iterator state"

  def __str__(self) -> str:
    return f"PackBatchIterator({self._spec})"


def assemble_batch(rows: list[list[dict]], s: PackSpec) -> dict[str, np.ndarray]:
  """Rows of samples → the numpy batch dict (empty rows pad a short final batch)."""
  b, length = s.batch_size, s.seq_len
  input_ids = np.full((b, length), s.pad_id, np.int32)
  attention_mask = np.zeros((b, length), np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
  labels = np.full((b, length), IGNORE_INDEX, np.int32)
  if s.pixel_hw is None:
    image_tokens = np.zeros((b, s.image_slots, s.token_dim), np.float32)
    image_loss_mask = np.zeros((b, s.image_slots), np.float32)
  else:
    pixel_values = np.zeros((b, *s.pixel_hw, 3), np.float32)
    image_loss_mask = np.zeros((b, s.pixel_tokens), np.float32)
  token_grid = np.zeros(image_loss_mask.shape + (4,), np.int32)
  for r, samples in enumerate(rows):
    pos = tpos = 0
    for el in samples:
      ids = el["ids"]
      n, m = len(ids), len(el["tokens"])
      input_ids[r, pos:pos + n] = ids
      attention_mask[r, pos:pos + n] = 1
      labels[r, pos:pos + n] = ids
      if s.reset_positions:
        positions[r, pos:pos + n] = np.arange(n, dtype=np.int32)
      if s.pixel_hw is None:
        image_tokens[r, tpos:tpos + m] = el["tokens"]
        image_loss_mask[r, tpos:tpos + m] = el["token_loss"]
        token_grid[r, tpos:tpos + m] = el["token_grid"]
      elif "pixels" in el:
        pixel_values[r] = to_float(el["pixels"])
        image_loss_mask[r] = 1.0
        token_grid[r] = el["pixel_grid"]
      pos, tpos = pos + n, tpos + m
    if s.reset_positions:
      positions[r, pos:] = np.arange(length - pos, dtype=np.int32)
  out = dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions, labels=labels,
             image_token_grid=token_grid)
  if s.pixel_hw is None:
    out.update(image_tokens=image_tokens, image_loss_mask=image_loss_mask)
  else:
    out.update(pixel_values=pixel_values, image_loss_mask=image_loss_mask)
  return out
