"""Orbax checkpoints of training: train state + the Grain data-iterator state, saved together every N steps.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous (the step loop continues while the
previous save is written) and atomic (Orbax writes a temporary directory and renames it when complete, so a
killed process leaves the last *complete* checkpoint). `restore` takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on one mesh restores onto another. The data item is per process
(`process_<i>-of-<n>.json`), restored into a fresh iterator built with the same config and process layout (with
`config.data.elastic_resume`, any number of processes: `nextstep_jax.data.elastic`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


def _data_args(data_iter: Any, save: bool) -> Any:
  """Grain's handler; for `config.data.elastic_resume` iterators the one that restores onto another process count."""
  from nextstep_jax.data import elastic
  if isinstance(data_iter, elastic.ElasticIterator):
    return (elastic.CheckpointSave if save else elastic.CheckpointRestore)(data_iter)
  return (grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore)(data_iter)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the (state, data) items used by `train`."""

  def __init__(self, workdir: str | os.PathLike, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = Path(os.path.abspath(workdir)) / "checkpoints" if "://" not in str(workdir) else \
        f"{str(workdir).rstrip('/')}/checkpoints"
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(save_every), 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any | None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = _data_args(data_iter, save=True)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """State onto the shardings carried by `abstract_state`; the iterator's position is restored in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = _data_args(data_iter, save=False)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_params(self, step: int | None, abstract_params: Any) -> Any:
    """Only the params of a checkpoint (e.g. to initialise the next curriculum stage)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(
                                         {"params": abstract_params}), partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
