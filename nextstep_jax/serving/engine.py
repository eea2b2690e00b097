"""Continuous-batching generation engine: S decode slots advanced together one image token per `step`.

    engine = Engine.from_sampler(sampler, EngineConfig(slots=8, height=512, width=512))
    engine.warm_up()                      # compiles prefill (every prompt bucket), step and decode
    slot = engine.start(engine.prepare(Request("a red cube", seed=3)))
    while engine.active: finished = engine.step()        # [slot, ...] whose images are complete
    images = engine.decode(engine.tokens(finished))

Requests join a free slot at any token boundary (prefill) and leave the moment their last token is sampled, so
the batch stays full while users come and go. An image depends only on its request (prompt, guidance, seed):
`Engine` and `Sampler.text_to_image` / `Sampler.edit` with one image and the same seed draw the same noise.
One engine serves one mode: "t2i" (2 CFG branches) or "edit" (3 branches, the source image in the prompt).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.images import resize_center_crop
from nextstep_jax.models.image_grid import check_grids_fit
from nextstep_jax.models.latents import token_grid
from nextstep_jax.sampling import flow
from nextstep_jax.sampling.pipeline import EDIT_NEGATIVE, T2I_NEGATIVE, T2I_POSITIVE
from nextstep_jax.serving import programs as P
from nextstep_jax.tokens import IMAGE_TAG, left_pad

MODES = ("t2i", "edit")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  slots: int = 4
  height: int = 512
  width: int = 512
  mode: str = "t2i"
  steps: int = 50
  method: str = "sde_a"
  shift: float | None = None  # None: 1.0 for text-to-image, 3.2 for editing (the official defaults)
  cfg_schedule: str = "constant"
  use_norm: bool = True
  prompt_buckets: tuple[int, ...] = (32, 64, 128, 256)  # editing: text tokens besides the source image's
  decode_batches: tuple[int, ...] = ()  # VAE decode batch sizes; () = powers of two up to `slots`
  positive_prompt: str | None = T2I_POSITIVE  # defaults a request may override
  negative_prompt: str | None = None  # None: the official default of the mode

  def validate(self) -> "EngineConfig":
    if self.mode not in MODES:
      raise ValueError(f"engine mode {self.mode!r} is not one of {MODES}")
    if self.slots < 1:
      raise ValueError(f"--slots {self.slots} must be ≥ 1")
    if not self.prompt_buckets or min(self.prompt_buckets) < 1:
      raise ValueError(f"prompt buckets {self.prompt_buckets} must be positive lengths")
    flow.guidance_scale(jnp.float32(1), self.cfg_schedule, 0, 1)
    return self

  @property
  def branches(self) -> int:
    return 3 if self.mode == "edit" else 2

  @property
  def flow(self) -> flow.FlowConfig:
    shift = (3.2 if self.mode == "edit" else 1.0) if self.shift is None else self.shift
    return flow.FlowConfig(self.method, self.steps, shift).validate()

  def decode_sizes(self) -> tuple[int, ...]:
    if self.decode_batches:
      return tuple(sorted(set(self.decode_batches)))
    return tuple(sorted({min(2**i, self.slots) for i in range(math.ceil(math.log2(self.slots)) + 1)}))


@dataclasses.dataclass(frozen=True)
class Request:
  """One image. `image` (H, W, 3) uint8 for editing (resized to the engine's size); cfg ≤ 1 disables guidance."""
  prompt: str
  seed: int = 0
  cfg: float = 7.5
  cfg_img: float = 2.0
  negative_prompt: str | None = None  # None: the engine's default
  positive_prompt: str | None = None  # None: the engine's default (text-to-image)
  image: np.ndarray | None = None


@dataclasses.dataclass
class Prepared:
  """A request turned into the prefill program's inputs (built at the edge: bad input fails before queueing)."""
  request: Request
  ids: np.ndarray  # (B, P) int32
  mask: np.ndarray  # (B, P) int32
  cfg: float
  cfg_img: float
  key_data: np.ndarray
  pixels: np.ndarray | None = None  # (1, H, W, 3) float32 in [−1, 1]
  src_branches: np.ndarray | None = None  # (B,) bool


class Engine:
  """Host side of the slot programs: prompt rows, slot bookkeeping, the token index mirror, warm-up."""

  def __init__(self, cfg: ModelConfig, params: Any, vae_cfg: VAEConfig, vae_params: Any, tokenizer: Any,
               config: EngineConfig, mesh: jax.sharding.Mesh | None = None):
    self.config = config = config.validate()
    if vae_cfg is None:
      raise ValueError("the engine needs a VAE (vae_params/) to encode sources and decode images")
    if tokenizer is None:
      raise ValueError("the engine needs the model's tokenizer/ directory")
    self.cfg, self.params, self.vae_cfg, self.vae_params, self.tokenizer = cfg, params, vae_cfg, vae_params, tokenizer
    self.mesh = mesh
    self.grid = token_grid(config.height, config.width, vae_cfg.downsample_factor, cfg.latent_patch_size)
    check_grids_fit(cfg, [self.grid], "serve a smaller --size")
    n = self.grid[0] * self.grid[1]
    self.src_tokens = n if config.mode == "edit" else 0
    self.buckets = tuple(sorted(b + self.src_tokens for b in set(config.prompt_buckets)))
    cache_len = self.buckets[-1] + n
    if cache_len > cfg.max_position_embeddings:
      raise ValueError(f"prompt bucket {self.buckets[-1]} + {n} image tokens exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}; use smaller prompt buckets or a smaller --size")
    self.spec = P.SlotSpec(slots=config.slots, branches=config.branches, grid_h=self.grid[0], grid_w=self.grid[1],
                           cache_len=cache_len, flow=config.flow, use_norm=config.use_norm,
                           cfg_schedule=config.cfg_schedule, src_tokens=self.src_tokens,
                           per_layer="unstacked_layers" in params)
    self.programs = P.programs(cfg, vae_cfg, self.spec, mesh if mesh is not None and mesh.size > 1 else None)
    with sharding.use_mesh(self.mesh):
      self.state = jax.jit(P.init_state, static_argnums=(0, 1),
                           **self._out_shardings())(cfg, self.spec)
    self.slot_index = [None] * config.slots  # host mirror of each slot's token index; None = free
    self.prefill_bucket = {}

  @classmethod
  def from_sampler(cls, sampler: Any, config: EngineConfig) -> "Engine":
    """Shares a loaded `Sampler`'s parameters (its decode layout and mesh)."""
    return cls(sampler.cfg, sampler.params, sampler.vae_cfg, sampler.vae_params, sampler.tokenizer, config,
               sampler.mesh)

  def _out_shardings(self) -> dict:
    if self.mesh is None or self.mesh.size == 1:
      return {}
    return dict(out_shardings=P.state_shardings(self.cfg, self.spec, self.mesh))

  # ------------------------------------------------------------------------------------------- requests

  @property
  def num_tokens(self) -> int:
    return self.spec.num_tokens

  @property
  def free_slots(self) -> list[int]:
    return [s for s, k in enumerate(self.slot_index) if k is None]

  @property
  def active(self) -> list[int]:
    return [s for s, k in enumerate(self.slot_index) if k is not None and k < self.num_tokens]

  def prepare(self, req: Request) -> Prepared:
    """Prompt rows, bucket and guidance of one request; raises ValueError (one line) on bad input."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
      raise ValueError("prompt must be a non-empty string")
    for name in ("cfg", "cfg_img"):
      v = getattr(req, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and 1 <= v <= 100):
        raise ValueError(f"{name}={v!r} must be a finite number in [1, 100] (1 disables guidance)")
    if not (isinstance(req.seed, int) and 0 <= req.seed < 2**63):
      raise ValueError(f"seed={req.seed!r} must be an integer in [0, 2^63)")
    c = self.config
    neg = req.negative_prompt if req.negative_prompt is not None else c.negative_prompt
    gh, gw = self.grid
    tok = self.tokenizer
    if c.mode == "t2i":
      if req.image is not None:
        raise ValueError("a text-to-image request takes no image; send it to the edits endpoint")
      pos = req.positive_prompt if req.positive_prompt is not None else c.positive_prompt
      rows = tok.t2i_cfg_rows([req.prompt], gh, gw, 1, pos, T2I_NEGATIVE if neg is None else neg, cfg=True)
      cfg_img, pixels, src_branches = 1.0, None, None
    else:
      pixels = self._source_pixels(req.image)
      caption = req.prompt if IMAGE_TAG in req.prompt else IMAGE_TAG + req.prompt
      neg = EDIT_NEGATIVE if neg is None else neg
      use_img = req.cfg > 1 and req.cfg_img > 1
      rows = tok.edit_cfg_rows(caption, gh, gw, gh, gw, neg, 1, cfg=True, image_cfg=use_img)
      if not use_img:  # the sampler's 2-branch form [cond; text-uncond]: both uncond branches text-only
        rows = [rows[0], rows[1], rows[1]]
      src_branches = np.array([True, use_img, False])
      cfg_img = req.cfg_img if use_img else 1.0
    try:
      ids, mask = left_pad(rows, self.cfg.pad_token_id, self.buckets)
    except ValueError:
      longest = max(len(r) for r in rows) - self.src_tokens
      raise ValueError(f"prompt is too long: {longest} tokens with the generation prefix, at most "
                       f"{self.buckets[-1] - self.src_tokens}; shorten it") from None
    return Prepared(req, ids, mask, float(req.cfg), float(cfg_img), P.numpy_key_data(req.seed), pixels,
                    src_branches)

  def _source_pixels(self, image: Any) -> np.ndarray:
    if image is None:
      raise ValueError("an edit request needs a source image")
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
      raise ValueError(f"source image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    h, w = self.config.height, self.config.width
    if img.shape[:2] != (h, w):
      img = resize_center_crop(img, (h, w))
    return (img[None].astype(np.float32) / 127.5 - 1.0)

  # ------------------------------------------------------------------------------------------- programs

  def start(self, prep: Prepared, slot: int | None = None) -> int:
    """Prefills `prep` into a free slot (the first one unless given) and returns the slot."""
    free = self.free_slots
    if not free:
      raise RuntimeError("no free slot")
    slot = free[0] if slot is None else slot
    if self.slot_index[slot] is not None:
      raise RuntimeError(f"slot {slot} is busy")
    src = (None, None) if prep.pixels is None else (jnp.asarray(prep.pixels), jnp.asarray(prep.src_branches))
    with sharding.use_mesh(self.mesh):
      self.state = self.programs.prefill(self.params, self.vae_params, self.state, jnp.int32(slot),
                                         jnp.asarray(prep.ids), jnp.asarray(prep.mask), *src,
                                         jnp.float32(prep.cfg), jnp.float32(prep.cfg_img),
                                         jnp.asarray(prep.key_data))
    self.slot_index[slot] = 0
    return slot

  def step(self) -> list[int]:
    """Advances every active slot by one token; returns the slots whose last token was just sampled."""
    active = self.active
    if not active:
      return []
    mask = np.zeros(self.config.slots, bool)
    mask[active] = True
    with sharding.use_mesh(self.mesh):
      self.state = self.programs.step(self.params, self.state, jnp.asarray(mask))
    done = []
    for s in active:
      self.slot_index[s] += 1
      if self.slot_index[s] == self.num_tokens:
        done.append(s)
    return done

  def tokens(self, slots: list[int]) -> np.ndarray:
    """(len(slots), n, K) fp32 tokens of finished slots; frees them."""
    out = np.asarray(jax.device_get(self.state.tokens))[np.asarray(slots, int)] if slots else None
    for s in slots:
      self.free(s)
    return out

  def free(self, slot: int) -> None:
    """Releases a slot (finished or cancelled); its rows are overwritten by the next prefill."""
    self.slot_index[slot] = None

  def decode(self, tokens_DxNxK: np.ndarray) -> np.ndarray:
    """uint8 images (D, H, W, 3), in batches of the configured decode sizes (padded with repeats)."""
    sizes = self.config.decode_sizes()
    out, i = [], 0
    while i < len(tokens_DxNxK):
      left = len(tokens_DxNxK) - i
      size = next((s for s in sizes if s >= left), sizes[-1])
      chunk = tokens_DxNxK[i:i + size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)]) if len(chunk) < size else chunk
      with sharding.use_mesh(self.mesh):
        out.append(np.asarray(self.programs.decode(self.vae_params, jnp.asarray(padded)))[:len(chunk)])
      i += len(chunk)
    return np.concatenate(out) if out else np.zeros((0, self.config.height, self.config.width, 3), np.uint8)

  def warm_up(self) -> None:
    """Compiles (or loads from the persistent cache) every program: one prefill per bucket, step, decode sizes."""
    base = self.prepare(self._warm_request())
    short = base.ids.shape[1]
    for bucket in self.buckets:
      ids = np.full((self.spec.branches, bucket), self.cfg.pad_token_id, np.int32)
      mask = np.zeros_like(ids)
      ids[:, -short:], mask[:, -short:] = base.ids, base.mask
      self.start(dataclasses.replace(base, ids=ids, mask=mask), 0)
      self.free(0)
    self.start(base, 0)
    self.step()
    self.free(0)
    for size in self.config.decode_sizes():
      self.decode(np.zeros((size, self.num_tokens, self.cfg.token_dim), np.float32))
    jax.block_until_ready(self.state)

  def _warm_request(self) -> Request:
    image = None
    if self.config.mode == "edit":
      image = np.zeros((self.config.height, self.config.width, 3), np.uint8)
    return Request("a", image=image, negative_prompt="", positive_prompt="")

  def generate(self, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
    """Serves `requests` to completion (joining as slots free up): (tokens (N, n, K), images (N, H, W, 3))."""
    pending = list(enumerate(self.prepare(r) for r in requests))
    owner, tokens = {}, [None] * len(requests)
    while pending or self.active:
      while pending and self.free_slots:
        i, prep = pending.pop(0)
        owner[self.start(prep)] = i
      done = self.step()
      for s, t in zip(done, self.tokens(done) if done else []):
        tokens[owner.pop(s)] = t
    toks = np.stack(tokens)
    return toks, self.decode(toks)
