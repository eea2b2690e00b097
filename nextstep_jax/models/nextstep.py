"""NextStep-1: Qwen2 causal LM + image in/out projectors + flow-matching head, and its training loss.

Parameter tree = Qwen2ForCausalLM's (`backbone`, `lm_head`) plus `image_in_projector` (token_dim → D),
`image_out_projector` (D → D) and `image_head` (FlowHead).

Batch contract (training; B rows, L positions, T image-token slots per row):
  input_ids (B, L) int32 with `image_placeholder_id` where image tokens go; attention_mask (B, L) 1 = real;
  positions (B, L) RoPE positions; labels (B, L) (−100 = ignore; position j predicts labels[j+1]);
  image_tokens (B, T, token_dim) filling the row's placeholders in order; image_loss_mask (B, T);
  image_token_grid (B, T, 4) (row, col, rows, cols) per slot — needed with use_gen_pos_embed / input noise
  (models/image_grid.py).
The hidden state at position j conditions the image token at position j+1.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.models.fm_head import FlowHead
from nextstep_jax.models.image_grid import batch_grid, input_noise_scale, pos_index
from nextstep_jax.models.layers import dense, to_dtype
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM

IGNORE = -100


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
  """MAE-style 2-D sin-cos table (grid·grid, dim): [emb_h ‖ emb_w], each [sin ‖ cos] (official gen_pos_embed)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


