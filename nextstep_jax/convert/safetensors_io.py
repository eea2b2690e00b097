"""Lazy safetensors I/O with numpy only: one tensor in memory at a time, sharded output with an index."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsReader:
  """Reads tensors by name from a file, a folder of `*.safetensors`, or a folder with an index json.

  Shapes and dtypes come from headers; `get` reads exactly one tensor (bf16 arrives as ml_dtypes.bfloat16).
  """

  def __init__(self, path: str | os.PathLike, prefix: str = ""):
    path = Path(path)
    if path.is_file():
      files = [path]
    elif (path / INDEX_NAME).is_file():
      weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
      files = sorted({path / f for f in weight_map.values()})
    elif path.is_dir():
      files = sorted(path.glob(f"{prefix}*.safetensors"))
    else:
      files = []
    if not files:
      raise FileNotFoundError(f"no safetensors weights at {path}; expected a .safetensors file or a folder with "
                              f"{prefix or ''}*.safetensors (and optionally {INDEX_NAME})")
    self._where: dict[str, Path] = {}
    self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
      try:
        with safe_open(f, framework="np") as h:
          for k in h.keys():
            sl = h.get_slice(k)
            self._where[k] = f
            self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read safetensors file {f}: {e}; the file is corrupt or not safetensors") from None

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return self._meta[key][0]

  def dtype(self, key: str) -> str:
    return self._meta[key][1]

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor. The file is opened per read so its memory map (and the resident pages it pulled in)
    is released at once: host memory stays at about one tensor even for multi-GB shards."""
    with safe_open(self._where[key], framework="np") as h:
      return h.get_tensor(key)


class SafetensorsWriter:
  """Writes tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` + an index.

  Holds at most one shard's tensors in memory. With a single shard the file is `model.safetensors`.
  """

  def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 4 << 30, single_name: str = "model.safetensors"):
    self.out_dir = Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.max_shard_bytes = max_shard_bytes
    self.single_name = single_name
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    self._total = 0

  def add(self, key: str, value: np.ndarray) -> None:
    if self._pending and self._pending_bytes + value.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[key] = np.ascontiguousarray(value)
    self._pending_bytes += value.nbytes
    self._total += value.nbytes

  def _flush(self) -> None:
    idx = len(self._shards)
    save_file(self._pending, str(self.out_dir / f"_shard{idx}.tmp"), metadata={"format": "pt"})
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[Path]:
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    names = [self.single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
      os.replace(self.out_dir / f"_shard{i}.tmp", self.out_dir / name)
    if n > 1:
      index = {"metadata": {"total_size": self._total},
               "weight_map": {k: names[i] for i, keys in enumerate(self._shards) for k in keys}}
      (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [self.out_dir / n for n in names]


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple[str, np.ndarray]]:
  for k in reader.keys():
    yield k, reader.get(k)
