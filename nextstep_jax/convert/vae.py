"""Flux / NextStep-1 VAE weights ⇄ our `FluxVAE`: one BFL-layout table, diffusers names derived from it.

Accepted sources (`layout`):
  bfl        Flux.1 `ae.safetensors` (keys `encoder.*` / `decoder.*`). The architecture is read from the tensor
             shapes (or from the `nextstep_vae_config` metadata our exporter writes); latent constants default to
             stock Flux (scale 0.3611, shift 0.1159, sampled posterior, no encoder_norm).
  nextstep   NextStep's `vae/` folder: `config.json` (AutoEncoderParams) + `checkpoint.pt` (BFL names, plain torch
             pickle; needs torch) or `model.safetensors` with the same tensors.
  diffusers  `AutoencoderKL` folder: `config.json` + `diffusion_pytorch_model.safetensors`; BFL keys are renamed
             (down→down_blocks, block→resnets, nin_shortcut→conv_shortcut, norm_out→conv_norm_out,
             decoder.up.i→up_blocks.(n−1−i), mid.block_1/attn_1/block_2→mid_block.resnets.0/attentions.0/resnets.1,
             attention 1×1 convs → Linear to_q/to_k/to_v/to_out.0 with group_norm).
  auto       decided from config.json / the tensor names.
Output: a model directory with `nextstep_config.json` ("vae" + "vae_source" sections; others are kept) and Orbax
params at `DIR/vae_params`. `export_vae_bfl` writes a BFL safetensors file back (bit-exact round trip).
Tensors are read one at a time (torch pickles through `torch.load(mmap=True)`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from nextstep_jax import params_io
from nextstep_jax.config import ConfigError, VAEConfig, flux_vae
from nextstep_jax.convert.qwen import abstract_shapes, read_json
from nextstep_jax.convert.safetensors_io import SafetensorsReader
from nextstep_jax.convert.table import ConversionError, Rule, check, export_tensors, import_leaves, parse_dtype
from nextstep_jax.models.flux_vae import FluxVAE, image_multiple
from nextstep_jax.paths import resolve_path

LAYOUTS = ("auto", "bfl", "nextstep", "diffusers")
PARAMS_DIR = "vae_params"
METADATA_KEY = "nextstep_vae_config"
# Stock Flux.1 latent constants (BFL AutoEncoderParams) for sources that carry no config.
FLUX_LATENTS = dict(scaling_factor=0.3611, shift_factor=0.1159, deterministic=False, encoder_norm=False, psz=None)
# Training-only modules that may sit in a NextStep checkpoint (loaded there with strict=False): never VAE weights.
IGNORE = (r"(loss|losses|lpips|perceptual_loss|discriminator|disc)\..*",)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "checkpoint.pt", "ae.safetensors")
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# ----------------------------------------------------------------------------------------------- the table


def bfl_rules(cfg: VAEConfig) -> list[Rule]:
  """The BFL-layout table: our param path ↔ `encoder.down.0.block.0.norm1.weight`-style names."""
  rules: list[Rule] = []

  def conv(ours, theirs):
    rules.extend([Rule(ours + ("kernel",), f"{theirs}.weight", "conv"), Rule(ours + ("bias",), f"{theirs}.bias")])

  def norm(ours, theirs):
    rules.extend([Rule(ours + ("scale",), f"{theirs}.weight"), Rule(ours + ("bias",), f"{theirs}.bias")])

  def resnet(ours, theirs, c_in, c_out):
    for n in ("norm1", "norm2"):
      norm(ours + (n,), f"{theirs}.{n}")
    for n in ("conv1", "conv2") + (("nin_shortcut",) if c_in != c_out else ()):
      conv(ours + (n,), f"{theirs}.{n}")

  def mid(side, c):
    ours, theirs = ("params", side, "mid"), f"{side}.mid"
    resnet(ours + ("block_1",), f"{theirs}.block_1", c, c)
    norm(ours + ("attn_1", "norm"), f"{theirs}.attn_1.norm")
    for n in ("q", "k", "v", "proj_out"):
      conv(ours + ("attn_1", n), f"{theirs}.attn_1.{n}")
    resnet(ours + ("block_2",), f"{theirs}.block_2", c, c)

  enc, dec = ("params", "encoder"), ("params", "decoder")
  n = len(cfg.ch_mult)
  conv(enc + ("conv_in",), "encoder.conv_in")
  c = cfg.ch
  for i, m in enumerate(cfg.ch_mult):
    for j in range(cfg.num_res_blocks):
      resnet(enc + (f"down_{i}", f"block_{j}"), f"encoder.down.{i}.block.{j}", c, cfg.ch * m)
      c = cfg.ch * m
    if i != n - 1:
      conv(enc + (f"down_{i}", "downsample", "conv"), f"encoder.down.{i}.downsample.conv")
  mid("encoder", c)
  norm(enc + ("norm_out",), "encoder.norm_out")
  conv(enc + ("conv_out",), "encoder.conv_out")

  conv(dec + ("conv_in",), "decoder.conv_in")
  c = cfg.ch * cfg.ch_mult[-1]
  mid("decoder", c)
  for i in reversed(range(n)):
    for j in range(cfg.num_res_blocks + 1):
      resnet(dec + (f"up_{i}", f"block_{j}"), f"decoder.up.{i}.block.{j}", c, cfg.ch * cfg.ch_mult[i])
      c = cfg.ch * cfg.ch_mult[i]
    if i != 0:
      conv(dec + (f"up_{i}", "upsample", "conv"), f"decoder.up.{i}.upsample.conv")
  norm(dec + ("norm_out",), "decoder.norm_out")
  conv(dec + ("conv_out",), "decoder.conv_out")
  return rules


_DIFFUSERS_RENAMES = (
    (".down.", ".down_blocks."), (".block.", ".resnets."), ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"), (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.", ".mid_block.attentions.0."), (".attentions.0.norm.", ".attentions.0.group_norm."),
    (".attentions.0.q.", ".attentions.0.to_q."), (".attentions.0.k.", ".attentions.0.to_k."),
    (".attentions.0.v.", ".attentions.0.to_v."), (".attentions.0.proj_out.", ".attentions.0.to_out.0."),
)


def diffusers_name(bfl_key: str, n_levels: int) -> str:
  """BFL key → diffusers `AutoencoderKL` key (decoder levels are reversed: up.i → up_blocks.(n−1−i))."""
  key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.", bfl_key)
  key = key.replace("decoder.up.", "decoder.up_blocks.")
  for old, new in _DIFFUSERS_RENAMES:
    key = key.replace(old, new)
  return key


def diffusers_rules(cfg: VAEConfig) -> list[Rule]:
  """The BFL table renamed; attention 1×1 conv kernels become torch Linear weights (`linear`, n_in=3)."""
  out = []
  for r in bfl_rules(cfg):
    name = diffusers_name(r.theirs, len(cfg.ch_mult))
    linear = r.kind == "conv" and ".attentions.0." in name
    out.append(dataclasses.replace(r, theirs=name, kind="linear" if linear else r.kind, n_in=3 if linear else 1))
  return out


def vae_rules(cfg: VAEConfig, layout: str) -> list[Rule]:
  return diffusers_rules(cfg) if layout == "diffusers" else bfl_rules(cfg)


def vae_shapes(cfg: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {param path: shape} of `FluxVAE(cfg)` (nothing allocated)."""
  m = image_multiple(cfg)
  return abstract_shapes(FluxVAE(cfg), jnp.zeros((1, m, m, cfg.in_channels), jnp.float32))

# ----------------------------------------------------------------------------------------------- configs


def vae_config_from_nextstep(d: dict[str, Any], **overrides) -> VAEConfig:
  """NextStep `vae/config.json` (official AutoEncoderParams fields) → VAEConfig."""
  fields = {k: v for k, v in d.items() if not k.startswith("_")}
  if "ch_mult" not in fields:
    raise ConfigError("NextStep VAE config.json has no 'ch_mult'; is this a diffusers config? use --layout diffusers")
  return VAEConfig.from_dict({**fields, **overrides})


def vae_config_from_diffusers(d: dict[str, Any], **overrides) -> VAEConfig:
  """diffusers `AutoencoderKL` config.json (Flux-style: no quant convs) → VAEConfig."""
  for key in ("use_quant_conv", "use_post_quant_conv"):
    if d.get(key, True):  # diffusers defaults both to true
      raise ConfigError(f"diffusers VAE config has {key}={d.get(key, 'true (default)')}; only Flux-style autoencoders "
                        f"without quant_conv/post_quant_conv are supported (Flux.1 sets both to false)")
  checks = {"norm_num_groups": 32, "act_fn": "silu", "mid_block_add_attention": True, "latents_mean": None,
            "latents_std": None}
  for key, want in checks.items():
    if d.get(key, want) != want:
      raise ConfigError(f"diffusers VAE config has {key}={d[key]!r}; only {want!r} (the Flux VAE) is supported")
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    bad = sorted(set(d.get(key, [want])) - {want})
    if bad:
      raise ConfigError(f"diffusers VAE config has {key} {bad}; only {want} is supported")
  try:
    boc = list(d["block_out_channels"])
  except KeyError:
    raise ConfigError("diffusers VAE config.json has no 'block_out_channels'; is this a NextStep/BFL config? "
                      "use --layout nextstep") from None
  ch = boc[0]
  if any(b % ch for b in boc):
    raise ConfigError(f"block_out_channels={boc} are not multiples of the first entry {ch}")
  shift = d.get("shift_factor")
  fields = dict(resolution=d.get("sample_size", 256), in_channels=d.get("in_channels", 3), ch=ch,
                out_ch=d.get("out_channels", 3), ch_mult=tuple(b // ch for b in boc),
                num_res_blocks=d.get("layers_per_block", 1), z_channels=d.get("latent_channels", 4),
                scaling_factor=float(d.get("scaling_factor", 0.18215)), shift_factor=float(shift or 0.0),
                deterministic=bool(d.get("deterministic", False)),
                encoder_norm=bool(d.get("normalize_latents", d.get("encoder_norm", False))),
                psz=d.get("patch_size", d.get("psz")))
  fields.update(overrides)
  return VAEConfig(**fields).validate()


def infer_bfl_config(reader: Any, **latent_fields) -> VAEConfig:
  """Architecture of a config-less BFL checkpoint from its tensor shapes (stock Flux latent constants)."""
  keys = set(reader.keys())
  try:
    ch, in_ch = reader.shape("encoder.conv_in.weight")[:2]
    levels = 1 + max(int(m[1]) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m[1]) for k in keys if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    ch_mult = tuple(reader.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    fields = dict(flux_vae(), in_channels=in_ch, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                  z_channels=reader.shape("decoder.conv_in.weight")[1],
                  out_ch=reader.shape("decoder.conv_out.weight")[0])
  except (KeyError, ValueError) as e:
    raise ConversionError(f"cannot read the autoencoder architecture from the tensor names ({e}); expected BFL "
                          f"keys such as encoder.conv_in.weight and encoder.down.0.block.0.conv1.weight") from None
  return VAEConfig(**{**fields, **FLUX_LATENTS, **latent_fields}).validate()

# ----------------------------------------------------------------------------------------------- sources


class TorchStateReader:
  """A torch state-dict pickle with the SafetensorsReader interface; tensors are memory-mapped, read one at a time."""

  def __init__(self, path: str | Path):
    try:
      import torch
    except ImportError:
      raise ConversionError(f"reading {path} needs PyTorch (pip install torch), or pass the safetensors copy "
                            f"(vae/model.safetensors) instead") from None
    self._torch = torch
    try:
      try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / non-torch files
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ConversionError(f"cannot read torch checkpoint {path}: {first}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
      sd = sd["state_dict"]
    if not isinstance(sd, dict):
      raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

  def keys(self) -> list[str]:
    return list(self._sd)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._sd[key].shape)

  def dtype(self, key: str) -> str:
    return _ST_DTYPES.get(str(self._sd[key].dtype).removeprefix("torch."), str(self._sd[key].dtype))

  def get(self, key: str) -> np.ndarray:
    t = self._sd[key].detach()
    if t.dtype == self._torch.bfloat16:
      return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class VAESource(NamedTuple):
  layout: str
  path: Path
  reader: Any
  cfg: VAEConfig


def _open_reader(path: Path) -> Any:
  if path.suffix in _TORCH_SUFFIXES:
    return TorchStateReader(path)
  return SafetensorsReader(path)


def _safetensors_metadata(path: Path) -> dict[str, str]:
  if path.suffix != ".safetensors":
    return {}
  with safe_open(path, framework="np") as h:
    return h.metadata() or {}


def open_vae_source(src: str | Path, layout: str = "auto", **overrides) -> VAESource:
  """Finds the weights file and config for `src` (a file or folder; a repo root with `vae/` is accepted)."""
  if layout not in LAYOUTS:
    raise ConfigError(f"unknown VAE layout {layout!r}; use one of {', '.join(LAYOUTS)}")
  src = Path(src)
  if src.is_dir() and not any((src / f).is_file() for f in _WEIGHT_FILES) and (src / "vae").is_dir():
    src = src / "vae"
  if src.is_dir():
    found = [src / f for f in _WEIGHT_FILES if (src / f).is_file()]
    if not found:
      raise FileNotFoundError(f"no VAE weights in {src}; expected one of {', '.join(_WEIGHT_FILES)}")
    weights = found[0]
  elif src.is_file():
    weights = src
  else:
    raise FileNotFoundError(f"VAE checkpoint {src} does not exist")
  config_file = weights.parent / "config.json"
  config = read_json(config_file, "VAE config.json") if config_file.is_file() else None
  reader = _open_reader(weights)
  if layout == "auto":
    if config is not None and "block_out_channels" in config:
      layout = "diffusers"
    elif config is not None and "ch_mult" in config:
      layout = "nextstep"
    elif any(k.startswith("encoder.down_blocks.") for k in reader.keys()):
      layout = "diffusers"
    else:
      layout = "bfl"
  if layout in ("diffusers", "nextstep") and config is None:
    raise FileNotFoundError(f"a {layout} VAE needs {config_file} beside {weights.name}")
  if layout == "diffusers":
    cfg = vae_config_from_diffusers(config, **overrides)
  elif layout == "nextstep":
    cfg = vae_config_from_nextstep(config, **overrides)
  elif METADATA_KEY in (meta := _safetensors_metadata(weights)):
    cfg = VAEConfig.from_dict({**json.loads(meta[METADATA_KEY]), **overrides})
  else:
    cfg = infer_bfl_config(reader, **overrides)
  return VAESource(layout, weights, reader, cfg)

# ----------------------------------------------------------------------------------------------- entry points


def convert_vae(src: str | Path, dst: str | Path, layout: str = "auto", dtype: str | None = None,
                overwrite: bool = False) -> VAEConfig:
  """VAE checkpoint → `dst/vae_params` (Orbax) + the "vae" section of `dst/nextstep_config.json`."""
  dst = Path(dst)
  np_dtype = parse_dtype(dtype)
  source = open_vae_source(src, layout, **({"param_dtype": np_dtype.name} if np_dtype is not None else {}))
  cfg, reader = source.cfg, source.reader
  shapes = vae_shapes(cfg)
  rules = vae_rules(cfg, source.layout)
  check(rules, reader.keys(), reader.shape, shapes, ignore=IGNORE,
        what=f"{source.layout} VAE checkpoint {source.path}")
  params_io.save_params_streaming(dst / PARAMS_DIR, import_leaves(rules, reader.get, shapes, np_dtype),
                                  overwrite=overwrite)
  params_io.write_model_config(dst, {"vae": cfg, "vae_source": {
      "format": source.layout, "path": str(source.path), "dtype": reader.dtype(rules[0].theirs)}})
  return cfg


def load_vae(model_dir: str | Path, target: Any = None) -> tuple[VAEConfig, Any]:
  """(VAEConfig, {"params": …}) from a model directory written by `convert_vae` (or a training export)."""
  meta = params_io.read_model_config(model_dir)
  if "vae" not in meta:
    raise ConfigError(f"{model_dir} has no VAE (no 'vae' section in {params_io.CONFIG_NAME}); "
                      f"convert one with `nextstep-jax convert vae --dst {model_dir}`")
  return VAEConfig.from_dict(meta["vae"]), params_io.load_params(Path(model_dir) / PARAMS_DIR, target)


def nextstep_vae_config(cfg: VAEConfig) -> dict[str, Any]:
  """The official `vae/config.json` (AutoEncoderParams fields) for `cfg`."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dtype", "param_dtype")}


def export_vae_bfl(model_dir: str | Path, dst_file: str | Path, dtype: str | None = None,
                   overwrite: bool = False, write_config: bool = False) -> Path:
  """Model directory → one BFL-layout safetensors file (our config in its metadata, so it converts back as is).

  `write_config=True` also writes the NextStep `config.json` beside it (a release `vae/` folder).
  """
  dst_file = resolve_path(dst_file)
  if dst_file.exists() and not overwrite:
    raise FileExistsError(f"{dst_file} already exists; choose a new destination or pass --overwrite")
  cfg, params = load_vae(model_dir)
  flat = traverse_util.flatten_dict(params)
  tensors = dict(export_tensors(bfl_rules(cfg), flat.__getitem__, parse_dtype(dtype)))
  dst_file.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst_file.with_name(f".{dst_file.name}.partial")  # renamed at the end: never a half-written file
  save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(cfg))})
  os.replace(tmp, dst_file)
  if write_config:
    (dst_file.parent / "config.json").write_text(json.dumps(nextstep_vae_config(cfg), indent=2))
  return dst_file
