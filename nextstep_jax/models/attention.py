"""Attention dispatch: one function, three implementations chosen by `config.model.attention_impl`.

* `xla`    — grouped-query einsum with an fp32 softmax (the CPU reference; also used for KV-cache decode steps).
* `cudnn`  — `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16).
* `splash` — Pallas splash attention (TPU; `interpret=True` on CPU for tests), under `shard_map` when a mesh is active.
* `auto`   — splash on TPU, cuDNN on GPU with half-precision inputs, otherwise xla.

All take q (B, L, H, K), k/v (B, S, G, K) with H a multiple of G, and `mask` (B, L, S) bool (True = attend),
and return (B, L, H, K) in q's dtype. Scores are scaled by 1/sqrt(K).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nextstep_jax import sharding

MASK_VALUE = float(np.finfo(np.float32).min)


def resolve_impl(impl: str, q_len: int, kv_len: int, dtype) -> str:
  """Which implementation `impl` means for this call (splash/cudnn need full sequences, not decode steps)."""
  platform = sharding.target_platform()
  if impl == "auto":
    if platform == "tpu":
      impl = "splash"
    elif platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      impl = "cudnn"
    else:
      impl = "xla"
  if impl == "splash" and (q_len != kv_len or q_len % 128):
    return "xla"  # decode steps / short sequences: blocks of 128 do not fit
  if impl == "cudnn" and q_len == 1:
    return "xla"
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "xla", *,
           causal_only: bool = False) -> jax.Array:
  """Masked multi-head attention with grouped KV heads. `causal_only` promises mask == causal ∧ key_valid."""
  impl = resolve_impl(impl, q.shape[1], k.shape[1], q.dtype)
  if impl == "xla":
    return xla_attention(q, k, v, mask)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn").astype(q.dtype)
  if impl == "splash":
    return splash_attention(q, k, v, mask, interpret=sharding.target_platform() != "tpu")
  raise ValueError(f"unknown attention implementation {impl!r}; use one of auto, xla, cudnn, splash")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Reference GQA attention: q (B,L,H,K), k/v (B,S,G,K), mask (B,L,S)."""
  b, l, h, d = q.shape
  g = k.shape[2]
  q = q.reshape(b, l, g, h // g, d)
  # both dots as (b, g)-batched matmuls with the contraction on the lhs's last axis (XLA:CPU's fast path)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, G, S, K): the KV cache's own layout
  scores = jnp.einsum("blgrd,bgsd->bgrls", q, k, preferred_element_type=jnp.float32) / np.sqrt(d).astype(np.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrls,bgsd->bgrld", probs, v, preferred_element_type=jnp.float32)
  return jnp.moveaxis(out, 3, 1).reshape(b, l, h, d).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, interpret: bool = False
                     ) -> jax.Array:
  """Causal splash attention; padding is expressed as segment ids (pads = segment 0, real tokens = 1).

  Only the causal ∧ key-valid mask family is supported (what prefill and training use); `mask` is reduced
  to per-row key validity `mask.any(axis=1)`.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, l, h, d = q.shape
  g = k.shape[2]
  valid = jnp.any(mask, axis=1).astype(jnp.int32)  # (B, S)
  mesh = sharding.active_mesh()
  batch_spec = sharding.logical_to_spec(("act_batch", "act_heads"), (b, h), mesh)[0] if mesh is not None else None
  head_spec = sharding.logical_to_spec(("act_batch", "act_heads"), (b, h), mesh) if mesh is not None else None
  head_axis = head_spec[1] if head_spec is not None and len(head_spec) > 1 else None
  head_shards = mesh.shape[head_axis] if head_axis else 1
  if g % head_shards:
    head_axis, head_shards = None, 1
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((l, l))] * (h // head_shards)),
                              head_shards=1, q_seq_shards=1, interpret=interpret)

  def per_device(q_, k_, v_, valid_):
    def one(qh, kh, vh, seg):
      ids = sk.SegmentIds(q=seg, kv=seg)
      return kernel(qh, kh, vh, segment_ids=ids)
    out = jax.vmap(one)(jnp.swapaxes(q_, 1, 2) / np.sqrt(d).astype(q_.dtype), jnp.swapaxes(k_, 1, 2),
                        jnp.swapaxes(v_, 1, 2), valid_)
    return jnp.swapaxes(out, 1, 2)

  if mesh is None or mesh.size == 1:
    return per_device(q, k, v, valid).astype(q.dtype)
  qkv_spec = P(batch_spec, None, head_axis, None)
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_spec, None)),
                     out_specs=qkv_spec, check_vma=False)
  return fn(q, k, v, valid).astype(q.dtype)
