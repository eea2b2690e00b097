"""Analytic training FLOPs (backbone and flow head counted separately) and MFU.

Forward FLOPs = 2 · multiply-accumulates; training = 3 × forward (remat recompute is not counted, as in MFU).
Backbone per token: 2·(layer matmul params · layers + lm_head) + causal attention 2·layers·heads·head_dim·S.
Head per flow-matching row (fm_head_batch_mul per image token): 2 · head matmul params; the out-projector
runs once per image token.
"""
from __future__ import annotations

import dataclasses

from nextstep_jax.config import ModelConfig
from nextstep_jax.models.fm_head import FREQ_DIM

PEAK_BF16_FLOPS = {"tpu v4": 275e12, "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v5 lite": 197e12,
                   "tpu v5e": 197e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12,
                   "a100": 312e12}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  backbone: float
  head: float

  @property
  def total(self) -> float:
    return self.backbone + self.head


def backbone_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  d, k, h, g, f = cfg.hidden_size, cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
  per_layer = d * h * k * 2 + 2 * d * g * k + 3 * d * f
  matmul = per_layer * cfg.num_layers + d * cfg.vocab_size
  return 2.0 * matmul + 2.0 * cfg.num_layers * h * k * seq_len


def head_forward_flops_per_row(cfg: ModelConfig) -> float:
  w, t = cfg.fm_head_dim, cfg.token_dim
  params = t * w + FREQ_DIM * w + w * w + cfg.hidden_size * w + cfg.fm_head_layers * 5 * w * w + 2 * w * w + w * t
  return 2.0 * params


def train_step_flops(cfg: ModelConfig, batch: int, seq_len: int, image_tokens: int) -> StepFlops:
  """FLOPs of one optimizer step over `batch` rows of `seq_len` with `image_tokens` real image tokens in total."""
  backbone = 3.0 * batch * seq_len * backbone_forward_flops_per_token(cfg, seq_len)
  out_proj = 2.0 * cfg.hidden_size * cfg.hidden_size * image_tokens
  head = 3.0 * (image_tokens * cfg.fm_head_batch_mul * head_forward_flops_per_row(cfg) + out_proj)
  return StepFlops(backbone=backbone, head=head)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """bf16 peak of one device from its `device_kind` (None when unknown, e.g. CPUs), unless `override` > 0."""
  if override > 0:
    return override
  kind = device_kind.lower()
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_BF16_FLOPS[name]
  return None
