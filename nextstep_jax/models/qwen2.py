"""Qwen2 / Qwen2.5 causal Transformer in Linen: scanned decoder layers, static KV cache, optional tied lm_head.

Parameter tree (layers stacked on a leading `layers` axis by `nn.scan`):
  backbone/embed_tokens/embedding (V, D)
  backbone/layers/{input_layernorm, post_attention_layernorm}/scale (Ly, D)
  backbone/layers/self_attn/{q,k,v}_proj/{kernel (Ly, D, H|G, K), bias (Ly, H|G, K)}; o_proj/kernel (Ly, H, K, D)
  backbone/layers/mlp/{gate,up}_proj/kernel (Ly, D, F); down_proj/kernel (Ly, F, D)
  backbone/norm/scale (D,);  lm_head/kernel (D, V) unless tied

Positions follow the official pipeline: raw cache positions (pads included) unless given; pads are masked.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.models import attention
from nextstep_jax.models.layers import RMSNorm, apply_rope, dense, logical, rope_cos_sin, to_dtype

KVCache = dict  # {"k": (Ly, B, G, S, K), "v": …} stacked (sampling/decode_layout.py: a Ly-tuple per layer)
# (heads before positions: the layout the attention dots read, so no per-step transpose of the cache)

_INIT = nn.initializers.normal(0.02)

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


def _dense(cfg: ModelConfig, features, in_names, out_names, name, *, use_bias=False, axis=-1):
  return dense(features, in_names, out_names, use_bias=use_bias, dtype=to_dtype(cfg.dtype),
               param_dtype=to_dtype(cfg.param_dtype), name=name, axis=axis, kernel_init=_INIT)


class Attention(nn.Module):
  """GQA self-attention with q/k/v bias (config) and rotate-half RoPE; writes the KV cache when given."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, cos, sin, mask_BxLxS, cache_index, kv):
    cfg = self.cfg
    h, g, k_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    q = _dense(cfg, (h, k_dim), ("embed",), ("q_heads", "head_dim"), "q_proj", use_bias=cfg.attention_bias)(x_BxLxD)
    k = _dense(cfg, (g, k_dim), ("embed",), ("kv_heads", "head_dim"), "k_proj", use_bias=cfg.attention_bias)(x_BxLxD)
    v = _dense(cfg, (g, k_dim), ("embed",), ("kv_heads", "head_dim"), "v_proj", use_bias=cfg.attention_bias)(x_BxLxD)
    q = sharding.constrain(apply_rope(q, cos, sin), ("act_batch", "act_len", "act_heads", "act_head_dim"))
    k = sharding.constrain(apply_rope(k, cos, sin), ("act_batch", "act_len", "act_kv_heads", "act_head_dim"))
    v = sharding.constrain(v, ("act_batch", "act_len", "act_kv_heads", "act_head_dim"))
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    new_kv = None
    if kv is not None:
      new_kv = {"k": write_cache(kv["k"], k, cache_index), "v": write_cache(kv["v"], v, cache_index)}
      k, v = (jnp.swapaxes(new_kv[n], 1, 2).astype(q.dtype) for n in ("k", "v"))
    out = attention.attend(q, k, v, mask_BxLxS, cfg.attention_impl)
    out = checkpoint_name(sharding.constrain(out, ("act_batch", "act_len", "act_heads", "act_head_dim")), "attn_out")
    o = _dense(cfg, cfg.hidden_size, ("q_heads", "head_dim"), ("embed",), "o_proj", use_bias=cfg.o_bias,
               axis=(-2, -1))(out)
    return o, new_kv


