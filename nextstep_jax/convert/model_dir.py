"""Shared import/export between a table + safetensors on one side and our model directory on the other."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from nextstep_jax import params_io
from nextstep_jax.config import ModelConfig
from nextstep_jax.convert import quantized
from nextstep_jax.convert.safetensors_io import SafetensorsReader, SafetensorsWriter
from nextstep_jax.convert.table import Rule, check, export_tensors, import_leaves, parse_dtype

ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def import_checkpoint(reader: SafetensorsReader, rules: Sequence[Rule], shapes: dict, dst: Path, cfg: ModelConfig,
                      source: dict, *, dtype: str | None, ignore: Sequence[str] = (), what: str,
                      overwrite: bool = False) -> None:
  """Checks the whole table against the source headers, then streams leaves into DST/params (Orbax) and writes
  the model and source sections of nextstep_config.json."""
  check(rules, reader.keys(), reader.shape, shapes, ignore=ignore, what=what)
  params_io.save_params_streaming(dst / "params", import_leaves(rules, reader.get, shapes, parse_dtype(dtype)),
                                  overwrite=overwrite)
  params_io.write_model_config(dst, {"model": cfg, "source": dict(source, dtype=reader.dtype(rules[0].keys()[0]))})


def export_checkpoint(model_dir: Path, dst: Path, rules_fn: Callable[[ModelConfig], Sequence[Rule]],
                      dtype: str | None, max_shard_bytes: int,
                      extra: Callable[[ModelConfig, dict, np.dtype | None], Iterable[tuple[str, np.ndarray]]] = None
                      ) -> tuple[ModelConfig, dict, str, list[Path]]:
  """Model dir → safetensors shards, one parameter in memory at a time. Returns (cfg, meta, dtype name, files);
  the dtype defaults to the one the model was converted from."""
  meta = params_io.read_model_config(model_dir)
  cfg = ModelConfig.from_dict(meta["model"])
  dtype = dtype or ST_DTYPES.get(meta.get("source", {}).get("dtype", ""), None)
  np_dtype = parse_dtype(dtype)
  writer = SafetensorsWriter(dst, max_shard_bytes)
  load = quantized.leaf_loader(model_dir / "params")  # int8 directories export float kernels
  for key, tensor in export_tensors(rules_fn(cfg), load, np_dtype):
    writer.add(key, tensor)
  for key, tensor in (extra(cfg, meta, np_dtype) if extra else ()):
    writer.add(key, tensor)
  return cfg, meta, dtype or "float32", writer.close()
