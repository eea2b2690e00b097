"""Model configuration: typed, validated views of the `config.model` / `config.vae` ConfigDicts.

Experiment files in `configs/` return an `ml_collections.ConfigDict`; the library turns its `model` and `vae`
sub-dicts into the frozen dataclasses below (hashable, so they can be Linen module attributes). Every check
raises `ConfigError` with one line naming the field, the value and the fix.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_out")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
LATENT_PATCH_SIZE = 2  # every released NextStep model's latent_patch_size; VAE-side code uses it before a model
# config is at hand (image size multiples, the latent cache's patchify)


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2.5 backbone + NextStep-1 fields (mirrors the official `NextStepConfig`).

  Backbone fields alone describe a plain Qwen2 causal LM; the rest are ignored by it.
  """
  # --- Qwen2 backbone
  vocab_size: int = 300
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  attention_bias: bool = True  # q/k/v bias
  o_bias: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  # --- execution
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # master weights
  remat_policy: str = "none"
  scan_unroll: int = 1  # layers per `nn.scan` iteration (backbone and head); = num_layers: straight-line code
  attention_impl: str = "auto"
  # --- NextStep-1
  latent_channels: int = 16
  latent_patch_size: int = LATENT_PATCH_SIZE
  fm_head_dim: int = 48
  fm_head_layers: int = 2
  fm_head_batch_mul: int = 4
  # official `noise_strength` (training only): the LM reads its input latents + N(0,1)·σ, σ rising linearly from 0
  # to this over each image's latent pixels in raster order; targets stay clean (models/image_grid.py)
  input_noise_strength: float = 0.0
  lm_loss_weight: float = 0.01
  im_loss_weight: float = 1.0
  head_uses_out_projector: bool = True  # False = Aug-2025 training forward (raw hidden → head)
  use_gen_pos_embed: bool = False
  base_image_grid_size: int = 32
  # special token ids (official order: pad, image_area, boi, eoi, placeholder, ...)
  eos_token_id: int = 256
  pad_token_id: int = 259
  image_area_id: int = 260
  boi_id: int = 261
  eoi_id: int = 262
  image_placeholder_id: int = 263

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def token_dim(self) -> int:
    """Width of one continuous image token: latent_channels · patch²."""
    return self.latent_channels * self.latent_patch_size**2

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    return _from_dict(cls, d, "config.model")

  def validate(self) -> "ModelConfig":
    p = "config.model"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings", "latent_channels", "latent_patch_size", "fm_head_dim", "fm_head_layers",
                 "fm_head_batch_mul"):
      v = getattr(self, name)
      _check(isinstance(v, int) and v > 0, f"{p}.{name}={v!r} must be a positive integer")
    if self.head_dim is None:
      _check(self.hidden_size % self.num_heads == 0,
             f"{p}.num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
             f"choose a divisor or set {p}.head_dim explicitly")
    else:
      _check(isinstance(self.head_dim, int) and self.head_dim > 0, f"{p}.head_dim={self.head_dim!r} must be positive")
    _check(self.resolved_head_dim % 2 == 0, f"{p}.head_dim={self.resolved_head_dim} must be even for rotate-half RoPE")
    _check(self.num_heads % self.num_kv_heads == 0,
           f"{p}.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
           f"GQA needs num_heads to be a multiple of num_kv_heads")
    _check(self.input_noise_strength >= 0,
           f"{p}.input_noise_strength={self.input_noise_strength} must be >= 0 (0 = no input noise)")
    _check(self.rms_norm_eps > 0, f"{p}.rms_norm_eps={self.rms_norm_eps} must be > 0")
    _check(self.rope_theta > 0, f"{p}.rope_theta={self.rope_theta} must be > 0")
    _check(self.dtype in DTYPES, f"{p}.dtype={self.dtype!r} is not one of {DTYPES}")
    _check(self.param_dtype in DTYPES, f"{p}.param_dtype={self.param_dtype!r} is not one of {DTYPES}")
    _check(self.remat_policy in REMAT_POLICIES, f"{p}.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    _check(isinstance(self.scan_unroll, int) and self.scan_unroll >= 1,
           f"{p}.scan_unroll={self.scan_unroll!r} must be a positive integer (1: no unrolling)")
    _check(self.attention_impl in ATTENTION_IMPLS,
           f"{p}.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    for name in ("eos_token_id", "pad_token_id", "image_area_id", "boi_id", "eoi_id", "image_placeholder_id"):
      v = getattr(self, name)
      _check(0 <= v < self.vocab_size, f"{p}.{name}={v} is outside the vocabulary [0, {self.vocab_size}); "
             f"use the id your tokenizer assigns")
    return self


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Flux (BFL layout) autoencoder + NextStep latent handling (official `AutoEncoderParams`)."""
  resolution: int = 256
  in_channels: int = 3
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scaling_factor: float = 1.0
  shift_factor: float = 0.0
  deterministic: bool = True
  encoder_norm: bool = True
  psz: int | None = 2  # VAE-side patch grouping for encoder_norm (None/1 = per-pixel)
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def from_dict(cls, d: Any) -> "VAEConfig":
    d = dict(_to_plain(d))
    if "ch_mult" in d:
      d["ch_mult"] = tuple(d["ch_mult"])
    return _from_dict(cls, d, "config.vae")

  def validate(self) -> "VAEConfig":
    p = "config.vae"
    _check(len(self.ch_mult) >= 1, f"{p}.ch_mult must not be empty")
    for m in self.ch_mult:
      _check((self.ch * m) % 32 == 0, f"{p}.ch*ch_mult={self.ch * m} must be a multiple of 32 (GroupNorm(32))")
    _check(self.z_channels > 0 and self.num_res_blocks > 0, f"{p}.z_channels and num_res_blocks must be positive")
    _check(self.psz is None or self.psz >= 1, f"{p}.psz={self.psz} must be None or >= 1")
    _check(self.dtype in DTYPES and self.param_dtype in DTYPES, f"{p}.dtype/param_dtype must be one of {DTYPES}")
    return self


def _to_plain(d: Any) -> dict:
  if isinstance(d, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return d.to_dict()
  return dict(d)


def _from_dict(cls, d: Any, where: str):
  d = _to_plain(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  _check(not unknown, f"{where} has unknown field(s) {unknown}; known fields: {sorted(names)}")
  return cls(**d).validate()


# ----------------------------------------------------------------------------------------------- presets


def qwen2_5_14b() -> dict:
  """Qwen2.5-14B backbone as used by NextStep-1-Large (spec §1.1)."""
  return dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40,
              num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6, attention_bias=True, o_bias=False,
              tie_word_embeddings=False, max_position_embeddings=131072, eos_token_id=151643)


def nextstep1_14b() -> dict:
  """The released NextStep-1-Large config (backbone + projectors + 157M head + special ids)."""
  return dict(qwen2_5_14b(), latent_channels=16, latent_patch_size=2, fm_head_dim=1536, fm_head_layers=12,
              fm_head_batch_mul=4, lm_loss_weight=0.01, im_loss_weight=1.0, use_gen_pos_embed=False,
              base_image_grid_size=32, pad_token_id=151665, image_area_id=151666, boi_id=151667, eoi_id=151668,
              image_placeholder_id=151669)


def tiny() -> dict:
  """A CPU-test model shaped like the official tiny fixture (hidden 64, 2 layers, GQA 4/2, head 48×2)."""
  return dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, rms_norm_eps=1e-5, rope_theta=1e6, fm_head_dim=48, fm_head_layers=2)


def flux_vae() -> dict:
  """The real Flux.1 / NextStep-1 tokenizer architecture (f8, 16 channels)."""
  return dict(resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)


def tiny_vae() -> dict:
  """The tiny fixture VAE (ch 32, ch_mult [2,1], f2)."""
  return dict(resolution=16, ch=32, ch_mult=(2, 1), num_res_blocks=1, z_channels=16)


# ----------------------------------------------------------------------------------------------- files & overrides


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` (its `get_config(arg)`) and applies `--config.a.b=value` overrides."""
  file, _, arg = str(path).partition(":")
  _check(Path(file).is_file(), f"config file {file!r} does not exist; pass a path such as configs/tiny.py")
  spec = importlib.util.spec_from_file_location(f"_nextstep_config_{Path(file).stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _check(hasattr(module, "get_config"), f"config file {file} has no get_config() function")
  cfg = module.get_config(arg) if arg else module.get_config()
  apply_overrides(cfg, overrides)
  return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies strings `config.a.b=value` (leading `--` optional); values parse as Python literals, else strings."""
  for item in overrides:
    key, eq, raw = item.lstrip("-").partition("=")
    _check(bool(eq) and key.startswith("config."), f"override {item!r} must look like --config.path.to.field=value")
    parts = key.split(".")[1:]
    node = cfg
    for i, part in enumerate(parts[:-1]):
      _check(part in node, f"override {item!r}: config has no field {'.'.join(parts[:i + 1])!r}")
      node = node[part]
    leaf = parts[-1]
    _check(leaf in node, f"override {item!r}: config has no field {'.'.join(parts)!r}; check the spelling")
    current = node[leaf]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = _float_or_str(raw) if isinstance(current, float) else raw
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"override {item!r}: {e}") from None
  return cfg


def _float_or_str(raw: str) -> float | str:
  """`nan`, `inf`, `-inf` (not Python literals) as floats, so validation can name them; else the string."""
  try:
    return float(raw)
  except ValueError:
    return raw


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


# ----------------------------------------------------------------------------------------------- experiments


def mesh_section(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int = 1, dcn_fsdp: int = 1,
                 dcn_tensor: int = 1) -> ml_collections.ConfigDict:
  """`config.mesh`: ici sizes per axis (-1 = the rest of the devices) and dcn (multislice) sizes."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data, dcn_fsdp=dcn_fsdp,
                                        dcn_tensor=dcn_tensor))


def experiment(model: dict, vae: dict | None = None, **sections: Any) -> ml_collections.ConfigDict:
  """A full experiment ConfigDict: `model` and `vae` hold every dataclass field (so overrides type-check),
  `mesh` the device mesh; extra keyword sections (train, data, sample, …) are added as given."""
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(**model).validate()))
  cfg.vae = ml_collections.ConfigDict(dataclasses.asdict(VAEConfig(**(vae or {})).validate()))
  cfg.mesh = mesh_section()
  for name, value in sections.items():
    cfg[name] = value if isinstance(value, ml_collections.ConfigDict) else ml_collections.ConfigDict(value)
  return cfg