def placeholder_slots(ids_BxL: jax.Array, placeholder_id: int, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the first `num_slots` placeholders per row (B, T) and whether each slot is real (B, T)."""
  is_ph = ids_BxL == placeholder_id
  pos = jax.vmap(lambda m: jnp.nonzero(m, size=num_slots, fill_value=0)[0])(is_ph)
  valid = jnp.arange(num_slots)[None, :] < jnp.sum(is_ph, axis=1, keepdims=True)
  return pos.astype(jnp.int32), valid


class NextStep(Qwen2ForCausalLM):
  """NextStep-1 model. Methods are applied with `model.apply(params, ..., method=...)`."""

  def setup(self):
    super().setup()
    cfg = self.cfg
    kw = dict(use_bias=True, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
              kernel_init=nn.initializers.normal(0.02))
    self.image_in_projector = dense(cfg.hidden_size, ("token",), ("embed",), name="image_in_projector", **kw)
    self.image_out_projector = dense(cfg.hidden_size, ("embed",), ("mlp",), name="image_out_projector", **kw)
    self.image_head = FlowHead(cfg)

  # ------------------------------------------------------------------------------------------- pieces

  def embed_inputs(self, ids_BxL: jax.Array, image_tokens_BxTxK: jax.Array | None = None) -> jax.Array:
    """Token embeddings with placeholder positions replaced, in order, by image_in_projector(image_tokens)."""
    emb = self.backbone.embed(ids_BxL)
    if image_tokens_BxTxK is None or image_tokens_BxTxK.shape[1] == 0:
      return emb
    is_ph = ids_BxL == self.cfg.image_placeholder_id
    slot = jnp.clip(jnp.cumsum(is_ph, axis=1) - 1, 0, image_tokens_BxTxK.shape[1] - 1)
    proj = self.image_in_projector(image_tokens_BxTxK.astype(emb.dtype))
    return jnp.where(is_ph[..., None], jnp.take_along_axis(proj, slot[..., None], axis=1), emb)

  def embed_image_token(self, tok_BxK: jax.Array) -> jax.Array:
    """(B, token_dim) → (B, 1, D): the next decoder input during sampling."""
    return self.image_in_projector(tok_BxK.astype(to_dtype(self.cfg.dtype)))[:, None, :]

  def condition(self, h_NxD: jax.Array, token_index_N: jax.Array | None = None, grid_w: Any = None):
    """Head condition from final-normed hidden states: (+ gen_pos_embed) → image_out_projector (config).

    Token k of an image `grid_w` tokens wide (an int or (N,)) is at (k // grid_w, k % grid_w) and takes table
    entry row·base_grid + col (the official sub-grid); grid_w None = the base grid's width."""
    cfg = self.cfg
    if cfg.use_gen_pos_embed and token_index_N is not None:
      table = jnp.asarray(sincos_2d_table(cfg.hidden_size, cfg.base_image_grid_size))
      w = cfg.base_image_grid_size if grid_w is None else grid_w
      row, col = token_index_N // w, token_index_N % w
      h_NxD = h_NxD + table[row * cfg.base_image_grid_size + col].astype(h_NxD.dtype)
    return self.image_out_projector(h_NxD) if cfg.head_uses_out_projector else h_NxD

  def velocity(self, x_NxK: jax.Array, t_N: jax.Array, c_NxD: jax.Array) -> jax.Array:
    return self.image_head(x_NxK, t_N, c_NxD)

  def head_modulations(self, t_S: jax.Array, c_NxD: jax.Array, head_blocks):
    """The head's adaLN modulations at S flow times (once per image token while sampling; FlowHead.modulations)."""
    return self.image_head.modulations(t_S, c_NxD, head_blocks)

  def velocity_from_modulations(self, x_NxK: jax.Array, mods, head_blocks) -> jax.Array:
    """`velocity` at one flow time given that time's slice of `head_modulations`."""
    return self.image_head.from_modulations(x_NxK, mods, head_blocks)

  def hidden(self, embeds_BxLxD, key_valid_BxS, positions_BxL=None, cache=None, cache_index=0):
    return self.backbone(embeds_BxLxD, key_valid_BxS, positions_BxL, cache, cache_index)

  def __call__(self, ids_BxL, image_tokens_BxTxK=None, attention_mask_BxL=None, positions_BxL=None):
    """Full forward (also used for init): returns (fp32 logits (B, L, V), final-normed hidden (B, L, D)).

    Touches the head once so that `init` creates every parameter."""
    if attention_mask_BxL is None:
      attention_mask_BxL = jnp.ones(ids_BxL.shape, bool)
    h, _ = self.backbone(self.embed_inputs(ids_BxL, image_tokens_BxTxK), attention_mask_BxL, positions_BxL)
    if self.is_initializing():
      c = self.condition(h[:, 0])
      self.velocity(jnp.zeros((h.shape[0], self.cfg.token_dim), jnp.float32), jnp.zeros((h.shape[0],)), c)
    return self.logits(h), h

  def slot_conditions(self, h_BxLxD: jax.Array, batch: dict[str, jax.Array], t_slots: int):
    """(head conditions (B·T, D), slot is real (B, T)) of a training batch's T image-token slots: the hidden before
    each placeholder, with gen_pos_embed by the slot's (row, col) from `image_token_grid`, → `condition`."""
    slots, slot_valid = placeholder_slots(batch["input_ids"], self.cfg.image_placeholder_id, t_slots)
    h_cond = jnp.take_along_axis(h_BxLxD, jnp.maximum(slots - 1, 0)[..., None], axis=1)  # (B, T, D)
    grid = batch_grid(self.cfg, batch)
    cond = self.condition(h_cond.reshape(-1, h_cond.shape[-1]), *(pos_index(grid) if grid is not None else ()))
    return cond, slot_valid

  # ------------------------------------------------------------------------------------------- loss

  def loss_terms(self, batch: dict[str, jax.Array], fm_noise: jax.Array, fm_u: jax.Array,
                 input_noise: jax.Array | None = None) -> dict[str, jax.Array]:
    """Un-normalised loss sums and counts for one (micro-)batch: ce_sum, ce_count, fm_sum, fm_count (fp32).

    fm_noise (mul, B, T, token_dim) and fm_u (mul, B, T) are the flow-matching draws (`draw_fm_noise`), drawn
    for the whole global batch so micro-batching and sharding do not change them; the replica-major flattening
    (mul·B·T rows) is the official layout. input_noise (B, T, token_dim) ~ N(0, I): the official input noise,
    scaled by `input_noise_scale` and added to the tokens the LM reads (used when input_noise_strength > 0).
    """
    cfg = self.cfg
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_tokens = batch["image_tokens"]
    b, t_slots = image_tokens.shape[:2]
    lm_tokens = image_tokens
    if input_noise is not None and cfg.input_noise_strength > 0:
      scale = input_noise_scale(batch_grid(cfg, batch), cfg.latent_patch_size, cfg.latent_channels,
                                cfg.input_noise_strength)
      lm_tokens = image_tokens + (input_noise.astype(jnp.float32) * scale).astype(image_tokens.dtype)
    h, _ = self.backbone(self.embed_inputs(ids, lm_tokens), mask, batch.get("positions"))

    # text: position j predicts labels[j+1], unless that target is an image placeholder or ignored
    labels = batch["labels"][:, 1:]
    ce_valid = (labels != IGNORE) & (ids[:, 1:] != cfg.image_placeholder_id)
    logp = jax.nn.log_softmax(self.logits(h[:, :-1]), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.clip(labels, 0)[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum(jnp.where(ce_valid, nll, 0.0))

    # image: the hidden before each placeholder conditions that placeholder's token
    cond, slot_valid = self.slot_conditions(h, batch, t_slots)
    weight = (slot_valid & (batch["image_loss_mask"] > 0)).astype(jnp.float32).reshape(-1)
    mul = cfg.fm_head_batch_mul
    x1 = jnp.tile(image_tokens.reshape(b * t_slots, -1).astype(jnp.float32), (mul, 1))
    noise = fm_noise.reshape(x1.shape).astype(jnp.float32)
    t = jax.nn.sigmoid(fm_u.reshape(-1).astype(jnp.float32))
    x_t = t[:, None] * x1 + (1 - t[:, None]) * noise
    pred = self.velocity(x_t, t, jnp.tile(cond, (mul, 1)))
    per_token = jnp.mean(jnp.square(pred - (x1 - noise)), axis=-1)
    w = jnp.tile(weight, (mul,))
    return {"ce_sum": ce_sum, "ce_count": jnp.sum(ce_valid).astype(jnp.float32),
            "fm_sum": jnp.sum(per_token * w), "fm_count": jnp.sum(w)}


def draw_input_noise(cfg: ModelConfig, key: jax.Array, batch: int, slots: int) -> tuple[jax.Array, ...]:
  """() without input noise, else (ε (1, B, T, token_dim) ~ N(0, I),): the leading 1 lets it ride with the
  flow-matching draws (split on axis 1 by micro-batching)."""
  if cfg.input_noise_strength <= 0:
    return ()
  return (jax.random.normal(jax.random.fold_in(key, 7), (1, batch, slots, cfg.token_dim), jnp.float32),)


def draw_fm_noise(cfg: ModelConfig, key: jax.Array, batch: int, slots: int) -> tuple[jax.Array, jax.Array]:
  """Flow-matching draws for a global batch: noise (mul, B, T, token_dim) ~ N(0, I), u (mul, B, T) ~ N(0, 1)."""
  k_noise, k_u = jax.random.split(key)
  mul = cfg.fm_head_batch_mul
  noise = jax.random.normal(k_noise, (mul, batch, slots, cfg.token_dim), jnp.float32)
  return noise, jax.random.normal(k_u, (mul, batch, slots), jnp.float32)


def loss_counts(cfg: ModelConfig, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """The normalisers of a whole (global) batch, computed from masks alone (no model)."""
  ids, labels = batch["input_ids"], batch["labels"]
  ce = jnp.sum((labels[:, 1:] != IGNORE) & (ids[:, 1:] != cfg.image_placeholder_id))
  slots, slot_valid = placeholder_slots(ids, cfg.image_placeholder_id, batch["image_tokens"].shape[1])
  fm = jnp.sum(slot_valid & (batch["image_loss_mask"] > 0)) * cfg.fm_head_batch_mul
  return {"ce_count": ce.astype(jnp.float32), "fm_count": fm.astype(jnp.float32)}


def per_count(total: jax.Array, count: jax.Array) -> jax.Array:
  """`total / count`, 0 for an empty count (CE tokens, pairs)."""
  return total / jnp.maximum(count, 1.0)


def per_fm_row(total: jax.Array, count: jax.Array) -> jax.Array:
  """A flow-matching error sum over `count` rows (tokens × batch_mul): the official `/ (count + 1e-8)`."""
  return total / (count + 1e-8)


def combine_losses(cfg: ModelConfig, terms: dict[str, jax.Array], counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """total = lm_w · ce_sum/ce_count + im_w · fm_sum/(fm_count + 1e-8) (official normalisation)."""
  ce = per_count(terms["ce_sum"], counts["ce_count"])
  fm = per_fm_row(terms["fm_sum"], counts["fm_count"])
  return {"loss": cfg.lm_loss_weight * ce + cfg.im_loss_weight * fm, "text_loss": ce, "image_loss": fm}


def init_fn(cfg: ModelConfig, nextstep: bool = True):
  """(module, init(rng) → boxed variables) for the NextStep model (or the plain Qwen2 LM)."""
  model = NextStep(cfg) if nextstep else Qwen2ForCausalLM(cfg)
  ids = jnp.zeros((1, 2), jnp.int32)
  if nextstep:
    toks = jnp.zeros((1, 1, cfg.token_dim), jnp.float32)
    return model, lambda rng: model.init(rng, ids, toks)
  return model, lambda rng: model.init(rng, ids)


def abstract_params(cfg: ModelConfig, nextstep: bool = True):
  """(ShapeDtypeStruct tree, logical-names tree) of the model parameters — nothing is allocated."""
  _, init = init_fn(cfg, nextstep)
  return sharding.abstract_with_names(init, jax.random.key(0))
