"""Preference data: (prompt, chosen image, rejected image) triplets as a TFDS ArrayRecord dataset, and the Grain
pipeline that turns them into DPO batches.

Dataset `ns_prefs` (one record per pair; written by `apps/preference_pairs.py`, i.e. `nextstep-jax data prefs`):
  prompt (text), chosen / rejected (PNG or original encoded bytes, for looking at), chosen_tokens /
  rejected_tokens (n, D) float32 (normalised, patchified VAE latents — or the sampled tokens — of a shared token
  grid), grid (2,) int32, chosen_score / rejected_score float32, meta (json).

Pipeline (`make_pref_iterator(config.data)`): per source PrefSource ─map_with_index─ [process shard] ─shuffle
─repeat ─map(ToPair) then mix ─to_iter_dataset ─PairBatchIterDataset ─DataIterator (skip warnings + counts,
checkpointable). One pair per row, never packed: the row is the t2i training sequence `caption + I(h,w) + eos`
(no text dropping), padded to seq_len. Batch = the t2i contract with the chosen tokens as `image_tokens`, plus
`rejected_image_tokens` (B, T, D) in the same slots.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import grain
import numpy as np
import tensorflow_datasets as tfds

from nextstep_jax.data.builders import (SPLIT, VERSION, DatasetError, TfdsSource, bytes_feature, grid_feature, NsBuilder,
                                        tokens_feature, resolve_dataset_dir)
from nextstep_jax.data.config import validate_data_config
from nextstep_jax.data.packing import PackSpec, REJECTED, assemble_batch
from nextstep_jax.data.pipeline import DataIterator, derive_seed, mark_absl_flags_parsed
from nextstep_jax.data.records import BadRecord
from nextstep_jax.data.samples import clean_text, record_tokens, tag_index
from nextstep_jax.models.image_grid import grid_slots
from nextstep_jax.tokens import load_tokenizer

PREFS = "ns_prefs"


class NsPrefs(NsBuilder):
  """Preference pairs: prompt, chosen and rejected images (bytes + VAE tokens of a shared grid), their scores."""

  def _features(self):
    score = tfds.features.Tensor(shape=(), dtype=np.float32)
    return dict(prompt=tfds.features.Text(), chosen=bytes_feature(), rejected=bytes_feature(),
                chosen_tokens=tokens_feature(), rejected_tokens=tokens_feature(), grid=grid_feature(), chosen_score=score,
                rejected_score=score, meta=tfds.features.Text())


def write_prefs(dst: str | os.PathLike, examples: Callable[[], Iterable[tuple[Any, dict]]],
                overwrite: bool = False) -> str:
  """Writes pair examples (key, feature dict) as an `ns_prefs` dataset under dst; returns its version dir."""
  out = Path(dst) / PREFS / VERSION
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --dst")
    shutil.rmtree(out)
  NsPrefs(examples=examples, data_dir=str(dst), file_format="array_record").download_and_prepare()
  return str(out)


class PrefSource(TfdsSource):
  """Random-access, picklable view of an `ns_prefs` dataset (TfdsSource knows only the pre-training kinds)."""

  def __init__(self, path: str | os.PathLike):  # pylint: disable=super-init-not-called
    self.path = str(resolve_dataset_dir(path))
    info = json.loads((Path(self.path) / "dataset_info.json").read_text())
    self.name = info["name"]
    if self.name != PREFS:
      raise DatasetError(f"{self.path} is a {self.name!r} dataset, not preference pairs ({PREFS}); make one with "
                         f"`nextstep-jax data prefs`")
    lengths = {s["name"]: s.get("shardLengths", []) for s in info.get("splits", [])}
    self._len = sum(int(n) for n in lengths.get(SPLIT, []))
    self.__setstate__({})

  kind = "prefs"
  storage = "latents"


@dataclasses.dataclass(frozen=True)
class ToPair:
  """Grain map: (index, record) → {ids, tokens, rejected, token_loss, source, index} or a skip marker."""
  source: str
  tokenizer: str
  token_dim: int = 64

  def __call__(self, item: tuple[int, dict]) -> dict:
    index, record = item
    try:
      prompt = clean_text(record["prompt"], "prompt")
      chosen, grid = record_tokens(record, "chosen_tokens", "grid", self.token_dim)
      rejected, _ = record_tokens(record, "rejected_tokens", "grid", self.token_dim)
    except BadRecord as e:
      return {"skip": e.reason, "source": self.source, "index": int(index), "detail": e.detail}
    ids = load_tokenizer(self.tokenizer).t2i_training_sequence(prompt, *grid)
    return {"ids": np.asarray(ids, np.int32), "tokens": chosen, "rejected": rejected,
            "token_loss": np.ones((len(chosen),), np.float32), "token_grid": grid_slots(*grid),
            "source": self.source, "index": int(index)}


class PairBatchIterDataset(grain.IterDataset):
  """Pairs / skip markers → numpy batches of `spec.batch_size` rows (one pair per row; see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec

  def __iter__(self) -> "PairBatchIterator":
    return PairBatchIterator(self._parent.__iter__(), self._spec)


class PairBatchIterator(grain.DatasetIterator):
  """A batch is emitted as soon as its last row is read, so between batches nothing is pending and the state is
  the parent's."""

  def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec

  def __next__(self) -> dict[str, Any]:
    s = self._spec
    rows, skipped = [], []
    while len(rows) < s.batch_size:
      try:
        el = next(self._parent)
      except StopIteration:
        break
      if "skip" not in el and (len(el["ids"]) > s.seq_len or len(el["tokens"]) > s.image_slots):
        el = {"skip": "too_long", "source": el["source"], "index": el["index"],
              "detail": f"{len(el['ids'])} tokens / {len(el['tokens'])} image tokens; a row holds {s.seq_len} / "
                        f"{s.image_slots}"}
      (skipped if "skip" in el else rows).append(el)
    if not rows:
      if not skipped:
        raise StopIteration
      return {"_skipped": skipped, "_empty": True}
    batch = assemble_batch([[el] for el in rows], s)  # a short final batch is padded with empty rows
    batch[REJECTED] = np.zeros_like(batch["image_tokens"])
    for r, el in enumerate(rows):
      batch[REJECTED][r, :len(el["rejected"])] = el["rejected"]
    batch["_skipped"] = skipped
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])


