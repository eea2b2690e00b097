"""The trainer's data iterator: the per-process pipeline (`pipeline.make_iterator`), or with
`config.data.elastic_resume` the global mixture stream that restores onto another process count (`elastic.py`)."""
from __future__ import annotations

from typing import Any

from nextstep_jax.data import pipeline
from nextstep_jax.data.elastic import make_elastic_iterator


def make_train_iterator(cfg: Any, process_index: int | None = None, process_count: int | None = None):
  """A checkpointable iterator of process-local numpy batches for `config.data` (either kind)."""
  cfg = pipeline.as_data_config(cfg)
  if cfg.elastic_resume:
    return make_elastic_iterator(cfg, *pipeline.process_layout(process_index, process_count))
  return pipeline.make_iterator(cfg, process_index, process_count)
