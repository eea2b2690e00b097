"""The jitted generation program: prefill → `lax` loop over image tokens (KV-cached LM step + flow head) → decode.

One compiled program per `Spec` (image rows, CFG branches, prompt bucket, source tokens, token grid, sampler).
Rows are branch-major: R = branches · B_img, [cond rows; uncond rows; (text-uncond rows)] — the official layout.
Per token k: c = condition(last hidden) → guided flow sampling of a (B_img, K) token (noise shared by branches;
image row i uses noise row i mod noise_repeat) → optional `use_norm` → fed back to every branch through
`image_in_projector` at cache position P + k (raw positions, pads masked — the official semantics).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.models.layers import parameter_free_layer_norm, to_dtype
from nextstep_jax.models.nextstep import DECODE_KEYS, NextStep, split_head_blocks
from nextstep_jax.models.qwen2 import init_cache
from nextstep_jax.sampling import flow


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static shape/behaviour of one generation program (the compile key)."""
  num_images: int  # B_img
  branches: int  # 1 (no CFG), 2 (text CFG), 3 (editing CFG)
  prompt_len: int  # bucketed prompt length P
  grid_h: int  # token grid rows
  grid_w: int  # token grid columns
  flow: flow.FlowConfig = flow.FlowConfig()
  src_tokens: int = 0  # image-token slots per row in the prompt (editing)
  noise_repeat: int = 1  # official noise_repeat (= images per caption): B_img % noise_repeat == 0
  use_norm: bool = True
  cfg_schedule: str = "constant"
  decode: bool = True
  debug: bool = False  # also return conditions and raw head outputs (parity tests)
  progress: bool = False  # call the host progress hook once per generated token

  @property
  def rows(self) -> int:
    return self.branches * self.num_images

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w


_PROGRESS_HOOK: list = [None]  # host callable(token_index) set by the caller while a program runs


def _tick(k) -> None:
  if _PROGRESS_HOOK[0] is not None:
    _PROGRESS_HOOK[0](int(k))


def _noise_fn(spec: Spec, key: jax.Array | None, draws: jax.Array | None):
  """token k → (x0 (B_img, K), ε(j) (B_img, K)); from recorded draws (n, N, noise_repeat, K) or from `key`."""
  reps = spec.num_images // spec.noise_repeat
  n_draws = 1 + spec.flow.num_noise_draws

  def for_token(k, token_dim):
    d = draws[k] if draws is not None else jax.random.normal(
        jax.random.fold_in(key, k), (n_draws, spec.noise_repeat, token_dim), jnp.float32)
    d = jnp.tile(d, (1, reps, 1))
    return d[0], lambda j: d[j + 1]
  return for_token


