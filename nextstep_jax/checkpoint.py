"""Orbax checkpoints of training: train state + the Grain data-iterator state, saved together every N steps.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous (the step loop continues while the
previous save is written) and atomic (Orbax writes a temporary directory and renames it when complete, so a
killed process leaves the last *complete* checkpoint). `restore` takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on one mesh restores onto another. The data item is per process
(`process_<i>-of-<n>.json`), restored into a fresh iterator built with the same config and process layout (with
`config.data.elastic_resume`, any number of processes: `nextstep_jax.data.elastic`).

Verification (local single-process workdirs): once a step is complete, `WORKDIR/checkpoint_manifests/<step>.json`
records its files' sizes and CRC-32s (`file_manifest.py`) and the model config. `latest_step` checks the newest
step against its manifest before trusting it; a damaged step is moved to `WORKDIR/checkpoints_damaged/<step>`
(never deleted) with one warning line, and the newest intact step is used. A resume whose model differs from the
checkpoint names the differing config fields; a save that fails on a full or read-only disk names the path and
the step that was kept.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from nextstep_jax import file_manifest
from nextstep_jax.data import elastic
from nextstep_jax.errors import UserError, find_os_error, os_error_line, warn
from nextstep_jax.paths import is_url, resolve

MANIFESTS = "checkpoint_manifests"
DAMAGED = "checkpoints_damaged"


def _data_args(data_iter: Any, save: bool) -> Any:
  """Grain's handler; for `config.data.elastic_resume` iterators the one that restores onto another process count."""
  if isinstance(data_iter, elastic.ElasticIterator):
    return (elastic.CheckpointSave if save else elastic.CheckpointRestore)(data_iter)
  return (grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore)(data_iter)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the (state, data) items used by `train`.

  `model_config` (a dataclass or dict; optional) is recorded with every step so that a resume with another
  model can say which field differs."""

  def __init__(self, workdir: str | os.PathLike, save_every: int, keep: int = 3, async_save: bool = True,
               model_config: Any = None):
    self.workdir = resolve(workdir).rstrip("/")
    self.directory = f"{self.workdir}/checkpoints" if is_url(self.workdir) else Path(self.workdir) / "checkpoints"
    self._verify = not is_url(self.workdir) and jax.process_count() == 1
    self._model_config = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else \
        (dict(model_config) if model_config is not None else None)
    self._intact: set[int] = set()  # steps verified (or written) by this process
    self._unrecorded: set[int] = set()  # steps saved here whose manifest is not written yet
    self._async = async_save
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(save_every), 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  # ------------------------------------------------------------------------------------------- verification

  def _manifest(self, step: int) -> Path:
    return Path(self.workdir) / MANIFESTS / f"{step}.json"

  def _record_finished(self) -> None:
    """Manifests for the steps this process saved that are now complete; drops those of deleted steps."""
    if not self._verify or not self._unrecorded:
      return
    present = set(self._steps_on_disk())
    (Path(self.workdir) / MANIFESTS).mkdir(parents=True, exist_ok=True)
    for step in sorted(self._unrecorded & present):
      file_manifest.write(self._manifest(step), Path(self.directory) / str(step), step=step,
                          model_config=self._model_config)
      self._intact.add(step)
    self._unrecorded -= present
    for f in (Path(self.workdir) / MANIFESTS).glob("*.json"):
      if f.stem.isdigit() and int(f.stem) not in present:
        f.unlink()

  def _check_step(self, step: int) -> str | None:
    """None if `step` matches its manifest (or has none: written before manifests, or killed before it was
    recorded — Orbax's atomic commit still vouches for completeness); else what is wrong."""
    manifest = file_manifest.read(self._manifest(step))
    if manifest is None:
      return None
    return file_manifest.verify(Path(self.directory) / str(step), manifest["files"])

  def _set_aside(self, step: int) -> Path:
    root = Path(self.workdir) / DAMAGED
    root.mkdir(parents=True, exist_ok=True)
    dest, n = root / str(step), 1
    while dest.exists():
      dest, n = root / f"{step}.{n}", n + 1
    os.replace(Path(self.directory) / str(step), dest)
    manifest = self._manifest(step)
    if manifest.exists():
      os.replace(manifest, dest.with_name(dest.name + ".manifest.json"))
    return dest

  def latest_step(self) -> int | None:
    """The newest intact step (damaged newer steps are set aside with a warning), or None."""
    if not self._verify:
      return self.manager.latest_step()
    while (step := self.manager.latest_step()) is not None and step not in self._intact:
      problem = self._check_step(step)
      if problem is None:
        self._intact.add(step)
        break
      dest = self._set_aside(step)
      self.manager.reload()
      fallback = self.manager.latest_step()
      warn(f"checkpoint step {step} is damaged ({problem}); moved it to {dest} and "
           + (f"resuming from step {fallback}" if fallback is not None else "starting from scratch"))
    return step

  # ------------------------------------------------------------------------------------------- save / restore

  def _steps_on_disk(self) -> list[int]:
    self.manager.reload()
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def _kept(self) -> str:
    steps = self._steps_on_disk()
    return f"kept checkpoint step {max(steps)} in {self.directory}" if steps else "no earlier checkpoint was kept"

  def _write_error(self, e: BaseException, step: int) -> Exception:
    os_err = find_os_error(e)
    if os_err is None:
      return e if isinstance(e, Exception) else RuntimeError(str(e))
    return UserError(os_error_line(os_err, f"checkpoint step {step} to {self.directory}", self._kept()))

  def save(self, step: int, state: Any, data_iter: Any | None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = _data_args(data_iter, save=True)
    self.wait()
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      raise self._write_error(e, step) from None
    if saved:
      self._unrecorded.add(step)
      if not self._async:
        self.wait()
    return saved

  def _check_model(self, step: int, abstract_state: Any) -> None:
    """UserError naming what differs if the checkpoint's params do not have the shapes of `abstract_state`."""
    params = getattr(abstract_state, "params", None)
    if params is None or is_url(self.workdir):
      return
    try:
      md = ocp.PyTreeCheckpointer().metadata(Path(self.directory) / str(step) / "state")
    except Exception:  # noqa: BLE001 — unreadable metadata surfaces in restore itself
      return
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
      return
    leaf = lambda _, v: hasattr(v, "shape")  # noqa: E731
    stored = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree["params"], is_leaf=leaf).items()}
    wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
    if stored == wanted:
      return
    manifest = file_manifest.read(self._manifest(step)) or {}
    saved_cfg, cfg = manifest.get("model_config"), self._model_config
    if saved_cfg and cfg:
      fields = [f"model.{k}={cfg.get(k)!r} (checkpoint: {saved_cfg.get(k)!r})"
                for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k)]
      what = "config " + ", ".join(fields[:6]) + (" …" if len(fields) > 6 else "")
    else:
      diff = sorted(set(stored) ^ set(wanted)) or [k for k in wanted if stored.get(k) != wanted[k]]
      k = diff[0]
      what = (f"params/{'/'.join(k)} has shape {stored.get(k, 'absent')} in the checkpoint but "
              f"{wanted.get(k, 'absent')} for this config.model ({len(diff)} parameter(s) differ)")
    raise UserError(f"the model differs from checkpoint step {step} in {self.directory}: {what}; resume with "
                    f"the model config it was trained with, or train this model in a new --workdir "
                    f"(--config.train.init_from=DIR starts it from other weights)")

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """State onto the shardings carried by `abstract_state`; the iterator's position is restored in place."""
    self._check_model(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = _data_args(data_iter, save=False)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:
      raise self._read_error(e, step) from None

  def _read_error(self, e: Exception, step: int) -> Exception:
    if isinstance(e, UserError):
      return e
    first = " ".join(str(e).split())[:300]
    return UserError(f"could not restore checkpoint step {step} in {self.directory} ({type(e).__name__}: {first}); "
                     f"if the step is damaged, move {self.directory}/{step} away to resume from the previous one")

  def restore_params(self, step: int | None, abstract_params: Any) -> Any:
    """Only the params of a checkpoint (e.g. to initialise the next curriculum stage)."""
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                       restore_args=ocp.checkpoint_utils.construct_restore_args(
                                           {"params": abstract_params}), partial_restore=True)))
    except Exception as e:
      raise self._read_error(e, step) from None
    return restored["state"]["params"]

  def wait(self) -> None:
    """Blocks until pending saves are complete (and recorded); a failed write raises UserError (one line)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e, max(self._unrecorded, default=-1)) from None
    missing = sorted(s for s in self._unrecorded if s not in self._steps_on_disk())
    self._record_finished()
    if missing and self._verify:
      self._unrecorded -= set(missing)
      usage = shutil.disk_usage(self.workdir)
      reason = "the disk is full" if usage.free < (64 << 20) else "see --verbose for Orbax's log"
      raise UserError(f"checkpoint step {missing[0]} was not written to {self.directory} ({reason}); "
                      f"{self._kept()}")

  def close(self) -> None:
    self.wait()
    self.manager.close()