def write_cache(buf_BxGxSxK: jax.Array, new_BxLxGxK: jax.Array, cache_index: jax.Array) -> jax.Array:
  """Writes L new positions at `cache_index`: a scalar (every row) or one index per row (B,) (serving slots)."""
  new = jnp.swapaxes(new_BxLxGxK, 1, 2).astype(buf_BxGxSxK.dtype)
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf_BxGxSxK, new, cache_index, axis=2)
  return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=1))(buf_BxGxSxK, new,
                                                                                         cache_index)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) · up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    gate = _dense(cfg, cfg.intermediate_size, ("embed",), ("mlp",), "gate_proj")(x_BxLxD)
    up = _dense(cfg, cfg.intermediate_size, ("embed",), ("mlp",), "up_proj")(x_BxLxD)
    hid = sharding.constrain(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return _dense(cfg, cfg.hidden_size, ("mlp",), ("embed",), "down_proj")(hid)


class DecoderLayer(nn.Module):
  """Pre-norm block; the scan carry is the residual stream (B, L, D), the scanned input the layer's KV cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, cos, sin, mask_BxLxS, cache_index, kv):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), name=name)
    attn, new_kv = Attention(cfg, name="self_attn")(norm("input_layernorm")(x_BxLxD), cos, sin, mask_BxLxS,
                                                    cache_index, kv)
    x = x_BxLxD + attn
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return sharding.constrain(x, ("act_batch", "act_len", "act_embed")), new_kv


def scanned_layers(cfg: ModelConfig) -> type[nn.Module]:
  """DecoderLayer wrapped in the configured remat policy and `nn.scan` over `cfg.num_layers`."""
  layer = DecoderLayer
  if cfg.remat_policy != "none":
    layer = nn.remat(layer, policy=REMAT[cfg.remat_policy], prevent_cse=False)
  return nn.scan(layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                 unroll=min(cfg.scan_unroll, cfg.num_layers),
                 metadata_params={nn.PARTITION_NAME: "layers"})


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
  """Zeroed static KV cache: k, v of shape (layers, batch, kv_heads, max_len, head_dim)."""
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
  return {name: jnp.zeros(shape, to_dtype(dtype or cfg.dtype)) for name in ("k", "v")}


CACHE_NAMES = ("layers", "act_batch", "act_kv_heads", "act_len", "act_head_dim")


class Qwen2Backbone(nn.Module):
  """Token embedding, scanned decoder layers and the final RMSNorm."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=to_dtype(cfg.dtype),
                                 param_dtype=to_dtype(cfg.param_dtype),
                                 embedding_init=logical(_INIT, ("vocab", "embed")))
    self.layers = scanned_layers(cfg)(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, to_dtype(cfg.dtype), to_dtype(cfg.param_dtype))

  def embed(self, ids_BxL: jax.Array) -> jax.Array:
    return self.embed_tokens(ids_BxL)

  def attend_embedding(self, h_BxLxD: jax.Array) -> jax.Array:
    return self.embed_tokens.attend(h_BxLxD)

  def prepare(self, embeds_BxLxD: jax.Array, key_valid_BxS: jax.Array, positions_BxL: jax.Array | None = None,
              cache: KVCache | None = None, cache_index: jax.Array | int = 0):
    """What every decoder layer reads: (x (B, L, D), rope cos, sin, mask (B, L, S), cache index (int32)).

    key_valid_BxS: True for real (non-pad) keys; S = L without a cache, S = cache length with one.
    cache_index: where this chunk starts in the cache, a scalar or one index per row (B,) (serving: every slot
      at its own token); queries sit at cache_index + [0, L)."""
    cfg = self.cfg
    b, l, _ = embeds_BxLxD.shape
    q_idx = jnp.asarray(cache_index)[..., None] + jnp.arange(l)  # (L,), or (B, L) for per-row cache indices
    s = l if cache is None else cache["k"][0].shape[-2]
    if key_valid_BxS.shape != (b, s):
      raise ValueError(f"key_valid has shape {key_valid_BxS.shape}, expected {(b, s)} (batch, keys)")
    mask = (jnp.arange(s) <= q_idx[..., None]) & key_valid_BxS[:, None, :].astype(bool)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(q_idx, (b, l))
    cos, sin = rope_cos_sin(positions_BxL, cfg.resolved_head_dim, cfg.rope_theta)
    x = sharding.constrain(embeds_BxLxD.astype(to_dtype(cfg.dtype)), ("act_batch", "act_len", "act_embed"))
    return x, cos, sin, mask, jnp.asarray(cache_index, jnp.int32)

  def __call__(self, embeds_BxLxD: jax.Array, key_valid_BxS: jax.Array, positions_BxL: jax.Array | None = None,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0):
    """Runs the scanned layers (`prepare` documents the arguments). Returns (final-normed hidden (B, L, D),
    updated stacked cache or None). The per-layer decode layout lives in `sampling/decode_layout.py`."""
    x, cos, sin, mask, index = self.prepare(embeds_BxLxD, key_valid_BxS, positions_BxL, cache, cache_index)
    if cache is not None:
      if isinstance(cache["k"], tuple):
        raise ValueError("per-layer KV caches (decode_layout.init_cache(..., per_layer=True)) go with the "
                         "unrolled layers of sampling/decode_layout.hidden; the scanned layers take a stacked cache")
      cache = jax.tree.map(lambda c: sharding.constrain(c, CACHE_NAMES), cache)
    x, new_cache = self.layers(x, cos, sin, mask, index, cache)
    return self.norm(x), new_cache


class Qwen2ForCausalLM(nn.Module):
  """Backbone + lm_head (tied to the embedding when `tie_word_embeddings`)."""
  cfg: ModelConfig

  def setup(self):
    self.backbone = Qwen2Backbone(self.cfg)
    if not self.cfg.tie_word_embeddings:
      self.lm_head = _dense(self.cfg, self.cfg.vocab_size, ("embed",), ("vocab",), "lm_head")

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """fp32 logits (B, L, V)."""
    out = self.backbone.attend_embedding(h_BxLxD) if self.cfg.tie_word_embeddings else self.lm_head(h_BxLxD)
    return sharding.constrain(out.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None):
    """Full forward without a cache: returns fp32 logits (B, L, V)."""
    if attention_mask_BxL is None:
      attention_mask_BxL = jnp.ones(input_ids_BxL.shape, bool)
    h, _ = self.backbone(self.backbone.embed(input_ids_BxL), attention_mask_BxL, positions_BxL)
    return self.logits(h)

  def decode(self, input_ids_BxL: jax.Array, key_valid_BxS: jax.Array, cache: KVCache, cache_index):
    """Cached step(s): writes L new positions at `cache_index`; returns (fp32 logits (B, L, V), new cache)."""
    h, cache = self.backbone(self.backbone.embed(input_ids_BxL), key_valid_BxS, None, cache, cache_index)
    return self.logits(h), cache
