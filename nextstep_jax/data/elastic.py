"""Mixture state that survives a change of the number of training processes (`config.data.elastic_resume`).

The weighted mixture is one *global* stream: every source shuffled and repeated over all its records, mixed by
weight (`pipeline.sample_dataset(cfg, 0, 1)`; element g's source, record and random draws depend only on g).
Process r of n reads the global indices g ≥ start, g ≡ r (mod n), minus a small `excluded` set, in order, and
packs/batches them as usual. Its checkpointed position is how many of those it has consumed (samples still in
an open packing row are not consumed: they are read again after a restore).

Restoring on the same process layout continues exactly (the saved Grain state). Restoring on a different one
reads every process's saved state and turns them into one global resume point: start' = the smallest next
unconsumed index over the old processes (everything before it is consumed), excluded' = the indices ≥ start'
some old process already consumed. The new processes then read {g ≥ start', g ∉ excluded'} split by their own
residue classes: no sample is repeated and none skipped. Skip counters are summed into the new process 0.

Checkpointing: `CheckpointSave(it)` / `CheckpointRestore(it)` (an Orbax handler like Grain's, writing the same
`process_<i>-of-<n>.json` files, whose restore reads all of them).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import orbax.checkpoint as ocp

from nextstep_jax.config import ConfigError
from nextstep_jax.data import pipeline
from nextstep_jax.data.config import DataConfig
from nextstep_jax.data.packing import PackBatchIterDataset
from nextstep_jax.tokens import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which global indices process r of n reads, in order."""
  rank: int
  count: int
  start: int = 0
  excluded: tuple[int, ...] = ()  # sorted, all ≥ start

  @property
  def _first(self) -> int:
    return self.start + (self.rank - self.start) % self.count

  def _skipped_positions(self) -> list[int]:
    b = self._first
    return [(e - b) // self.count for e in self.excluded if e >= b and (e - b) % self.count == 0]

  def index(self, k: int) -> int:
    """The global index of this process's k-th element."""
    j = k
    for p in self._skipped_positions():
      if p <= j:
        j += 1
      else:
        break
    return self._first + j * self.count

  def length(self, total: int) -> int:
    """How many elements of a global stream of `total` elements this process reads."""
    if total <= self._first:
      return 0
    n = (total - 1 - self._first) // self.count + 1
    return n - sum(1 for p in self._skipped_positions() if p < n)

  def consumed(self, k: int) -> list[int]:
    """Global indices ≥ start of this process's first k elements."""
    return [self.index(i) for i in range(k)]


class ScheduledView(grain.MapDataset):
  """The elements of `parent` (the global stream) that a Schedule gives to one process, in order."""

  def __init__(self, parent: grain.MapDataset, schedule: Schedule):
    super().__init__(parent)
    self._schedule = schedule
    self._len = schedule.length(len(parent))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    return self._parent[self._schedule.index(int(k))]

  def __str__(self) -> str:
    return f"ScheduledView({self._schedule})"


def resume_point(states: list[dict]) -> dict:
  """Every process's saved state (one layout) → the global resume point {start, excluded, skipped}."""
  nexts, consumed, skipped = [], set(), {}
  for st in states:
    sched = Schedule(**st["schedule"])
    k = st["consumed"]
    nexts.append(sched.index(k))
    consumed.update(sched.consumed(k))
    consumed.update(sched.excluded)
    for key, v in st["inner"].get("skipped", {}).items():
      skipped[key] = skipped.get(key, 0) + int(v)
  start = min(nexts)
  return {"start": start, "excluded": sorted(g for g in consumed if g >= start), "skipped": skipped,
          "batches": max(int(st["inner"].get("batches", 0)) for st in states)}


class ElasticIterator(grain.DatasetIterator):
  """Process-local batches of the global mixture; `get_state` names its schedule and consumed count."""

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int, schedule: Schedule | None = None):
    if cfg.num_workers:
      raise ConfigError(f"config.data.elastic_resume=True needs num_workers=0 (got {cfg.num_workers}); its "
                        f"reader threads (read_threads) still run in parallel")
    self._cfg, self._rank, self._count = cfg, process_index, process_count
    self._build(schedule or Schedule(process_index, process_count))

  def _build(self, schedule: Schedule) -> None:
    cfg = self._cfg
    tok = load_tokenizer(cfg.tokenizer)
    self._schedule = schedule
    samples = ScheduledView(pipeline.sample_dataset(cfg, 0, 1), schedule).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
    ds = PackBatchIterDataset(samples, pipeline.pack_spec(cfg, cfg.local_batch_size(self._count), tok.pad_id,
                                                          tok.image_placeholder_id))
    self._inner = pipeline.DataIterator(iter(ds), cfg.max_warnings_per_reason)
    super().__init__(self._inner)

  def __next__(self):
    return next(self._inner)

  def stats(self) -> dict[str, int]:
    return self._inner.stats()

  def get_state(self) -> dict[str, Any]:
    inner = self._inner.get_state()
    return {"schedule": dataclasses.asdict(self._schedule), "consumed": int(inner["pipeline"]["parent"]["next_index"]),
            "inner": inner}

  def set_state(self, state: dict[str, Any]) -> None:
    """A state saved by this process under the same layout, or a `resume_point` (any layout)."""
    if "schedule" in state:
      sched = Schedule(**{k: tuple(v) if k == "excluded" else v for k, v in state["schedule"].items()})
      if (sched.rank, sched.count) != (self._rank, self._count):
        raise ValueError(f"state of process {sched.rank}/{sched.count} given to process {self._rank}/{self._count};"
                         f" combine all processes' states with resume_point()")
      self._build(sched)
      self._inner.set_state(state["inner"])
      return
    self._build(Schedule(self._rank, self._count, int(state["start"]), tuple(int(g) for g in state["excluded"])))
    self._inner.set_state({"pipeline": self._inner.get_state()["pipeline"],
                           "skipped": state["skipped"] if self._rank == 0 else {}, "batches": state["batches"]})

  def close(self) -> None:
    pass

  def __str__(self) -> str:
    return f"ElasticIterator({self._schedule})"


