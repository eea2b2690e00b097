"""`layers.mixed_dot`: the bf16 dense dot on CPU (fp32 accumulation, hand-written backward) against the plain
autodiff of the same dot computed in fp32 on the bf16-rounded operands — values and both gradients — for the
one-axis (q/k/v, MLP) and two-axis (o_proj: (heads, head_dim) → embed) contractions, and inside a bf16 model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.config import ModelConfig, tiny
from nextstep_jax.models.layers import dense, mixed_dot
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM

BF16 = jnp.bfloat16


def _reference(x, k, n):
  """fp32 dot of the bf16 operands (what bf16-in/fp32-accumulate computes), rounded to bf16 like mixed_dot."""
  dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
  return jax.lax.dot_general(x.astype(jnp.float32), k.astype(jnp.float32), dims).astype(BF16)


@pytest.mark.parametrize("x_shape,k_shape,n", [((3, 5, 32), (32, 48), 1), ((3, 5, 4, 8), (4, 8, 24), 2),
                                               ((6, 16), (16, 2, 8), 1), ((1, 16), (16, 16), 1)])
@pytest.mark.parametrize("cotangent", ["random", "ones"])  # "ones": a broadcast operand XLA likes to fuse
def test_mixed_dot_value_and_gradients_match_fp32_autodiff(x_shape, k_shape, n, cotangent):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), BF16)
  k = jnp.asarray(rng.normal(size=k_shape) * 0.3, BF16)
  out_shape = x_shape[:x.ndim - n] + k_shape[n:]
  w = jnp.asarray(rng.normal(size=out_shape) if cotangent == "random" else np.ones(out_shape), jnp.float32)
  loss = lambda f: (lambda x, k: jnp.sum(f(x, k, n).astype(jnp.float32) * w))
  got_v, got_g = jax.value_and_grad(loss(mixed_dot), argnums=(0, 1))(x, k)
  want_v, want_g = jax.value_and_grad(loss(_reference), argnums=(0, 1))(x, k)
  np.testing.assert_allclose(np.float32(got_v), np.float32(want_v), rtol=1e-2)
  for got, want, name in zip(got_g, want_g, ("dx", "dk")):
    assert got.dtype == BF16 and got.shape == want.shape, name
    err = np.abs(np.float32(got) - np.float32(want)).max() / np.abs(np.float32(want)).max()
    assert err < 1e-2, f"{name}: relative error {err:.2e}"


def test_bf16_model_on_cpu_uses_mixed_dot_and_matches_autodiff_gradients():
  """A bf16 Qwen2 on CPU: its dense layers take the mixed_dot path, and its gradients agree with the same model
  whose dense dots are plain autodiff (loss to bf16 accuracy, gradient direction cosine > 0.999)."""
  cfg = ModelConfig.from_dict(dict(tiny(), dtype="bfloat16"))
  layer = dense(8, ("embed",), ("mlp",), use_bias=False, dtype=BF16, param_dtype=jnp.float32, name="d")
  assert layer.dot_general is not None  # the mixed path is selected on CPU
  model = Qwen2ForCausalLM(cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  params = model.init(jax.random.key(0), ids)

  def loss(p):
    logits = model.apply(p, ids)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))
  got_l, got_g = jax.value_and_grad(loss)(params)
  import nextstep_jax.models.layers as layers
  orig = layers._dense_dot
  try:
    layers._dense_dot = lambda lhs, rhs, dims, precision=None, preferred_element_type=None: jax.lax.dot_general(
        lhs, rhs, dims)
    want_l, want_g = jax.value_and_grad(loss)(params)
  finally:
    layers._dense_dot = orig
  np.testing.assert_allclose(float(got_l), float(want_l), rtol=2e-2)
  a, b = (np.concatenate([np.ravel(np.float32(x)) for x in jax.tree.leaves(g)]) for g in (got_g, want_g))
  assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
