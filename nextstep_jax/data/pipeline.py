"""Grain input pipeline: TFDS ArrayRecord sources → shuffled, process-sharded, mixed samples → packed batches.

Per source (`config.data.sources[i]`):
  TfdsSource ─map_with_index (record index)─ [process_index::process_count] (disjoint shards covering the data)
  ─shuffle(seed_i) ─repeat (reshuffled every epoch) ─random_map(ToSample: tokenise + official sequence format)
Then: MapDataset.mix(sources, weights) ─to_iter_dataset (reader threads) ─PackBatchIterDataset (pack + batch)
─mp_prefetch (optional worker processes) ─DataIterator (skip warnings + counts, checkpointable).

Usage (trainer):

  from nextstep_jax.data import pipeline
  it = pipeline.make_iterator(config.data)              # process-local batches (numpy dicts, packing.py)
  batch = pipeline.to_global(next(it), mesh)            # global jax.Arrays, batch axis over ("data", "fsdp")
  it.stats()                                            # {"skipped_total": n, "skipped/too_small": n, ...}

Checkpointing with Orbax (the DataIterator is a grain DatasetIterator, so Grain's Orbax handler saves it as
`process_<i>-of-<n>.json` beside the train state; every process saves and restores its own state):

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(workdir, item_names=("state", "data"))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  it = pipeline.make_iterator(config.data)              # fresh iterator, same config and process layout
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=grain.checkpoint.CheckpointRestore(it)))
  # `it` now continues exactly where the saved one was (restored["data"] is `it`).

Without Orbax: `s = it.get_state()` (JSON-serialisable dict) and `it.set_state(s)` on a fresh iterator.
The state depends on the process layout and `num_workers`; restore with the same values.

Worker processes (num_workers > 0): Grain starts them by *spawn* (the main module is re-imported in each worker;
~5 s start-up) and, when absl is installed, needs absl flags parsed — `make_dataset` marks them parsed.
Call `it.close()` (or let the iterator be garbage collected) to stop the workers.
"""
from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from nextstep_jax.config import ConfigError
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.builders import DatasetError, TfdsSource
from nextstep_jax.data.config import DataConfig, validate_data_config
from nextstep_jax.data.packing import PackBatchIterDataset, PackSpec
from nextstep_jax.data.records import SKIP_REASONS
from nextstep_jax.data.samples import ToSample, record_name, tag_index
from nextstep_jax.sharding import logical_to_spec
from nextstep_jax.tokens import load_tokenizer

logger = logging.getLogger("nextstep_jax.data")
BATCH_KEYS_LATENT = ("input_ids", "attention_mask", "positions", "labels", "image_tokens", "image_loss_mask",
                     "image_token_grid")
BATCH_KEYS_PIXELS = ("input_ids", "attention_mask", "positions", "labels", "pixel_values", "image_loss_mask",
                     "image_token_grid")


def as_data_config(cfg: Any) -> DataConfig:
  return cfg if isinstance(cfg, DataConfig) else validate_data_config(cfg)


def process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return process_index, process_count


def derive_seed(base: int, *salt: int) -> int:
  return int(np.random.SeedSequence([base, *salt]).generate_state(1)[0])


def open_sources(cfg: Any) -> list[TfdsSource]:
  """Opens every source and checks its kind and storage against the config (clear errors)."""
  cfg = as_data_config(cfg)
  out = []
  for spec in cfg.sources:
    src = TfdsSource(spec.path)
    where = f"config.data.sources[{spec.name}] ({src.path})"
    if spec.kind and spec.kind != src.kind:
      raise DatasetError(f"{where} is a {src.kind} dataset ({src.name}) but kind={spec.kind!r}; fix kind or path")
    if len(src) == 0:
      raise DatasetError(f"{where} is empty")
    if cfg.encode_on_the_fly:
      if src.kind in ("edit", "interleave") or src.storage == "latents":
        raise DatasetError(f"{where}: encode_on_the_fly=True reads raw-image text-to-image (and text) datasets "
                           f"only; got {src.name}. Use latent caches with encode_on_the_fly=False")
    elif src.storage == "pixels":
      raise DatasetError(f"{where} stores raw images; cache latents first (nextstep-jax data encode --src "
                         f"{src.path} --dst DIR --vae MODEL_DIR) or set config.data.encode_on_the_fly=True")
    out.append(src)
  return out