def restore_from_files(texts: dict[tuple[int, int], str], it: ElasticIterator) -> None:
  """{(process index, count): saved JSON} of one checkpoint → `it` positioned for its own layout."""
  counts = {n for _, n in texts}
  if len(counts) != 1:
    raise ValueError(f"data checkpoint mixes process layouts {sorted(counts)}")
  n, = counts
  if sorted(i for i, _ in texts) != list(range(n)):
    raise ValueError(f"data checkpoint lacks some of the {n} process states (has {sorted(i for i, _ in texts)})")
  own = texts.get((it._rank, it._count))  # noqa: SLF001
  if own is not None and n == it._count:  # noqa: SLF001
    it.set_state(json.loads(own))
  else:
    it.set_state(resume_point([json.loads(texts[(i, n)]) for i in range(n)]))


class ElasticCheckpointHandler(grain.checkpoint.CheckpointHandler):
  """Grain's Orbax handler (same files); restore reads every process's file, so the layout may change."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    texts = {}
    for f in directory.iterdir():
      m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
      if m:
        texts[(int(m.group(1)), int(m.group(2)))] = f.read_text()
    if not texts:
      raise ValueError(f"{directory} holds no process_<i>-of-<n>.json data states")
    restore_from_files(texts, item)
    return item


@ocp.args.register_with_handler(ElasticCheckpointHandler, for_save=True)
@dataclasses.dataclass
class CheckpointSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ElasticCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class CheckpointRestore(ocp.args.CheckpointArgs):
  item: Any


def make_elastic_iterator(cfg: DataConfig, process_index: int, process_count: int) -> ElasticIterator:
  return ElasticIterator(cfg, process_index, process_count)
