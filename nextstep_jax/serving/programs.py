"""The engine's three compiled programs over a fixed set of decode slots: prefill one slot, step all, VAE decode.

Rows are branch-major like the sampler's: row r = b·S + s holds CFG branch b of slot s (S slots, B branches),
so `flow.combine_branches` guides every slot at once. Each slot owns the same rows of every layer's KV cache
(R, G, L, K), L = largest prompt bucket + image tokens; a slot's prompt sits at columns [0, P) (left-padded to
its bucket P, pads masked) and its image token k at column P + k — the sampler's raw positions, so RoPE, the
per-token gen_pos_embed and the CFG schedule all follow the slot's own token index. The step writes each row at
its own column (`qwen2.write_cache` with per-row indices). Inactive slots are computed and ignored (static shapes).

Noise depends only on (request seed, token index): token k of a slot draws
normal(fold_in(key(seed), k), (1 + SDE draws, 1, K)) — `Sampler` draws exactly this for one image per call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.latents import patchify
from nextstep_jax.models.layers import parameter_free_layer_norm, to_dtype
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.models.qwen2 import CACHE_NAMES
from nextstep_jax.sampling import flow
from nextstep_jax.sampling.decode_layout import hidden, init_cache, unpack
from nextstep_jax.sampling.generate import decode_tokens


@dataclasses.dataclass(frozen=True)
class SlotSpec:
  """Static shape/behaviour of one engine's programs (the compile key)."""
  slots: int  # S
  branches: int  # B: 1 (no CFG), 2 (text CFG), 3 (editing CFG)
  grid_h: int
  grid_w: int
  cache_len: int  # L = largest prompt bucket + image tokens
  flow: flow.FlowConfig = flow.FlowConfig()
  use_norm: bool = True
  cfg_schedule: str = "constant"
  src_tokens: int = 0  # source-image tokens per prompt (editing); encoded by the prefill program
  per_layer: bool = True  # per-layer params/caches (CPU/GPU decode layout) vs stacked (TPU)

  @property
  def rows(self) -> int:
    return self.branches * self.slots

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w


@flax.struct.dataclass
class SlotState:
  """Device state of all slots (donated to every program)."""
  cache: Any  # per-layer {"k", "v"}: (R, G, L, K) each, or stacked (layers, R, G, L, K)
  h_last: jax.Array  # (R, D) final-normed hidden of each row's last position (conditions the next token)
  key_valid: jax.Array  # (R, L) bool: prompt pads are False
  tokens: jax.Array  # (S, n, K) fp32 generated tokens
  token_index: jax.Array  # (S,) int32: the next token each slot generates
  prompt_len: jax.Array  # (S,) int32: the slot's prompt bucket P
  cfg: jax.Array  # (S,) fp32 text guidance
  cfg_img: jax.Array  # (S,) fp32 image guidance (editing)
  key_data: jax.Array  # (S, 2) uint32: jax.random.key_data(key(seed))


def _names(spec: SlotSpec) -> SlotState:
  """Logical axis names of every state leaf (rows and slots over the batch axes)."""
  cache_names = CACHE_NAMES[1:] if spec.per_layer else CACHE_NAMES
  return SlotState(cache=cache_names, h_last=("act_batch", None), key_valid=("act_batch", None),
                   tokens=("act_batch", None, None), token_index=("act_batch",), prompt_len=("act_batch",),
                   cfg=("act_batch",), cfg_img=("act_batch",), key_data=("act_batch", None))


def init_state(cfg: ModelConfig, spec: SlotSpec) -> SlotState:
  """Zeroed state (every slot free)."""
  s, r = spec.slots, spec.rows
  return SlotState(
      cache=init_cache(cfg, r, spec.cache_len, to_dtype(cfg.dtype), per_layer=spec.per_layer),
      h_last=jnp.zeros((r, cfg.hidden_size), to_dtype(cfg.dtype)), key_valid=jnp.zeros((r, spec.cache_len), bool),
      tokens=jnp.zeros((s, spec.num_tokens, cfg.token_dim), jnp.float32), token_index=jnp.zeros((s,), jnp.int32),
      prompt_len=jnp.zeros((s,), jnp.int32), cfg=jnp.ones((s,), jnp.float32), cfg_img=jnp.ones((s,), jnp.float32),
      key_data=jnp.zeros((s,) + KEY_DATA_SHAPE, jnp.uint32))


