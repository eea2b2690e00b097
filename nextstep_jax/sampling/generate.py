"""The jitted generation program: prefill → `lax` loop over image tokens (KV-cached LM step + flow head) → decode.

One compiled program per `Spec` (image rows, CFG branches, prompt bucket, source tokens, token grid, sampler).
Rows are branch-major: R = branches · B_img, [cond rows; uncond rows; (text-uncond rows)] — the official layout.
Per token k: c = condition(last hidden) → guided flow sampling of a (B_img, K) token (noise shared by branches;
image row i uses noise row i mod noise_repeat; a log-prob sampler (`flow.LOGPROB_METHODS`) also records each
token's Gaussian transitions: `trajectory_states` (B_img, n, S+1, K), `trajectory_means` (B_img, n, S, K),
`trajectory_stds` (S,), `trajectory_logp` (B_img, n, S)) → optional `use_norm` → fed back to every branch through
`image_in_projector` at cache position P + k (raw positions, pads masked — the official semantics).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.models.flux_vae import decode_latents
from nextstep_jax.models.latents import unpatchify
from nextstep_jax.models.layers import parameter_free_layer_norm, to_dtype
from nextstep_jax.models import quant
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.sampling import decode_layout, flow

TokenHook = Callable[[int], None]  # host callable(token_index), called once per generated token


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
  injected_noise: bool = False  # the program reads recorded draws (n, 1 + draws, noise_repeat, K), not a key
  return_debug: bool = False  # also return conditions, raw head outputs and the prefill's last hidden
  progress: bool = False  # call the program's token hook once per generated token

  @property
  def rows(self) -> int:
    return self.branches * self.num_images

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w


@struct.dataclass
class DecodeState:
  """The token loop's carry after token k−1: KV cache, last hidden per row, tokens so far (+ debug arrays)."""
  cache: Any
  h_last_RxD: jax.Array
  tokens_BxNxK: jax.Array
  head_out_raw_BxNxK: jax.Array | None = None  # Spec.return_debug only
  cond_NxRxD: jax.Array | None = None  # Spec.return_debug only
  trajectory: flow.Trajectory | None = None  # log-prob samplers only: per-token transitions (B, n, ·)

  def record(self, k, tok_BxK: jax.Array, raw_BxK: jax.Array, c_RxD: jax.Array,
             tr: flow.Trajectory | None = None) -> "DecodeState":
    """Token k's outputs written into the state (the debug arrays and trajectory when present)."""
    new = self.replace(tokens_BxNxK=self.tokens_BxNxK.at[:, k].set(tok_BxK))
    if tr is not None:  # token k's (S, B, ·) records → row k of (B, n, S, ·)
      per_row = lambda a: jnp.moveaxis(a, 0, 1)
      new = new.replace(trajectory=flow.Trajectory(
          states=new.trajectory.states.at[:, k].set(per_row(tr.states)),
          means=new.trajectory.means.at[:, k].set(per_row(tr.means)), stds=tr.stds,
          logp=new.trajectory.logp.at[:, k].set(per_row(tr.logp))))
    if self.head_out_raw_BxNxK is None:
      return new
    return new.replace(head_out_raw_BxNxK=self.head_out_raw_BxNxK.at[:, k].set(raw_BxK),
                       cond_NxRxD=self.cond_NxRxD.at[k].set(c_RxD.astype(jnp.float32)))


def _noise_fn(spec: Spec, key: jax.Array | None, draws: jax.Array | None):
  """token k → (x0 (B_img, K), ε(j) (B_img, K)); from recorded draws (n, N, noise_repeat, K) or from `key`."""
  if spec.injected_noise != (draws is not None):
    raise ValueError(f"Spec.injected_noise={spec.injected_noise} but noise_draws is "
                     f"{'missing' if draws is None else 'given'}; build the Spec from the call's arguments")
  reps = spec.num_images // spec.noise_repeat
  n_draws = 1 + spec.flow.num_noise_draws

  def for_token(k, token_dim):
    d = draws[k] if spec.injected_noise else jax.random.normal(
        jax.random.fold_in(key, k), (n_draws, spec.noise_repeat, token_dim), jnp.float32)
    d = jnp.tile(d, (1, reps, 1))
    return d[0], lambda j: d[j + 1]
  return for_token


