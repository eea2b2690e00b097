"""Hugging Face Qwen2 / Qwen2.5 ⇄ our Qwen2ForCausalLM: config mapping, the backbone table, CLI entry points."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from nextstep_jax.config import ConfigError, ModelConfig
from nextstep_jax.convert.model_dir import export_checkpoint, import_checkpoint
from nextstep_jax.convert.safetensors_io import SafetensorsReader
from nextstep_jax.convert.table import Rule, parse_dtype
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM


def backbone_rules(cfg: ModelConfig, prefix: str = "model.", lm_head: str | None = "lm_head.weight") -> list[Rule]:
  """Table for the Qwen2 backbone (+ untied lm_head). `prefix` is "model." for HF, "" for NextStep releases."""
  n = cfg.num_layers
  lay = lambda *p: ("params", "backbone", "layers") + p
  src = lambda s: f"{prefix}layers.{{i}}.{s}"
  rules = [Rule(("params", "backbone", "embed_tokens", "embedding"), f"{prefix}embed_tokens.weight"),
           Rule(lay("input_layernorm", "scale"), src("input_layernorm.weight"), stack=n),
           Rule(lay("post_attention_layernorm", "scale"), src("post_attention_layernorm.weight"), stack=n)]
  for p in ("q", "k", "v"):
    rules.append(Rule(lay("self_attn", f"{p}_proj", "kernel"), src(f"self_attn.{p}_proj.weight"), "linear", stack=n))
    if cfg.attention_bias:
      rules.append(Rule(lay("self_attn", f"{p}_proj", "bias"), src(f"self_attn.{p}_proj.bias"), "flat", stack=n))
  rules.append(Rule(lay("self_attn", "o_proj", "kernel"), src("self_attn.o_proj.weight"), "linear", n_in=2, stack=n))
  if cfg.o_bias:
    rules.append(Rule(lay("self_attn", "o_proj", "bias"), src("self_attn.o_proj.bias"), stack=n))
  for p in ("gate", "up", "down"):
    rules.append(Rule(lay("mlp", f"{p}_proj", "kernel"), src(f"mlp.{p}_proj.weight"), "linear", stack=n))
  rules.append(Rule(("params", "backbone", "norm", "scale"), f"{prefix}norm.weight"))
  if not cfg.tie_word_embeddings and lm_head:
    rules.append(Rule(("params", "lm_head", "kernel"), lm_head, "linear"))
  return rules


def rope_theta_from_hf(hf: dict[str, Any]) -> float:
  """θ from a transformers-4 (`rope_theta`, `rope_scaling`) or transformers-5 (`rope_parameters`) config."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type not in ("default", None):
    raise ConfigError(f"rope type {rope_type!r} is not supported; only default (unscaled) RoPE is implemented")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def backbone_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """Backbone fields of ModelConfig from an HF config dict (Qwen2 or the NextStep/Llama variant)."""
  if hf.get("use_sliding_window"):
    raise ConfigError("use_sliding_window=true is not supported; NextStep/Qwen2.5 checkpoints use full attention")
  try:
    heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta_from_hf(hf), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=hf.get("max_position_embeddings", 32768))
  except KeyError as e:
    raise ConfigError(f"config.json lacks required field {e.args[0]!r}; is this a Qwen2-family checkpoint?") from None


def model_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  if hf.get("model_type") not in ("qwen2", None):
    raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; `convert qwen` expects 'qwen2' "
                      f"(use `convert nextstep` for NextStep-1 releases)")
  fields = backbone_fields_from_hf(hf)
  eos = hf.get("eos_token_id")
  fields.update(attention_bias=True, o_bias=False, eos_token_id=eos if isinstance(eos, int) else 0,
                pad_token_id=0, image_area_id=0, boi_id=0, eoi_id=0, image_placeholder_id=0)
  fields.update(overrides)
  return ModelConfig(**fields).validate()


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """A transformers Qwen2 config.json for an exported checkpoint."""
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
      "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
      "attention_dropout": 0.0, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.eos_token_id,
      "torch_dtype": dtype, "dtype": dtype,
  }


def abstract_shapes(model, *dummy_inputs) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {param path: shape} of a Linen model via eval_shape (nothing allocated)."""
  tree = nn.unbox(jax.eval_shape(lambda r: model.init(r, *dummy_inputs), jax.random.key(0)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def qwen_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  return abstract_shapes(Qwen2ForCausalLM(cfg), jnp.zeros((1, 1), jnp.int32))


def read_json(path: Path, what: str) -> dict[str, Any]:
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found at {path}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def convert_qwen(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False) -> ModelConfig:
  """HF Qwen2 directory → our model directory (`nextstep_config.json` + Orbax `params/`), one tensor at a time."""
  src, dst = Path(src), Path(dst)
  np_dtype = parse_dtype(dtype)
  cfg = model_config_from_hf(read_json(src / "config.json", "HF config.json"),
                             **({"param_dtype": np_dtype.name} if np_dtype is not None else {}))
  import_checkpoint(SafetensorsReader(src), backbone_rules(cfg), qwen_shapes(cfg), dst, cfg,
                    {"format": "hf_qwen2", "path": str(src)}, dtype=dtype,
                    ignore=["lm_head.weight"] if cfg.tie_word_embeddings else [], what=f"HF checkpoint {src}",
                    overwrite=overwrite)
  return cfg


def export_qwen(model_dir: str | Path, dst: str | Path, dtype: str | None = None,
                max_shard_bytes: int = 4 << 30) -> list[Path]:
  """Our model directory → HF Qwen2 safetensors + config.json (reads one parameter at a time)."""
  dst = Path(dst)
  cfg, _, dtype, files = export_checkpoint(Path(model_dir), dst, backbone_rules, dtype, max_shard_bytes)
  (dst / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype), indent=2))
  return files
