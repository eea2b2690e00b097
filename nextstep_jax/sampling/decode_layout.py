"""The token loop's weight/KV layout: per-layer buffers on CPU/GPU, the scanned stacks on TPU.

A `lax` loop that slices stacked weights makes XLA:CPU copy them every step (measured: 1.6× slower per token for
the decoder, the head's slices cost as much as its math). So, outside jit, `split_for_decode` moves each decoder
layer and each head res-block into its own buffers under `DECODE_KEYS`, and the loop runs the layers as an
unrolled Python loop over them with one KV buffer per layer (each step updates one position of each in place).
Without the split (TPU default) the scanned decoder and a stacked cache run unchanged and the head blocks are
sliced once per program, outside the loop. The models keep their one (scanned) code path; this module composes
their pieces (`Qwen2Backbone.prepare`, `DecoderLayer`, the final norm) for the unrolled one.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.models.layers import to_dtype
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.models.qwen2 import CACHE_NAMES, DecoderLayer, KVCache
from nextstep_jax.models.qwen2 import init_cache as init_stacked_cache

DECODE_KEYS = ("unstacked_layers", "unstacked_head_blocks")


def _unstack(stacked: Any) -> tuple[Any, ...]:
  n = jax.tree.leaves(stacked)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


def split_head_blocks(params: dict) -> tuple[dict, tuple[dict, ...]]:
  """{"params": {..., "image_head": {..., "res_blocks": stacked}}} → (the same without `res_blocks`, per-block
  param trees) — outside jit: separate buffers; inside jit: sliced once per program, outside the token loop."""
  head = dict(params["params"]["image_head"])
  blocks = _unstack(head.pop("res_blocks"))
  return dict(params, params=dict(params["params"], image_head=head)), blocks


def split_for_decode(params: dict) -> dict:
  """Per-layer layout (run once, outside jit): decoder layers under "unstacked_layers", head res-blocks under
  "unstacked_head_blocks", the rest under "params"."""
  backbone = dict(params["params"]["backbone"])
  layers = _unstack(backbone.pop("layers"))
  rest, blocks = split_head_blocks({**params, "params": dict(params["params"], backbone=backbone)})
  return dict(rest, unstacked_layers=layers, unstacked_head_blocks=blocks)


def unpack(params: dict) -> tuple[dict, tuple | None, tuple]:
  """(model params without the layout keys, per-layer trees or None (scanned), per-block head trees) — traceable."""
  layers, head_blocks = (params.get(k) for k in DECODE_KEYS)
  params = {k: v for k, v in params.items() if k not in DECODE_KEYS}
  if head_blocks is None:  # stacked head: slice the blocks once, outside the token loop
    params, head_blocks = split_head_blocks(params)
  return params, layers, head_blocks


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None, per_layer: bool = False) -> KVCache:
  """Zeroed static KV cache: stacked (the scanned layers') or, with `per_layer`, {"k": Ly-tuple of
  (batch, kv_heads, max_len, head_dim), "v": …} for the unrolled layers."""
  if not per_layer:
    return init_stacked_cache(cfg, batch, max_len, dtype)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
  dtype = to_dtype(dtype or cfg.dtype)
  return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for name in ("k", "v")}


def _prepare(module: NextStep, *args):
  return module.backbone.prepare(*args)


def _final_norm(module: NextStep, x):
  return module.backbone.norm(x)


def hidden(model: NextStep, params: dict, layers: tuple | None, embeds_BxLxD: jax.Array, key_valid_BxS: jax.Array,
           cache: KVCache, cache_index) -> tuple[jax.Array, KVCache]:
  """`NextStep.hidden` with a cache in either layout: scanned when `layers` is None, else an unrolled loop over the
  per-layer trees and per-layer KV buffers. Returns (final-normed hidden (B, L, D), updated cache)."""
  if layers is None:
    return model.apply(params, embeds_BxLxD, key_valid_BxS, None, cache, cache_index, method=NextStep.hidden)
  x, cos, sin, mask, index = model.apply(params, embeds_BxLxD, key_valid_BxS, None, cache, cache_index,
                                         method=_prepare)
  layer = DecoderLayer(model.cfg, parent=None)  # a free-standing module, applied functionally per layer
  new = {"k": [], "v": []}
  for i, p in enumerate(layers):
    kv = {n: sharding.constrain(cache[n][i], CACHE_NAMES[1:]) for n in ("k", "v")}
    x, kv = layer.apply({"params": p}, x, cos, sin, mask, index, kv)
    for n in ("k", "v"):
      new[n].append(kv[n])
  return model.apply(params, x, method=_final_norm), {n: tuple(c) for n, c in new.items()}