KEY_DATA_SHAPE = tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def state_shardings(cfg: ModelConfig, spec: SlotSpec, mesh) -> SlotState:
  """NamedShardings of the state on `mesh` (the rule table: rows and slots over data/fsdp, KV heads over tensor)."""
  shapes = jax.eval_shape(functools.partial(init_state, cfg, spec))
  names = _names(spec)
  flat_shapes, treedef = jax.tree.flatten(shapes)
  flat_names = []
  for field in dataclasses.fields(SlotState):
    n = getattr(names, field.name)
    count = len(jax.tree.leaves(getattr(shapes, field.name)))
    flat_names += [n] * count
  return treedef.unflatten([jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(n, s.shape, mesh))
                            for n, s in zip(flat_names, flat_shapes)])


def _slot_rows(slot: jax.Array, spec: SlotSpec) -> jax.Array:
  return slot + spec.slots * jnp.arange(spec.branches)


def prefill(model: NextStep, vae_cfg: VAEConfig | None, spec: SlotSpec, params: Any, vae_params: Any,
            state: SlotState, slot: jax.Array, ids_BxP: jax.Array, mask_BxP: jax.Array, src_pixels: jax.Array | None,
            src_branches: jax.Array | None, cfg_scale: jax.Array, cfg_img: jax.Array,
            key_data: jax.Array) -> SlotState:
  """Runs one request's prompt rows (B, P) and writes the slot's rows of the cache; resets its token index.

  Editing: `src_pixels` (1, H, W, 3) in [−1, 1] is VAE-encoded here into the placeholders of the rows whose
  `src_branches` (B,) flag is set (cond and image-uncond)."""
  cfg = model.cfg
  params, layers, _ = unpack(params)
  apply = functools.partial(model.apply, params)
  p_len = ids_BxP.shape[1]
  src = None
  if spec.src_tokens:
    src_1xTxK = patchify(encode_latents(vae_params, vae_cfg, src_pixels), cfg.latent_patch_size)
    src = jnp.where(src_branches[:, None, None], src_1xTxK, 0.0)
  key_valid = jnp.concatenate([mask_BxP.astype(bool), jnp.ones((spec.branches, spec.cache_len - p_len), bool)], 1)
  cache = init_cache(cfg, spec.branches, spec.cache_len, to_dtype(cfg.dtype), per_layer=spec.per_layer)
  h, cache = hidden(model, params, layers, apply(ids_BxP, src, method=NextStep.embed_inputs), key_valid, cache, 0)
  rows = _slot_rows(slot, spec)
  row_axis = 0 if spec.per_layer else 1
  put = lambda big, small: big.at[(slice(None),) * row_axis + (rows,)].set(small)
  return state.replace(
      cache=jax.tree.map(put, state.cache, cache), h_last=state.h_last.at[rows].set(h[:, -1]),
      key_valid=state.key_valid.at[rows].set(key_valid), token_index=state.token_index.at[slot].set(0),
      prompt_len=state.prompt_len.at[slot].set(p_len), cfg=state.cfg.at[slot].set(cfg_scale),
      cfg_img=state.cfg_img.at[slot].set(cfg_img), key_data=state.key_data.at[slot].set(key_data))


def slot_noise(spec: SlotSpec, state: SlotState, token_dim: int) -> jax.Array:
  """(S, 1 + SDE draws, K): every slot's draws for its current token, from (seed, token index) alone."""
  shape = (1 + spec.flow.num_noise_draws, 1, token_dim)
  draw = lambda kd, k: jax.random.normal(jax.random.fold_in(jax.random.wrap_key_data(kd), k), shape, jnp.float32)
  return jax.vmap(draw)(state.key_data, state.token_index)[:, :, 0]