def _flow_grid(spec: Spec, n: int):
  """token k → (the flow times the head is evaluated at (S,), step count): static without a step schedule, else
  the token's row of the padded grid table and a traced count (one program, dynamic trip counts)."""
  if spec.flow.schedule == (spec.flow.steps,):
    times = jnp.asarray(flow.time_grid(spec.flow))
    return lambda k: (times, None)
  grids, counts = (jnp.asarray(a) for a in flow.grid_table(spec.flow))
  return lambda k: (grids[flow.token_segment(spec.flow, k, n)], counts[flow.token_segment(spec.flow, k, n)])


def generate_tokens(model: NextStep, params: Any, spec: Spec, *, ids_RxP: jax.Array, mask_RxP: jax.Array,
                    src_tokens_RxTxK: jax.Array | None, cfg_scale: jax.Array, cfg_img: jax.Array,
                    key: jax.Array | None = None, noise_draws: jax.Array | None = None,
                    on_token: TokenHook | None = None) -> dict[str, jax.Array]:
  """Traceable core: returns tokens (B_img, n, K) (+ head_out_raw, cond_per_token, prefill_last_hidden when
  spec.return_debug). `on_token` is called on the host after each token when spec.progress."""
  cfg: ModelConfig = model.cfg
  n, b_img, r = spec.num_tokens, spec.num_images, spec.rows
  k_dim = cfg.token_dim
  params, layers, head_blocks = decode_layout.unpack(params)
  apply = functools.partial(model.apply, params)
  flow_grid = _flow_grid(spec, n)
  key_valid = jnp.concatenate([mask_RxP.astype(bool), jnp.ones((r, n), bool)], axis=1)
  lm_step = functools.partial(decode_layout.hidden, model, params, layers)
  cache = decode_layout.init_cache(cfg, r, spec.prompt_len + n, to_dtype(cfg.dtype), per_layer=layers is not None)
  h, cache = lm_step(apply(ids_RxP, src_tokens_RxTxK, method=NextStep.embed_inputs), key_valid, cache, 0)
  noise_for = _noise_fn(spec, key, noise_draws)
  cfg_scale, cfg_img = (jnp.asarray(a, jnp.float32) for a in (cfg_scale, cfg_img))

  def head(k, h_last):
    c = apply(h_last, jnp.full((r,), k), spec.grid_w, method=NextStep.condition)
    grid, steps = flow_grid(k)
    mods = apply(grid, c, head_blocks, method=NextStep.head_modulations)  # each (S, R, ·)
    scale = flow.guidance_scale(cfg_scale, spec.cfg_schedule, k, n)

    def guided(x, t, i):
      mods_i = jax.tree.map(lambda m: m[i], mods)
      v = apply(jnp.tile(x, (spec.branches, 1)), mods_i, head_blocks, method=NextStep.velocity_from_modulations)
      return flow.combine_branches(v, spec.branches, scale, cfg_img)

    def cond_only(x, t, i):  # outside the guidance windows: the conditional rows (the first B_img) alone
      mods_i = jax.tree.map(lambda m: m[i, :b_img], mods)
      return apply(x, mods_i, head_blocks, method=NextStep.velocity_from_modulations)
    x0, eps = noise_for(k, k_dim)
    velocity = flow.windowed(guided, cond_only, spec.flow, k / n) if spec.branches > 1 else guided
    tr = None
    if spec.flow.records_logprob:
      raw, tr = flow.integrate_with_trajectory(velocity, x0, spec.flow, eps, grid)
    else:
      raw = flow.integrate(velocity, x0, spec.flow, eps, grid, steps)
    tok = parameter_free_layer_norm(raw, 1e-6) if spec.use_norm else raw
    return tok, raw, c, tr

  def body(k, state: DecodeState) -> DecodeState:
    tok, raw, c, tr = head(k, state.h_last_RxD)
    emb = apply(jnp.tile(tok, (spec.branches, 1)), method=NextStep.embed_image_token)
    h_new, cache = lm_step(emb, key_valid, state.cache, spec.prompt_len + k)
    if spec.progress and on_token is not None:
      jax.debug.callback(lambda i: on_token(int(i)), k)
    return state.record(k, tok, raw, c, tr).replace(cache=cache, h_last_RxD=h_new[:, 0])

  debug = dict(head_out_raw_BxNxK=jnp.zeros((b_img, n, k_dim), jnp.float32),
               cond_NxRxD=jnp.zeros((n, r, cfg.hidden_size), jnp.float32)) if spec.return_debug else {}
  if spec.flow.records_logprob:
    s_steps = spec.flow.steps
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    debug["trajectory"] = flow.Trajectory(states=zeros(b_img, n, s_steps + 1, k_dim),
                                          means=zeros(b_img, n, s_steps, k_dim), stds=zeros(s_steps),
                                          logp=zeros(b_img, n, s_steps))
  state = DecodeState(cache=cache, h_last_RxD=h[:, -1], tokens_BxNxK=jnp.zeros((b_img, n, k_dim), jnp.float32),
                      **debug)
  # tokens 0..n-2 each feed one LM step; the last token needs no LM step after it
  state = jax.lax.fori_loop(0, n - 1, body, state)
  state = state.record(n - 1, *head(n - 1, state.h_last_RxD))
  out = {"tokens": state.tokens_BxNxK}
  if state.trajectory is not None:
    tr = state.trajectory
    out.update(trajectory_states=tr.states, trajectory_means=tr.means, trajectory_stds=tr.stds,
               trajectory_logp=tr.logp)
  if spec.return_debug:
    out.update(head_out_raw=state.head_out_raw_BxNxK, cond_per_token=state.cond_NxRxD, prefill_last_hidden=h[:, -1])
  return out


