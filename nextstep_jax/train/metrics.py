"""Training metrics: TensorBoard (tensorboardX, no TensorFlow), a console line, and `metrics.jsonl` history.

Only process 0 writes. On resume the history is truncated to the restored step so it never holds duplicates.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class MetricWriter:
  def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.history = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    self.history.parent.mkdir(parents=True, exist_ok=True)
    if self.history.exists():
      keep = [l for l in self.history.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
      self.history.write_text("".join(l + "\n" for l in keep))
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

  def scalars(self, step: int, values: dict[str, Any], console: bool = True) -> None:
    if not self.enabled:
      return
    plain = {k: float(np.asarray(v)) for k, v in values.items()}
    with open(self.history, "a") as f:
      f.write(json.dumps({"step": step, **plain}) + "\n")
    if self._tb is not None:
      for k, v in plain.items():
        self._tb.add_scalar(k, v, step)
    if console:
      shown = " ".join(f"{k}={v:.4g}" for k, v in plain.items())
      print(f"step {step}: {shown}", flush=True)

  def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image_uint8, step, dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_history(workdir: str | os.PathLike) -> list[dict[str, float]]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []
