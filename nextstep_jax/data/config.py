"""`config.data`: defaults in one function, and validation into a frozen `DataConfig` with one-line errors."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from nextstep_jax.config import ConfigError
from nextstep_jax.data.buckets import BUCKET_MODES, bucket_grids
from nextstep_jax.tokens import EditDropProbs

SOURCE_KINDS = ("t2i", "edit", "text", "interleave")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of `config.data` (official recipe values where the spec gives them)."""
  return ml_collections.ConfigDict(dict(
      # [{name, path, weight, kind}]: path = a dataset built by `nextstep-jax data build` (text) or cached by
      # `nextstep-jax data encode` (t2i / edit latents); kind "" = read from the dataset; weights need not sum to 1.
      sources=[dict(name="main", path="", weight=1.0, kind="")],
      tokenizer="",  # tokenizer directory (model dir or `make_byte_tokenizer` output)
      resolution=256,  # side of the square bucket in pixels (official: 256 then 512)
      buckets="aspect",  # "aspect": official HW_ASPECT_RATIOS scaled to `resolution`; "fixed": one square bucket
      down_factor=16,  # pixels per token side = VAE down factor × patch size (f8 × 2)
      token_dim=64,  # latent channels × patch²
      seq_len=2048,  # tokens per packed row (official packs to 8192)
      max_image_tokens=0,  # T: image-token slots per row; 0 = seq_len
      pack=True,  # several samples per row (no cross-sample masking, like the official packing)
      reset_positions_per_sample=False,  # official: positions run 0..L-1 across the whole pack
      drop_text_prob=0.1,  # t2i: image block first, caption after (CFG); 0.3 in the 14B config
      edit_tags_at_end_prob=0.1,  # edit: instruction first, both images after it
      edit_drop_prob=0.2,  # edit: drop source image / text / both (equal thirds)
      on_too_long="drop",  # "drop" (skip + count + warn) or "error"
      min_size_ratio=1.0,  # images smaller than ratio × their bucket are skipped (1.0: never upscale)
      seed=0,
      num_epochs=0,  # 0 = repeat forever (reshuffled every epoch)
      global_batch_size=8,  # rows per step over all processes
      num_workers=0,  # Grain worker processes (spawned); 0 = in-process
      worker_buffer_size=2,  # batches buffered per worker
      read_threads=4,  # threads reading + transforming records (per process / worker)
      read_buffer_size=64,  # records prefetched by those threads
      encode_on_the_fly=False,  # True: raw-image t2i sources → `pixel_values` (train step runs the VAE encoder)
      max_warnings_per_reason=100,  # skipped records are always counted; warnings stop after this many per reason
      elastic_resume=False,  # True: one global mixture stream split by process, so a checkpoint restores onto a
      # different number of processes without repeating or skipping samples (data/elastic.py; num_workers=0)
  ))


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  path: str
  weight: float
  kind: str  # "" until resolved against the dataset


@dataclasses.dataclass(frozen=True)
class DataConfig:
  sources: tuple[SourceSpec, ...]
  tokenizer: str
  resolution: int
  buckets: str
  down_factor: int
  token_dim: int
  seq_len: int
  max_image_tokens: int
  pack: bool
  reset_positions_per_sample: bool
  drop_text_prob: float
  edit_tags_at_end_prob: float
  edit_drop_prob: float
  on_too_long: str
  min_size_ratio: float
  seed: int
  num_epochs: int
  global_batch_size: int
  num_workers: int
  worker_buffer_size: int
  read_threads: int
  read_buffer_size: int
  encode_on_the_fly: bool
  max_warnings_per_reason: int
  elastic_resume: bool = False

  @property
  def image_slots(self) -> int:
    """T, the static number of image-token slots per row."""
    return self.max_image_tokens or self.seq_len

  @property
  def grids(self) -> tuple[tuple[int, int], ...]:
    return bucket_grids(self.resolution, self.down_factor, self.buckets)

  @property
  def edit_drops(self) -> EditDropProbs:
    return EditDropProbs(tags_at_end=self.edit_tags_at_end_prob, drop=self.edit_drop_prob)

  def local_batch_size(self, process_count: int) -> int:
    if self.global_batch_size % process_count:
      raise ConfigError(f"config.data.global_batch_size={self.global_batch_size} is not divisible by the "
                        f"{process_count} processes; use a multiple of {process_count}")
    return self.global_batch_size // process_count


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def validate_data_config(cfg: Any) -> DataConfig:
  """`config.data` (ConfigDict or dict) → DataConfig; raises ConfigError naming the field and the fix."""
  d = cfg.to_dict() if isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)) else dict(cfg)
  p = "config.data"
  defaults = default_data_config().to_dict()
  unknown = sorted(set(d) - set(defaults))
  _check(not unknown, f"{p} has unknown field(s) {unknown}; known fields: {sorted(defaults)}")
  d = {**defaults, **d}
  raw_sources = d["sources"]
  _check(isinstance(raw_sources, (list, tuple)) and len(raw_sources) > 0,
         f"{p}.sources must be a non-empty list of {{name, path, weight, kind}}")
  sources = []
  for i, s in enumerate(raw_sources):
    s = dict(s)
    extra = sorted(set(s) - {"name", "path", "weight", "kind"})
    _check(not extra, f"{p}.sources[{i}] has unknown key(s) {extra}; allowed: name, path, weight, kind")
    _check(bool(s.get("path")), f"{p}.sources[{i}].path is empty; point it at a dataset directory "
           f"(nextstep-jax data build / data encode)")
    weight = float(s.get("weight", 1.0))
    _check(weight > 0, f"{p}.sources[{i}].weight={weight} must be > 0")
    kind = s.get("kind", "") or ""
    _check(kind in ("",) + SOURCE_KINDS, f"{p}.sources[{i}].kind={kind!r} is not one of {SOURCE_KINDS} (or '')")
    sources.append(SourceSpec(str(s.get("name") or f"source{i}"), str(s["path"]), weight, kind))
  names = [s.name for s in sources]
  _check(len(set(names)) == len(names), f"{p}.sources names {names} must be unique")
  for name in ("resolution", "down_factor", "token_dim", "seq_len", "global_batch_size", "read_threads",
               "read_buffer_size", "worker_buffer_size"):
    _check(isinstance(d[name], int) and d[name] > 0, f"{p}.{name}={d[name]!r} must be a positive integer")
  for name in ("max_image_tokens", "num_epochs", "num_workers", "seed", "max_warnings_per_reason"):
    _check(isinstance(d[name], int) and d[name] >= 0, f"{p}.{name}={d[name]!r} must be an integer >= 0")
  _check(d["max_image_tokens"] <= d["seq_len"],
         f"{p}.max_image_tokens={d['max_image_tokens']} exceeds seq_len={d['seq_len']}; every image token is a "
         f"sequence position, so use at most seq_len (0 = seq_len)")
  for name in ("drop_text_prob", "edit_tags_at_end_prob", "edit_drop_prob"):
    _check(0.0 <= float(d[name]) <= 1.0, f"{p}.{name}={d[name]} must be a probability in [0, 1]")
  _check(d["buckets"] in BUCKET_MODES, f"{p}.buckets={d['buckets']!r} is not one of {BUCKET_MODES}")
  _check(d["on_too_long"] in ("drop", "error"), f"{p}.on_too_long={d['on_too_long']!r} must be 'drop' or 'error'")
  _check(0 < float(d["min_size_ratio"]) <= 1.0, f"{p}.min_size_ratio={d['min_size_ratio']} must be in (0, 1]")
  _check(bool(d["tokenizer"]), f"{p}.tokenizer is empty; set it to a tokenizer directory")
  try:
    bucket_grids(d["resolution"], d["down_factor"], d["buckets"])
  except ValueError as e:
    raise ConfigError(f"{p}: {e}") from None
  if d["encode_on_the_fly"]:
    _check(d["buckets"] == "fixed", f"{p}.encode_on_the_fly=True needs buckets='fixed' (pixel_values have one "
           f"static shape); use aspect buckets through a latent cache (nextstep-jax data encode)")
    _check(not d["pack"], f"{p}.encode_on_the_fly=True needs pack=False (one image per row)")
  out = DataConfig(sources=tuple(sources), **{k: d[k] for k in defaults if k != "sources"})
  return dataclasses.replace(out, drop_text_prob=float(out.drop_text_prob), min_size_ratio=float(out.min_size_ratio),
                             edit_tags_at_end_prob=float(out.edit_tags_at_end_prob),
                             edit_drop_prob=float(out.edit_drop_prob))
