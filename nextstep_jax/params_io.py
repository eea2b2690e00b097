"""Params-only Orbax checkpoints — the format converters write, `train` exports, and `sample` loads.

A model directory holds `nextstep_config.json` (the `model` / `vae` config sections) and one Orbax pytree per
parameter set (`params/`, `vae_params/`). Writes stream: leaves are grouped into partial saves of at most
`group_bytes`, so host memory stays near one tensor rather than the model. Reads restore either the whole tree
onto given shardings or single leaves (for export), never more than asked.

Paths may be relative (resolved here). A complete parameter set gets a file manifest (sizes + CRC-32,
`file_manifest.py`); loads check it first (checksums up to a size limit; all of them if Orbax then fails), so a damaged
directory is reported in one line naming the file (`DamagedCheckpointError`), never as a TensorStore traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from nextstep_jax import file_manifest
from nextstep_jax.errors import DamagedCheckpointError
from nextstep_jax.paths import resolve_path

CONFIG_NAME = "nextstep_config.json"
_STATE = "state"  # the sub-directory Orbax v1 pytree saves use
MANIFEST = "nextstep_files.json"  # beside `state/` in a parameter set: sizes + CRC-32s of its files


class CheckpointNotFoundError(FileNotFoundError):
  """A model directory or one of its parameter sets is missing."""


def _state_dir(path: str | os.PathLike) -> Path:
  path = resolve_path(path)
  if (path / _STATE).is_dir():
    return path / _STATE
  raise CheckpointNotFoundError(f"no Orbax parameter checkpoint at {path}; convert or export a model there first "
                                f"(nextstep-jax convert … --dst DIR)")


def save_params_streaming(path: str | os.PathLike, leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
                          group_bytes: int = 256 << 20, overwrite: bool = False) -> int:
  """Writes (path tuple, array) pairs as one Orbax pytree, holding at most ~group_bytes (+ one leaf) at a time.

  The checkpoint appears at `path` only when complete (Orbax finalize renames a temporary directory).
  Returns the number of bytes written.
  """
  from orbax.checkpoint.experimental import v1 as ocp_v1

  path = resolve_path(path)
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} already exists; choose a new destination or remove it")
    shutil.rmtree(path)
  group: dict[tuple[str, ...], np.ndarray] = {}
  size = total = 0
  started = False

  def flush():
    nonlocal group, size, started
    if group:
      ocp_v1.partial.save(path, traverse_util.unflatten_dict(group))
      started = True
    group, size = {}, 0

  for key, value in leaves:
    group[tuple(key)] = value
    size += value.nbytes
    total += value.nbytes
    del value
    if size >= group_bytes:
      flush()  # before the next leaf is produced, so at most one group is alive
  flush()
  if not started:
    raise ValueError(f"nothing to save at {path}")
  ocp_v1.partial.finalize(path)
  file_manifest.write(path / MANIFEST, path, skip=(MANIFEST,))
  return total


@contextlib.contextmanager
def checked_read(path: str | os.PathLike, checksums: bool | None = None):
  """Reads of the parameter set at `path`: damaged files (per its manifest) → DamagedCheckpointError, one line.
  `checksums`: compare contents before reading (None: up to file_manifest's size limit; always after a failure)."""
  path = resolve_path(path)
  manifest = file_manifest.read(path / MANIFEST)
  files = manifest["files"] if manifest else None
  fix = "re-convert or re-export it (or copy it again)"
  if files is not None and (bad := file_manifest.verify(path, files, checksums)):
    raise DamagedCheckpointError(f"damaged parameter set {path}: {bad}; {fix}")
  try:
    yield path
  except (CheckpointNotFoundError, DamagedCheckpointError):
    raise
  except Exception as e:
    bad = file_manifest.verify(path, files, checksums=True) if files is not None else None
    if bad:
      raise DamagedCheckpointError(f"damaged parameter set {path}: {bad}; {fix}") from None
    if files is None and _looks_damaged(e):
      first = " ".join(str(e).split())[:300]
      raise DamagedCheckpointError(f"could not read parameter set {path} ({first}); {fix}") from None
    raise


def _looks_damaged(e: BaseException) -> bool:
  text = str(e)
  return any(k in text for k in ("DATA_LOSS", "Error reading", "Error opening", "checksum", "corrupt",
                                 "Unexpected end", "Failed to decode", "NOT_FOUND", "OUT_OF_RANGE"))


def save_params(path: str | os.PathLike, params: Any, overwrite: bool = True) -> None:
  """Saves a whole (possibly sharded) params tree. One process: leaves are fetched to host one group at a time.
  A multi-host job: a collective Orbax save (every process must call it; each writes its own shards)."""
  if jax.process_count() == 1:
    flat = traverse_util.flatten_dict(params)
    save_params_streaming(path, ((k, np.asarray(jax.device_get(v))) for k, v in flat.items()), overwrite=overwrite)
    return
  from orbax.checkpoint.experimental import v1 as ocp_v1
  path = resolve_path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; choose a new destination or remove it")
  ocp_v1.save_pytree(path, params, overwrite=overwrite)


def param_metadata(path: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
  """Flat {path tuple: (shape, dtype)} read from the checkpoint's metadata (no tensor data)."""
  with checked_read(path, checksums=False) as path:
    return _metadata(_state_dir(path))


def _metadata(state: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
  md = ocp.PyTreeCheckpointer().metadata(state)
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  flat = traverse_util.flatten_dict(tree, is_leaf=lambda _, v: hasattr(v, "shape") and hasattr(v, "dtype"))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
  """Restores a params tree. `target`: tree of `jax.ShapeDtypeStruct`s carrying shardings (restored as
  sharded jax.Arrays, dtypes cast), or None for host numpy arrays in their stored dtypes."""
  with checked_read(path) as path:
    state = _state_dir(path)
    if target is not None:
      return ocp.StandardCheckpointer().restore(state, target)
    meta = _metadata(state)
    item = traverse_util.unflatten_dict({k: 0 for k in meta})
    restore_args = traverse_util.unflatten_dict({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in meta})
    return ocp.PyTreeCheckpointer().restore(state, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))


def load_leaf(path: str | os.PathLike, key: tuple[str, ...]) -> np.ndarray:
  """Reads a single parameter (host numpy) without touching the others."""
  item = traverse_util.unflatten_dict({tuple(key): 0})
  args = traverse_util.unflatten_dict({tuple(key): ocp.RestoreArgs(restore_type=np.ndarray)})
  with checked_read(path, checksums=False) as path:  # called once per leaf: sizes only up front
    out = ocp.PyTreeCheckpointer().restore(_state_dir(path), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  return traverse_util.flatten_dict(out)[tuple(key)]


def write_model_config(model_dir: str | os.PathLike, sections: dict[str, Any]) -> None:
  """Writes/updates `nextstep_config.json` ({"model": {...}, "vae": {...}, ...}); given sections replace existing
  ones, others are kept. Dataclasses are converted."""
  model_dir = resolve_path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  existing = read_model_config(model_dir) if (model_dir / CONFIG_NAME).is_file() else {}
  plain = dict(existing, **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                            for k, v in sections.items()})
  tmp = model_dir / (CONFIG_NAME + ".tmp")
  tmp.write_text(json.dumps(plain, indent=2, sort_keys=True))
  os.replace(tmp, model_dir / CONFIG_NAME)


def read_model_config(model_dir: str | os.PathLike) -> dict[str, Any]:
  f = resolve_path(model_dir) / CONFIG_NAME
  if not f.is_file():
    raise CheckpointNotFoundError(f"{model_dir} is not a nextstep_jax model directory (no {CONFIG_NAME}); "
                                  f"pass the --dst of a conversion or a training export")
  return json.loads(f.read_text())