def step(model: NextStep, spec: SlotSpec, params: Any, state: SlotState, active_S: jax.Array) -> SlotState:
  """Every slot samples its next token (condition → guided flow head), records it (active slots) and feeds it
  back through one cached LM step at its own position P + k."""
  cfg = model.cfg
  params, layers, head_blocks = unpack(params)
  apply = functools.partial(model.apply, params)
  s, b, n = spec.slots, spec.branches, spec.num_tokens
  k_s = state.token_index
  k_r = jnp.tile(k_s, b)
  c = apply(state.h_last, k_r, spec.grid_w, method=NextStep.condition)
  mods = apply(jnp.asarray(flow.time_grid(spec.flow)), c, head_blocks, method=NextStep.head_modulations)
  scale = flow.guidance_scale(state.cfg, spec.cfg_schedule, k_s, n)[:, None]
  cfg_img = state.cfg_img[:, None]

  def velocity(x, t, i):
    mods_i = jax.tree.map(lambda m: m[i], mods)
    v = apply(jnp.tile(x, (b, 1)), mods_i, head_blocks, method=NextStep.velocity_from_modulations)
    return flow.combine_branches(v, b, scale, cfg_img)
  draws = slot_noise(spec, state, cfg.token_dim)
  raw = flow.integrate(velocity, draws[:, 0], spec.flow, lambda j: draws[:, j + 1])
  tok = parameter_free_layer_norm(raw, 1e-6) if spec.use_norm else raw
  record = active_S & (k_s < n)
  k_at = jnp.minimum(k_s, n - 1)
  slots = jnp.arange(s)
  tokens = state.tokens.at[slots, k_at].set(jnp.where(record[:, None], tok, state.tokens[slots, k_at]))
  pos_r = jnp.tile(state.prompt_len + k_s, b)
  emb = apply(jnp.tile(tok, (b, 1)), method=NextStep.embed_image_token)
  h, cache = hidden(model, params, layers, emb, state.key_valid, state.cache, pos_r)
  return state.replace(cache=cache, h_last=h[:, 0], tokens=tokens,
                       token_index=jnp.where(record, k_s + 1, k_s))


def decode(vae_cfg: VAEConfig, spec: SlotSpec, patch: int, vae_params: Any, tokens_DxNxK: jax.Array) -> jax.Array:
  """Finished token sets (D, n, K) → uint8 images (D, H, W, 3) (the sampler's VAE decode)."""
  return decode_tokens(vae_params, vae_cfg, tokens_DxNxK, spec.grid_h, spec.grid_w, patch)["images"]


@dataclasses.dataclass
class Programs:
  """jitted prefill / step / decode for one (model, VAE, SlotSpec), optionally with fixed state shardings."""
  prefill: Any
  step: Any
  decode: Any


@functools.lru_cache(maxsize=16)
def programs(cfg: ModelConfig, vae_cfg: VAEConfig | None, spec: SlotSpec, mesh=None) -> Programs:
  model = NextStep(cfg)
  kw = {}
  if mesh is not None and mesh.size > 1:
    kw = dict(out_shardings=state_shardings(cfg, spec, mesh))
  pre = jax.jit(functools.partial(prefill, model, vae_cfg, spec), donate_argnums=(2,), **kw)
  stp = jax.jit(functools.partial(step, model, spec), donate_argnums=(1,), **kw)
  dec = jax.jit(functools.partial(decode, vae_cfg, spec, cfg.latent_patch_size)) if vae_cfg is not None else None
  return Programs(pre, stp, dec)


def numpy_key_data(seed: int) -> np.ndarray:
  """The host-side key data of `jax.random.key(seed)` (any Python int seed, as the sampler takes it)."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
