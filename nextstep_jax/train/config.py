"""`config.train`: the typed, validated view of a stage's optimisation and loop settings (defaults written once).

`train_section(**overrides)` builds the ConfigDict an experiment file holds (every field present, so
`--config.train.x=y` overrides type-check); `TrainConfig.from_config(config.train)` is what the code reads. Every
check raises `ConfigError` with one line naming the field, the value and the fix, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

import ml_collections

from nextstep_jax.config import ConfigError

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # --- optimisation (official recipe: AdamW β (0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0)
  steps: int = 1000
  lr: float = 1e-4
  end_lr: float = 1e-5  # the cosine schedule's final value
  warmup_steps: int = 100
  schedule: str = "cosine"  # "cosine" | "constant"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # global-norm clipping; 0 = off
  microbatches: int = 1  # gradient accumulation: the global batch is split into this many micro-batches
  seed: int = 0
  ema_decay: float = 0.0  # > 0: keep a moving average of the params (optimizer state) and export/sample with it
  objective: str = "fm"  # a row of nextstep_jax/train/registry.py: "fm" (flow matching + CE), "dpo", ...
  # --- loop
  log_every: int = 10
  save_every: int = 1000
  keep: int = 3  # checkpoints kept
  async_checkpoint: bool = True
  max_nonfinite_steps: int = 10  # this many consecutive skipped (non-finite) updates stop the run; 0 = never
  init_from: str = ""  # previous stage: an export dir (params/) or a training workdir (checkpoints/)
  vae_from: str = ""  # model dir with vae_params/ (+ tokenizer/): copied into exports, used for sample grids
  export: bool = True  # write WORKDIR/export (params-only model dir that `sample` loads) at the end
  # --- sample grids during training (needs vae_from)
  sample_every: int = 0
  sample_prompts: tuple[str, ...] = ("a red circle above a blue square",)
  sample_size: int = 64
  sample_steps: int = 20
  sample_cfg: float = 3.0
  # --- measurement / data
  peak_flops_per_device: float = 0.0  # 0: from the device kind (TPU/GPU tables); CPU: pass a measured value
  synthetic_data: bool = False  # True: in-memory synthetic batches (tests, benchmarks) instead of config.data

  @classmethod
  def from_config(cls, section: Any) -> "TrainConfig":
    """The view of `config.train` (a ConfigDict, a dict or already a TrainConfig), validated."""
    if isinstance(section, cls):
      return section
    return typed_view(cls, section, "config.train").validate()

  def validate(self) -> "TrainConfig":
    p = "config.train"
    positive_int(self, p, "steps", "log_every", "save_every", "keep", "microbatches", "sample_size", "sample_steps")
    non_negative_int(self, p, "warmup_steps", "sample_every", "max_nonfinite_steps")
    finite(self, p, "lr", "end_lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "ema_decay", "sample_cfg",
           "peak_flops_per_device")
    check(self.lr >= 0, f"{p}.lr={self.lr} must be >= 0 (typical: 1e-4 pre-training, 1e-5 fine-tuning)")
    check(self.end_lr >= 0, f"{p}.end_lr={self.end_lr} must be >= 0")
    check(self.warmup_steps <= self.steps, f"{p}.warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
          f"use a warmup of at most the run's length")
    check(self.schedule in SCHEDULES, f"{p}.schedule={self.schedule!r} is not one of {SCHEDULES}")
    for name in ("b1", "b2"):
      v = getattr(self, name)
      official = 0.9 if name == "b1" else 0.95
      check(0 <= v < 1, f"{p}.{name}={v} must be in [0, 1) (Adam moment decay; official {official})")
    check(self.eps > 0, f"{p}.eps={self.eps} must be > 0")
    check(self.weight_decay >= 0, f"{p}.weight_decay={self.weight_decay} must be >= 0")
    check(self.grad_clip >= 0, f"{p}.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
    check(0 <= self.ema_decay < 1, f"{p}.ema_decay={self.ema_decay} must be in [0, 1) (0 disables the average)")
    check(self.sample_cfg >= 1, f"{p}.sample_cfg={self.sample_cfg} must be >= 1 (1 disables guidance)")
    check(self.peak_flops_per_device >= 0, f"{p}.peak_flops_per_device={self.peak_flops_per_device} must be >= 0")
    check(bool(self.objective), f"{p}.objective is empty; use one of the registered objectives (e.g. fm, dpo)")
    return self

  def check_batch(self, global_batch: int) -> "TrainConfig":
    """Cross-check with config.data: the global batch splits into the micro-batches."""
    check(global_batch % self.microbatches == 0,
          f"config.train.microbatches={self.microbatches} does not divide config.data.global_batch_size="
          f"{global_batch}; use a divisor of {global_batch}")
    return self


def train_section(**overrides) -> ml_collections.ConfigDict:
  """`config.train` with every field at its default, `overrides` applied (unknown names are refused)."""
  return section_dict(TrainConfig, overrides, "config.train")


# ----------------------------------------------------------------------------------------------- typed views


def check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def section_dict(cls, overrides: dict, where: str) -> ml_collections.ConfigDict:
  """A ConfigDict of `cls`'s defaults with `overrides` (validated by building the view first)."""
  view = typed_view(cls, overrides, where).validate()
  return ml_collections.ConfigDict({f.name: getattr(view, f.name) for f in dataclasses.fields(cls)})


def typed_view(cls, section: Any, where: str):
  """`cls(**section)` after refusing unknown fields (with the closest known name) and values of the wrong type."""
  if isinstance(section, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    d = section.to_dict()
  else:
    d = dict(section or {})
  hints = typing.get_type_hints(cls)
  for key in d:
    if key not in hints:
      close = difflib.get_close_matches(key, list(hints), n=1)
      raise ConfigError(f"{where}.{key} is not a known field" + (f"; did you mean {where}.{close[0]}?" if close else
                                                                f"; known fields: {sorted(hints)}"))
  return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()})


def _coerce(value: Any, hint: Any, name: str) -> Any:
  """`value` as the field's type (int → float where a float is expected, list → tuple); refuses other types."""
  origin = typing.get_origin(hint)
  if hint is bool:
    check(isinstance(value, bool), f"{name}={value!r} must be True or False")
  elif hint is int:
    check(isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} must be an integer")
  elif hint is float:
    check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}={value!r} must be a number")
    value = float(value)
  elif hint is str:
    check(isinstance(value, str), f"{name}={value!r} must be a string")
  elif origin is tuple:
    check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
          f"{name}={value!r} must be a list of strings")
    value = tuple(value)
  return value


def positive_int(view, where: str, *names: str) -> None:
  for n in names:
    v = getattr(view, n)
    check(v > 0, f"{where}.{n}={v} must be a positive integer")


def non_negative_int(view, where: str, *names: str) -> None:
  for n in names:
    v = getattr(view, n)
    check(v >= 0, f"{where}.{n}={v} must be >= 0")


def finite(view, where: str, *names: str) -> None:
  for n in names:
    v = getattr(view, n)
    check(math.isfinite(v), f"{where}.{n}={v} is not a finite number")
