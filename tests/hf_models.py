"""Tiny random Hugging Face reference models (torch, CPU) saved with `save_pretrained`, for parity tests."""
from __future__ import annotations

import os

import numpy as np


def make_qwen2(path: str, *, tie: bool = False, seed: int = 0, dtype: str = "float32", **overrides):
  """Saves a random tiny `transformers.Qwen2ForCausalLM` to `path`; every parameter (biases, norms too) is random."""
  import torch
  import transformers

  kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
            rope_theta=10000.0)
  kw.update(overrides)
  config = transformers.Qwen2Config(**kw)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
  model = model.to(getattr(torch, dtype))
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Reference fp32 logits; with a mask, positions are the raw indices (official NextStep semantics)."""
  import torch
  with torch.no_grad():
    t_ids = torch.tensor(ids)
    kwargs = {}
    if mask is not None:
      kwargs["attention_mask"] = torch.tensor(mask)
      kwargs["position_ids"] = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    return model(t_ids, **kwargs).logits.float().numpy()