def pack_spec(cfg: Any, batch_size: int, pad_id: int, placeholder_id: int, records_per_epoch: int = 0) -> PackSpec:
  cfg = as_data_config(cfg)
  pixel_hw = pixel_tokens = None
  if cfg.encode_on_the_fly:
    (h, w), = cfg.grids
    pixel_hw, pixel_tokens = (h * cfg.down_factor, w * cfg.down_factor), h * w
  return PackSpec(batch_size=batch_size, seq_len=cfg.seq_len, image_slots=cfg.image_slots, token_dim=cfg.token_dim,
                  pad_id=pad_id, placeholder_id=placeholder_id, pack=cfg.pack,
                  reset_positions=cfg.reset_positions_per_sample, pixel_hw=pixel_hw, pixel_tokens=pixel_tokens or 0,
                  on_too_long=cfg.on_too_long, records_per_epoch=records_per_epoch)


def sample_dataset(cfg: Any, process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
  """The mixed, shuffled, process-sharded MapDataset of samples / skip markers (before packing)."""
  cfg = as_data_config(cfg)
  process_index, process_count = process_layout(process_index, process_count)
  datasets = []
  for i, (spec, src) in enumerate(zip(cfg.sources, open_sources(cfg))):
    ds = grain.MapDataset.source(src).map_with_index(tag_index)
    ds = ds[process_index::process_count]
    if len(ds) == 0:
      raise DatasetError(f"source {spec.name} has {len(src)} records, fewer than the {process_count} processes")
    ds = ds.shuffle(seed=derive_seed(cfg.seed, i, 0)).repeat(cfg.num_epochs or None)
    transform = ToSample(source=spec.name, kind=src.kind, storage=src.storage, tokenizer=cfg.tokenizer,
                         token_dim=cfg.token_dim, seq_len=cfg.seq_len, drop_text_prob=cfg.drop_text_prob,
                         edit_drops=cfg.edit_drops, grids=cfg.grids, down_factor=cfg.down_factor,
                         min_size_ratio=cfg.min_size_ratio)
    datasets.append(ds.random_map(transform, seed=derive_seed(cfg.seed, i, 1)))
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.mix(datasets, [s.weight for s in cfg.sources])


def make_dataset(cfg: Any, process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """The full Grain IterDataset of packed process-local batches (iterate it, or use `make_iterator`)."""
  cfg = as_data_config(cfg)
  process_index, process_count = process_layout(process_index, process_count)
  tok = load_tokenizer(cfg.tokenizer)
  ds = sample_dataset(cfg, process_index, process_count).to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
  ds = PackBatchIterDataset(ds, pack_spec(cfg, cfg.local_batch_size(process_count), tok.pad_id,
                                          tok.image_placeholder_id, _records_per_pass(cfg, process_count)))
  if cfg.num_workers > 0:
    mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  return ds


def _records_per_pass(cfg: DataConfig, process_count: int) -> int:
  """Records of one pass over this process's shards of every source (the fail-fast threshold of the packer)."""
  return sum(-(-len(TfdsSource(spec.path)) // process_count) for spec in cfg.sources)


def make_iterator(cfg: Any, process_index: int | None = None, process_count: int | None = None) -> "DataIterator":
  """A checkpointable iterator of process-local numpy batches (see the module docstring); with
  `elastic_resume`, use `data.iterator.make_train_iterator` (the elastic mixture builds on this module)."""
  cfg = as_data_config(cfg)
  if cfg.elastic_resume:
    raise ConfigError("config.data.elastic_resume=True needs nextstep_jax.data.iterator.make_train_iterator "
                      "(the trainer's entry point), not pipeline.make_iterator")
  return DataIterator(iter(make_dataset(cfg, process_index, process_count)), cfg.max_warnings_per_reason)


def mark_absl_flags_parsed() -> None:
  try:
    from absl import flags
  except ImportError:
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DataIterator(grain.DatasetIterator):
  """Main-process end of the pipeline: strips skip markers (warning + count each) and yields numpy batches.

  `get_state()/set_state()` include the skip counters, so `stats()` continues across a restore.
  """

  def __init__(self, parent: grain.DatasetIterator, max_warnings_per_reason: int = 100):
    super().__init__(parent)
    self._max_warnings = max_warnings_per_reason
    self._counts: dict[str, int] = {}
    self._batches = 0

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      batch = next(self._parent)
      for marker in batch.pop("_skipped"):
        self._note(marker)
      if not batch.pop("_empty", False):
        self._batches += 1
        return batch

  def _note(self, marker: dict) -> None:
    reason = marker["skip"]
    for key in ("skipped_total", f"skipped/{reason}", f"skipped/{marker['source']}/{reason}"):
      self._counts[key] = self._counts.get(key, 0) + 1
    n = self._counts[f"skipped/{reason}"]
    if not self._max_warnings or n <= self._max_warnings:
      logger.warning("skipping record %s: %s (%s)%s", record_name(marker), SKIP_REASONS.get(reason, reason),
                     marker.get("detail", ""),
                     f"; further '{reason}' warnings suppressed (still counted)" if n == self._max_warnings else "")

  def stats(self) -> dict[str, int]:
    """Counters for metrics: batches, skipped_total, skipped/<reason>, skipped/<source>/<reason>."""
    return {"batches": self._batches, "skipped_total": 0, **self._counts}

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "skipped": dict(self._counts), "batches": self._batches}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._counts = {k: int(v) for k, v in state.get("skipped", {}).items()}
    self._batches = int(state.get("batches", 0))

  def __str__(self) -> str:
    return "DataIterator"


# ----------------------------------------------------------------------------------------------- global arrays


def _names(ndim: int) -> tuple:
  return ("act_batch", "act_len", *([None] * (ndim - 2))) if ndim >= 2 else ("act_batch",)


def batch_shardings(global_shapes: dict[str, tuple[int, ...]], mesh) -> dict[str, Any]:
  """NamedSharding per batch key: batch axis by the "act_batch" rule (("data","fsdp")), the rest replicated."""
  return {k: NamedSharding(mesh, logical_to_spec(_names(len(s)), s, mesh)) for k, s in global_shapes.items()}


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
  """Process-local numpy batch → global jax.Arrays (`jax.make_array_from_process_local_data`)."""
  n = jax.process_count()
  shapes = {k: (v.shape[0] * n, *v.shape[1:]) for k, v in batch.items()}
  shardings = batch_shardings(shapes, mesh)
  return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k]) for k, v in batch.items()}


