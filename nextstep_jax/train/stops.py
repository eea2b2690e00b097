"""What ends a training run early: SIGTERM (preemption: save and exit 0) and a loss that stays non-finite."""
from __future__ import annotations

import signal
from typing import Any

from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.train.metrics import MetricWriter


class Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. some test runners): preemption saves are then off
      self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class TrainingDiverged(RuntimeError):
  """The loss stayed non-finite for `config.train.max_nonfinite_steps` consecutive steps; nothing was saved or
  exported after the last good checkpoint."""


class NonFiniteGuard:
  """Counts consecutive skipped (non-finite) updates, reading each step's flag one step late so the host never
  waits on the step it just dispatched; `check` stops the run once `limit` are skipped in a row."""

  def __init__(self, limit: int):
    self.limit, self.run, self.first_bad = limit, 0, None
    self._pending: list[tuple[int, Any]] = []

  def push(self, step: int, update_ok: Any) -> None:
    if self.limit:
      self._pending.append((step, update_ok))

  def check(self, ckpt: Checkpointer, writer: MetricWriter, final: bool = False) -> None:
    while len(self._pending) > (0 if final else 1):
      step, ok = self._pending.pop(0)
      if bool(ok):
        self.run, self.first_bad = 0, None
        continue
      self.run += 1
      self.first_bad = self.first_bad or step
      if self.run >= self.limit:
        ckpt.close()
        writer.close()
        raise TrainingDiverged(
            f"the loss or gradient was non-finite for {self.run} consecutive steps (from step {self.first_bad}); "
            f"stopped without saving or exporting: the last good checkpoint is kept. Lower config.train.lr or "
            f"check the data; config.train.max_nonfinite_steps sets the limit")
