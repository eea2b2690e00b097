"""`config.grpo` (NextStep-GRPO's typed section, train/grpo.py): its own module so that the rollout, the recompute
and the objective that all read it sit above it without importing one another."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from nextstep_jax.config import ConfigError, DTYPES
from nextstep_jax.sampling import flow
from nextstep_jax.train.config import check, finite, section_dict, typed_view


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """`config.grpo`. Defaults follow Flow-GRPO where NextStep-1.1 publishes nothing (docs/GRPO.md)."""
  group_size: int = 8  # G samples per prompt
  prompts: str = "shapes"  # "shapes" (the shapes world's captions) or a text file, one prompt per line
  prompt_seed: int = 0
  reward: str = "shapes"  # train/rewards.py: "shapes" | http(s)://… | package.module:function
  reward_timeout_s: float = 120.0
  sampler: str = "cps"  # flow.LOGPROB_METHODS
  noise_level: float = 0.7
  flow_steps: int = 10
  shift: float = 1.0
  cfg: float = 1.0  # 1 = CFG off (NextStep-1.1 RL); > 1 adds negative-prompt rows to rollout and recompute
  use_norm: bool = True
  grid_h: int = 16  # image token grid (256 px with the f8 VAE and 2×2 patches)
  grid_w: int = 16
  prompt_len: int = 64  # prompt rows are left-padded to this length
  train_steps: int = 0  # flow steps drawn per update (0 = every stochastic step)
  clip_range: float = 1e-3
  adv_clip: float = 5.0
  logprob_per_dim: bool = True  # ratio and KL per latent dimension (log-density / K)
  kl_weight: float = 0.0  # > 0: KL to the frozen reference (held in ref_dtype, policy shardings)
  min_group_std: float = 1e-3  # reject groups whose rewards spread less (no learning signal)
  max_group_mean: float = math.inf  # reject groups whose mean reward is above this (already solved)
  ref_dtype: str = "bfloat16"
  ref_from: str = ""  # "" = the stage's initial params

  @classmethod
  def from_config(cls, section: Any) -> "GrpoConfig":
    return typed_view(cls, section, "config.grpo").validate()

  def validate(self) -> "GrpoConfig":
    p = "config.grpo"
    finite(self, p, "noise_level", "shift", "cfg", "clip_range", "adv_clip", "kl_weight", "min_group_std",
           "reward_timeout_s")
    for name in ("group_size", "flow_steps", "grid_h", "grid_w", "prompt_len"):
      check(getattr(self, name) > 0, f"{p}.{name}={getattr(self, name)} must be a positive integer")
    check(self.group_size >= 2, f"{p}.group_size={self.group_size} must be >= 2 (advantages are group-relative)")
    check(self.sampler in flow.LOGPROB_METHODS, f"{p}.sampler={self.sampler!r} is not one of {flow.LOGPROB_METHODS}")
    try:
      self.flow_config()
    except ValueError as e:
      raise ConfigError(f"{p}: {e}") from None
    check(0 <= self.train_steps <= self.flow_steps, f"{p}.train_steps={self.train_steps} must be in [0, "
          f"flow_steps={self.flow_steps}] (0 = all)")
    check(self.cfg >= 1, f"{p}.cfg={self.cfg} must be >= 1 (1 disables guidance)")
    check(self.clip_range > 0 and self.adv_clip > 0, f"{p}.clip_range / adv_clip must be > 0")
    check(self.kl_weight >= 0 and self.min_group_std >= 0, f"{p}.kl_weight / min_group_std must be >= 0")
    check(self.ref_dtype in DTYPES, f"{p}.ref_dtype={self.ref_dtype!r} is not one of {DTYPES}")
    return self

  def flow_config(self) -> flow.FlowConfig:
    return flow.FlowConfig(self.sampler, self.flow_steps, self.shift, noise_level=self.noise_level).validate()

  @property
  def branches(self) -> int:
    return 2 if self.cfg > 1 else 1

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  def stochastic_steps(self) -> np.ndarray:
    """Indices of the flow steps that carry a log-prob (σ > 0)."""
    return np.flatnonzero(flow.logprob_steps(self.flow_config()))


def grpo_section(**overrides) -> ml_collections.ConfigDict:
  """`config.grpo` with every field at its default, `overrides` applied."""
  return section_dict(GrpoConfig, overrides, "config.grpo")