def decode_tokens(vae_params: Any, vae_cfg: VAEConfig, tokens_BxNxK: jax.Array, grid_h: int, grid_w: int,
                  patch: int) -> dict[str, jax.Array]:
  """tokens → latents (B, h, w, C) → VAE decode → float images in ~[−1, 1] and uint8 (B, H, W, 3)."""
  latents = unpatchify(tokens_BxNxK, grid_h * patch, grid_w * patch, patch)
  decoded = decode_latents(vae_params, vae_cfg, latents)
  images = jnp.round(jnp.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
  return {"latents": latents, "decoded": decoded, "images": images}


@functools.lru_cache(maxsize=64)
def compiled_program(cfg: ModelConfig, vae_cfg: VAEConfig | None, spec: Spec, on_token: TokenHook | None = None):
  """jit(params, vae_params, ids, mask, src_tokens, cfg, cfg_img, key, noise_draws) → dict (cached per spec and
  hook; the hook is closed over by the program, so pass one long-lived callable per caller)."""
  model = NextStep(cfg)

  def program(params, vae_params, ids, mask, src_tokens, cfg_scale, cfg_img, key, noise_draws):
    with quant.quantized_dense():  # int8 kernels (when the params hold scales) run the int8 dot
      out = generate_tokens(model, params, spec, ids_RxP=ids, mask_RxP=mask, src_tokens_RxTxK=src_tokens,
                            cfg_scale=cfg_scale, cfg_img=cfg_img, key=key, noise_draws=noise_draws,
                            on_token=on_token)
    if spec.decode:
      out.update(decode_tokens(vae_params, vae_cfg, out["tokens"], spec.grid_h, spec.grid_w, cfg.latent_patch_size))
    return out
  return jax.jit(program)