def batch_shapes(data: Any, step_input: bool = False) -> dict[str, Any]:
  """Global `jax.ShapeDtypeStruct`s of one batch of `config.data` (for AOT compilation / abstract train steps);
  reads only the shape fields, so configs without datasets (synthetic data) work. `step_input`: as the train step
  sees it — with encode_on_the_fly the VAE has already turned `pixel_values` into `image_tokens`."""
  d = data
  b, length = int(d.global_batch_size), int(d.seq_len)
  out = {k: jax.ShapeDtypeStruct((b, length), np.int32) for k in BATCH_KEYS_LATENT[:4]}
  if d.get("encode_on_the_fly", False):
    (h, w), = bucket_grids(d.resolution, d.down_factor, "fixed")
    slots = h * w
    if not step_input:
      out["pixel_values"] = jax.ShapeDtypeStruct((b, h * d.down_factor, w * d.down_factor, 3), np.float32)
  else:
    slots = int(d.max_image_tokens or length)
  if "pixel_values" not in out:
    out["image_tokens"] = jax.ShapeDtypeStruct((b, slots, int(d.token_dim)), np.float32)
  out["image_loss_mask"] = jax.ShapeDtypeStruct((b, slots), np.float32)
  out["image_token_grid"] = jax.ShapeDtypeStruct((b, slots, 4), np.int32)
  return out
