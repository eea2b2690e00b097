"""Attention dispatch: xla reference vs a numpy reference, splash (Pallas, interpreted on CPU) vs xla, and the real
splash kernel lowering + compiling for a TPU topology (XLA:TPU, compile only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, tiny
from nextstep_jax.models import attention
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM


def _inputs(b=2, l=128, h=4, g=2, k=16, seed=0):
  rng = np.random.RandomState(seed)
  q, kk, v = (rng.randn(b, l, n, k).astype(np.float32) for n in (h, g, g))
  valid = np.ones((b, l), bool)
  valid[1, :37] = False  # left padding in row 1
  mask = np.tril(np.ones((l, l), bool))[None] & valid[:, None, :]
  return q, kk, v, mask


def _numpy_attention(q, k, v, mask):
  b, l, h, d = q.shape
  rep = h // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(d)
  s = np.where(mask[:, None], s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhls,bshd->blhd", p, v)


def test_xla_attention_matches_numpy():
  q, k, v, mask = _inputs(l=20)
  got = np.asarray(attention.xla_attention(*(jnp.asarray(a) for a in (q, k, v, mask))))
  valid_rows = mask.any(-1)
  np.testing.assert_allclose(got[valid_rows], _numpy_attention(q, k, v, mask)[valid_rows], atol=1e-5)


def test_splash_interpreted_matches_xla_on_real_rows():
  q, k, v, mask = _inputs()
  ref = np.asarray(attention.xla_attention(*(jnp.asarray(a) for a in (q, k, v, mask))))
  got = np.asarray(attention.splash_attention(*(jnp.asarray(a) for a in (q, k, v, mask)), interpret=True))
  real = mask.any(-1)
  err = np.abs(got - ref)[real].max()
  print(f"splash (interpret) vs xla max abs error: {err:.2e}")
  assert err < 1e-4


def test_dispatch_falls_back_to_xla_for_decode_steps():
  assert attention.resolve_impl("splash", 1, 256, jnp.bfloat16) == "xla"
  assert attention.resolve_impl("splash", 100, 100, jnp.bfloat16) == "xla"  # not a multiple of the 128 block
  assert attention.resolve_impl("splash", 256, 256, jnp.bfloat16) == "splash"
  assert attention.resolve_impl("auto", 256, 256, jnp.float32) == "xla"  # CPU


def test_splash_lowers_and_compiles_for_a_tpu_topology():
  """The TPU path: real Pallas kernel (tpu_custom_call) under shard_map, compiled by XLA:TPU for v5p-8."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from nextstep_jax.tpu_topology import topology_devices
  pod, devices = topology_devices("v5p-8")
  assert pod.topology == "v5:2x2x1" and len(devices) == 4
  cfg = ModelConfig.from_dict(dict(tiny(), attention_impl="splash", dtype="bfloat16"))
  model = Qwen2ForCausalLM(cfg)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=2), devices=devices)
  abstract, names = sharding.abstract_with_names(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32)),
                                                 jax.random.key(0))
  shardings = sharding.tree_shardings(names, abstract, mesh)
  params = sharding.abstract_sharded(abstract, shardings)
  ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  with sharding.use_mesh(mesh):
    lowered = jax.jit(jax.grad(lambda p, i: model.apply(p, i).mean())).lower(params, ids)
    compiled = lowered.compile()
  assert "tpu_custom_call" in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_unknown_pod_name_is_a_clear_error():
  from nextstep_jax.tpu_topology import pod_type
  with pytest.raises(ValueError, match="unknown TPU pod type 'v5p-300'"):
    pod_type("v5p-300")
  assert pod_type("v4-64").topology == "v4:2x4x4" and pod_type("v5e-256").topology == "v5e:16x16"
  assert pod_type("v5p-128").num_chips == 64 and pod_type("v6e-256").topology == "v6e:16x16"
