"""NextStep-1 release directory ⇄ our model directory (one checkpoint that `sample` and `train` load).

Release layout: `config.json` (NextStepConfig), flat-key `model*.safetensors` (+ index), `vae/` (config.json +
checkpoint.pt or safetensors, BFL names), tokenizer files. Ours: `nextstep_config.json` (model + vae sections),
Orbax `params/` and `vae_params/`, and `tokenizer/` (copied files).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from nextstep_jax.config import ConfigError, ModelConfig
from nextstep_jax.convert.model_dir import export_checkpoint, import_checkpoint
from nextstep_jax.convert.qwen import abstract_shapes, backbone_fields_from_hf, backbone_rules, read_json
from nextstep_jax.convert.safetensors_io import SafetensorsReader
from nextstep_jax.convert.table import Rule, parse_dtype
from nextstep_jax.convert.vae import convert_vae, export_vae_bfl
from nextstep_jax.models.nextstep import NextStep, sincos_2d_table
from nextstep_jax.tokens import IMAGE_AREA_TOKEN, vocab_id

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")
IGNORED = ("gen_pos_embed", r"rotary_emb\.inv_freq", r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def head_rules(cfg: ModelConfig) -> list[Rule]:
  """Projectors + flow-matching head (`image_head.net.*`)."""
  rules = []

  def linear(ours: tuple[str, ...], theirs: str, stack: int = 0):
    rules.append(Rule(("params",) + ours + ("kernel",), theirs + ".weight", "linear", stack=stack))
    rules.append(Rule(("params",) + ours + ("bias",), theirs + ".bias", stack=stack))

  linear(("image_in_projector",), "image_in_projector")
  linear(("image_out_projector",), "image_out_projector")
  net, n = "image_head.net", cfg.fm_head_layers
  linear(("image_head", "time_embed", "mlp_0"), f"{net}.time_embed.mlp.0")
  linear(("image_head", "time_embed", "mlp_2"), f"{net}.time_embed.mlp.2")
  linear(("image_head", "cond_embed"), f"{net}.cond_embed")
  linear(("image_head", "input_proj"), f"{net}.input_proj")
  blocks = ("image_head", "res_blocks")
  rules.append(Rule(("params",) + blocks + ("in_ln", "scale"), f"{net}.res_blocks.{{i}}.in_ln.weight", stack=n))
  rules.append(Rule(("params",) + blocks + ("in_ln", "bias"), f"{net}.res_blocks.{{i}}.in_ln.bias", stack=n))
  linear(blocks + ("mlp_0",), f"{net}.res_blocks.{{i}}.mlp.0", n)
  linear(blocks + ("mlp_2",), f"{net}.res_blocks.{{i}}.mlp.2", n)
  linear(blocks + ("adaLN_modulation",), f"{net}.res_blocks.{{i}}.adaLN_modulation.1", n)
  linear(("image_head", "final_layer", "adaLN_modulation"), f"{net}.final_layer.adaLN_modulation.1")
  linear(("image_head", "final_layer", "linear"), f"{net}.final_layer.linear")
  return rules


def nextstep_rules(cfg: ModelConfig) -> list[Rule]:
  return backbone_rules(cfg, prefix="", lm_head="lm_head.weight") + head_rules(cfg)


def model_config_from_release(hf: dict[str, Any], tokenizer_dir: Path | None = None, **overrides) -> ModelConfig:
  """ModelConfig from a NextStep-1 `config.json` (+ the tokenizer, for `<|image_area|>`, absent from the config)."""
  if hf.get("model_type") not in ("nextstep", None) and "image_placeholder_id" not in hf:
    raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; expected a NextStep-1 release")
  fields = backbone_fields_from_hf(hf)
  try:
    pad = hf["pad_token_id_added"]
    area = vocab_id(tokenizer_dir, IMAGE_AREA_TOKEN) if tokenizer_dir else None
    area = pad + 1 if area is None else area
    eos = hf.get("eos_token_id")
    fields.update(
        attention_bias=bool(hf.get("attention_bias", True)),
        o_bias=bool(hf.get("o_attention_bias", hf.get("attention_bias", False))),
        latent_channels=hf["latent_channels"], latent_patch_size=hf["latent_patch_size"],
        fm_head_dim=hf["fm_head_dim"], fm_head_layers=hf["fm_head_layers"],
        fm_head_batch_mul=hf.get("fm_head_batch_mul", 4), lm_loss_weight=hf.get("lm_loss_weight", 0.01),
        im_loss_weight=hf.get("im_loss_weight", 1.0), input_noise_strength=float(hf.get("noise_strength", 0.0)),
        use_gen_pos_embed=bool(hf.get("use_gen_pos_embed", False)),
        base_image_grid_size=hf.get("base_image_grid_size", 32), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=pad, image_area_id=area, boi_id=hf["boi"], eoi_id=hf["eoi"],
        image_placeholder_id=hf["image_placeholder_id"])
  except KeyError as e:
    raise ConfigError(f"NextStep config.json lacks field {e.args[0]!r}; is this a NextStep-1 release?") from None
  fields.update(overrides)
  return ModelConfig(**fields).validate()


def release_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """config.json in the release layout (NextStepConfig fields)."""
  return {
      "architectures": ["NextStep"], "model_type": "nextstep", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "attention_bias": cfg.attention_bias, "o_attention_bias": cfg.o_bias, "mlp_bias": False,
      "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
      "bos_token_id": cfg.eos_token_id, "eos_token_id": cfg.eos_token_id,
      "latent_channels": cfg.latent_channels, "latent_patch_size": cfg.latent_patch_size,
      "fm_head_dim": cfg.fm_head_dim, "fm_head_layers": cfg.fm_head_layers, "fm_head_batch_mul": cfg.fm_head_batch_mul,
      "lm_loss_weight": cfg.lm_loss_weight, "im_loss_weight": cfg.im_loss_weight,
      "noise_strength": cfg.input_noise_strength,
      "use_gen_pos_embed": cfg.use_gen_pos_embed, "base_image_grid_size": cfg.base_image_grid_size,
      "boi": cfg.boi_id, "eoi": cfg.eoi_id, "image_placeholder_id": cfg.image_placeholder_id,
      "pad_token_id_added": cfg.pad_token_id, "vae_name_or_path": "vae", "torch_dtype": dtype,
  }


def nextstep_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  return abstract_shapes(NextStep(cfg), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1, cfg.token_dim), jnp.float32))


def convert_nextstep(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False,
                     with_vae: bool = True) -> ModelConfig:
  """Release directory → our model directory (params, vae_params, tokenizer, nextstep_config.json)."""
  src, dst = Path(src), Path(dst)
  np_dtype = parse_dtype(dtype)
  cfg = model_config_from_release(read_json(src / "config.json", "NextStep config.json"), src,
                                  **({"param_dtype": np_dtype.name} if np_dtype is not None else {}))
  reader = SafetensorsReader(src, prefix="model")
  import_checkpoint(reader, nextstep_rules(cfg), nextstep_shapes(cfg), dst, cfg,
                    {"format": "nextstep_release", "path": str(src), "gen_pos_embed": "gen_pos_embed" in reader},
                    dtype=dtype, ignore=IGNORED, what=f"NextStep checkpoint {src}", overwrite=overwrite)
  if with_vae and (src / "vae").is_dir():
    convert_vae(src / "vae", dst, layout="nextstep", dtype=dtype, overwrite=overwrite)
  tok_dir = dst / "tokenizer"
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      tok_dir.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src / name, tok_dir / name)
  return cfg


def _gen_pos_embed(cfg: ModelConfig, meta: dict, np_dtype):
  """The release layout's fixed `gen_pos_embed` buffer (recomputed bit-exactly; kept when the source had it)."""
  if meta.get("source", {}).get("gen_pos_embed", True):
    yield "gen_pos_embed", sincos_2d_table(cfg.hidden_size, cfg.base_image_grid_size)[None].astype(
        np_dtype or np.float32)


def export_nextstep(model_dir: str | Path, dst: str | Path, dtype: str | None = None,
                    max_shard_bytes: int = 5 << 30) -> list[Path]:
  """Our model directory → release layout (config.json, model*.safetensors incl. gen_pos_embed, vae/, tokenizer)."""
  model_dir, dst = Path(model_dir), Path(dst)
  cfg, _, dtype, files = export_checkpoint(model_dir, dst, nextstep_rules, dtype, max_shard_bytes, _gen_pos_embed)
  (dst / "config.json").write_text(json.dumps(release_config_from_model(cfg, dtype), indent=2))
  if (model_dir / "vae_params").is_dir():
    (dst / "vae").mkdir(parents=True, exist_ok=True)
    export_vae_bfl(model_dir, dst / "vae" / "model.safetensors", write_config=True)
  if (model_dir / "tokenizer").is_dir():
    for f in (model_dir / "tokenizer").iterdir():
      shutil.copy2(f, dst / f.name)
  return files