def generate_tokens(model: NextStep, params: Any, spec: Spec, ids_RxP: jax.Array, mask_RxP: jax.Array,
                    src_tokens_RxTxK: jax.Array | None, cfg_scale: jax.Array, cfg_img: jax.Array,
                    key: jax.Array | None = None, noise_draws: jax.Array | None = None) -> dict[str, jax.Array]:
  """Traceable core: returns tokens (B_img, n, K) (+ head_out_raw, cond_per_token when spec.debug)."""
  cfg: ModelConfig = model.cfg
  n, b_img, r = spec.num_tokens, spec.num_images, spec.rows
  k_dim = cfg.token_dim
  s_len = spec.prompt_len + n
  layers, head_blocks = (params.get(k) if isinstance(params, dict) else None for k in DECODE_KEYS)
  params = {k: v for k, v in params.items() if k not in DECODE_KEYS}
  if head_blocks is None:  # stacked head (TPU default): slice the blocks once, outside the token loop
    params, head_blocks = split_head_blocks(params)
  apply = functools.partial(model.apply, params)
  times = jnp.asarray(flow.time_grid(spec.flow))  # every flow time the head is evaluated at
  key_valid = jnp.concatenate([mask_RxP.astype(bool), jnp.ones((r, n), bool)], axis=1)
  cache = init_cache(cfg, r, s_len, to_dtype(cfg.dtype), per_layer=layers is not None)
  embeds = apply(ids_RxP, src_tokens_RxTxK, method=NextStep.embed_inputs)
  h, cache = apply(embeds, key_valid, None, cache, 0, layers, method=NextStep.hidden)
  noise_for = _noise_fn(spec, key, noise_draws)
  cfg_scale, cfg_img = (jnp.asarray(a, jnp.float32) for a in (cfg_scale, cfg_img))

  def head(k, h_last):
    c = apply(h_last, jnp.full((r,), k), spec.grid_w, method=NextStep.condition)
    mods = apply(times, c, head_blocks, method=NextStep.head_modulations)  # each (S, R, ·)
    scale = flow.guidance_scale(cfg_scale, spec.cfg_schedule, k, n)

    def velocity(x, t, i):
      mods_i = jax.tree.map(lambda m: m[i], mods)
      v = apply(jnp.tile(x, (spec.branches, 1)), mods_i, head_blocks, method=NextStep.velocity_from_modulations)
      return flow.combine_branches(v, spec.branches, scale, cfg_img)
    x0, eps = noise_for(k, k_dim)
    raw = flow.integrate(velocity, x0, spec.flow, eps)
    tok = parameter_free_layer_norm(raw, 1e-6) if spec.use_norm else raw
    return tok, raw, c

  def body(k, carry):
    cache, h_last, toks, raws, conds = carry
    tok, raw, c = head(k, h_last)
    emb = apply(jnp.tile(tok, (spec.branches, 1)), method=NextStep.embed_image_token)
    h_new, cache = apply(emb, key_valid, None, cache, spec.prompt_len + k, layers, method=NextStep.hidden)
    toks = toks.at[:, k].set(tok)
    if spec.progress:
      jax.debug.callback(_tick, k)
    if spec.debug:
      raws, conds = raws.at[:, k].set(raw), conds.at[k].set(c.astype(jnp.float32))
    return cache, h_new[:, 0], toks, raws, conds

  toks = jnp.zeros((b_img, n, k_dim), jnp.float32)
  raws = jnp.zeros((b_img, n, k_dim), jnp.float32) if spec.debug else jnp.zeros((), jnp.float32)
  conds = jnp.zeros((n, r, cfg.hidden_size), jnp.float32) if spec.debug else jnp.zeros((), jnp.float32)
  carry = (cache, h[:, -1], toks, raws, conds)
  # tokens 0..n-2 each feed one LM step; the last token needs no LM step after it
  cache, h_last, toks, raws, conds = jax.lax.fori_loop(0, n - 1, body, carry)
  tok, raw, c = head(n - 1, h_last)
  toks = toks.at[:, n - 1].set(tok)
  out = {"tokens": toks}
  if spec.debug:
    out.update(head_out_raw=raws.at[:, n - 1].set(raw), cond_per_token=conds.at[n - 1].set(c.astype(jnp.float32)),
               prefill_last_hidden=h[:, -1])
  return out


def decode_tokens(vae_params: Any, vae_cfg: VAEConfig, tokens_BxNxK: jax.Array, grid_h: int, grid_w: int,
                  patch: int) -> dict[str, jax.Array]:
  """tokens → latents (B, h, w, C) → VAE decode → float images in ~[−1, 1] and uint8 (B, H, W, 3)."""
  from nextstep_jax.models.flux_vae import decode_latents
  from nextstep_jax.models.latents import unpatchify
  latents = unpatchify(tokens_BxNxK, grid_h * patch, grid_w * patch, patch)
  decoded = decode_latents(vae_params, vae_cfg, latents)
  images = jnp.round(jnp.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
  return {"latents": latents, "decoded": decoded, "images": images}


@functools.lru_cache(maxsize=64)
def compiled_program(cfg: ModelConfig, vae_cfg: VAEConfig | None, spec: Spec):
  """jit(params, vae_params, ids, mask, src_tokens, cfg, cfg_img, key, noise_draws) → dict (cached per spec)."""
  model = NextStep(cfg)

  def program(params, vae_params, ids, mask, src_tokens, cfg_scale, cfg_img, key, noise_draws):
    out = generate_tokens(model, params, spec, ids, mask, src_tokens, cfg_scale, cfg_img, key, noise_draws)
    if spec.decode:
      out.update(decode_tokens(vae_params, vae_cfg, out["tokens"], spec.grid_h, spec.grid_w, cfg.latent_patch_size))
    return out
  return jax.jit(program)