def make_pref_iterator(data: Any, process_index: int = 0, process_count: int = 1):
  """Checkpointable iterator of process-local DPO batches from `config.data` (sources = `ns_prefs` datasets;
  fields used: sources, tokenizer, token_dim, seq_len, max_image_tokens, seed, num_epochs, global_batch_size,
  read_threads, read_buffer_size, num_workers, worker_buffer_size, max_warnings_per_reason)."""
  cfg = validate_data_config(data)
  tok = load_tokenizer(cfg.tokenizer)
  datasets = []
  for i, spec in enumerate(cfg.sources):
    ds = grain.MapDataset.source(PrefSource(spec.path)).map_with_index(tag_index)[process_index::process_count]
    if len(ds) == 0:
      raise DatasetError(f"preference source {spec.name} has fewer records than the {process_count} processes")
    ds = ds.shuffle(seed=derive_seed(cfg.seed, i, 0)).repeat(cfg.num_epochs or None)
    datasets.append(ds.map(ToPair(spec.name, cfg.tokenizer, cfg.token_dim)))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, [s.weight for s in cfg.sources])
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
  ds = PairBatchIterDataset(ds, PackSpec(batch_size=cfg.local_batch_size(process_count), seq_len=cfg.seq_len,
                                         image_slots=cfg.image_slots, token_dim=cfg.token_dim, pad_id=tok.pad_id,
                                         placeholder_id=tok.image_placeholder_id, pack=False))
  if cfg.num_workers > 0:
    mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  return DataIterator(iter(ds), cfg.max_warnings_per_reason)
