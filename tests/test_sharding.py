"""Mesh construction, the logical rule table, born-sharded init, and sharded == single-device numerics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, load_config, nextstep1_14b, qwen2_5_14b, tiny
from nextstep_jax.models.fm_head import FlowHead
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM
from sharding_harness import TEST_MESHES, max_relative_error, run_on_mesh


def test_mesh_sizes_and_rest_axis():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)).shape["fsdp"] == 8


@pytest.mark.parametrize("cfg,match", [
    (dict(data=2, fsdp=4, tensor=2), r"data=2 × fsdp=4 × tensor=2 = 16 devices but 8 are available"),
    (dict(data=-1, fsdp=-1, tensor=1), r"at most one axis may be -1"),
    (dict(data=-1, fsdp=3, tensor=1), r"cannot fill 8 devices"),
])
def test_mesh_device_mismatch_is_a_clear_error(cfg, match):
  with pytest.raises(sharding.MeshError, match=match):
    sharding.make_mesh(cfg)


def test_rules_resolve_megatron_layout_and_skip_non_divisible():
  mesh = sharding.mesh_from_shape((2, 2, 2))
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("mlp", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("act_batch", "act_len"), (8, 5), mesh) == P(("data", "fsdp"))
  # 6 rows are not divisible by data×fsdp=4: falls back to data alone
  assert sharding.logical_to_spec(("act_batch", "act_len"), (6, 5), mesh) == P("data")
  # 3 kv heads cannot be split over tensor=2: replicated on that dim
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == P("fsdp")


def test_params_are_born_sharded():
  cfg = ModelConfig.from_dict(tiny())
  model = Qwen2ForCausalLM(cfg)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  params, shardings = sharding.init_sharded(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32)), mesh,
                                            jax.random.key(0))
  q = params["params"]["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
  assert jax.tree.all(jax.tree.map(lambda p, s: p.sharding == s, params, shardings))


@pytest.mark.parametrize("preset", ["qwen2_5_14b", "nextstep1_14b"])
def test_14b_parameters_sufficiently_sharded_on_64_devices(preset):
  """≤ 2% of the 14B model's parameters replicated on a 64-device mesh (abstract: no allocation)."""
  from nextstep_jax.models.nextstep import abstract_params
  cfg = ModelConfig.from_dict(dict(qwen2_5_14b() if preset == "qwen2_5_14b" else nextstep1_14b(), dtype="bfloat16"))
  abstract, names = abstract_params(cfg, nextstep=preset == "nextstep1_14b")
  mesh = jax.sharding.AbstractMesh((1, 16, 4), sharding.MESH_AXES)
  shardings = sharding.tree_shardings(names, abstract, mesh)
  frac = sharding.assert_params_sufficiently_sharded(abstract, shardings)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  print(f"{preset}: {total:,} parameters, {frac:.3%} replicated on (1,16,4)")
  assert frac < 0.02
  # a mesh with only data parallelism replicates everything → the check must fail
  with pytest.raises(sharding.MeshError, match="fully replicated"):
    dp = jax.sharding.AbstractMesh((64, 1, 1), sharding.MESH_AXES)
    sharding.assert_params_sufficiently_sharded(abstract, sharding.tree_shardings(names, abstract, dp))


def _ce_loss(model):
  def loss(params, batch):
    logits = model.apply(params, batch["ids"])
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1))
  return lambda p, b: jax.value_and_grad(loss)(p, b)


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_backbone_forward_and_grads_sharded_equal_single_device(mesh_shape):
  cfg = ModelConfig.from_dict(tiny())
  model = Qwen2ForCausalLM(cfg)
  boxed = model.init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))
  params, names = nn.unbox(boxed), sharding.logical_names(boxed)
  batch = {"ids": jnp.asarray(np.random.RandomState(0).randint(0, 300, (16, 12)), jnp.int32)}
  ref = jax.device_get(jax.jit(_ce_loss(model))(params, batch))
  got = run_on_mesh(_ce_loss(model), params, names, batch, mesh_shape)
  err = max_relative_error(got, ref)
  print(f"mesh {mesh_shape}: max relative error (loss, grads) {err:.2e}")
  assert err <= 1e-5


def test_harness_catches_the_xla_cpu_wrong_gradient_layout():
  """Negative control (JAX_NOTES §2): two chained kernels both P(fsdp, tensor) on (2,2,2) give wrong grads on
  XLA:CPU. The same harness that guards our rules must see the difference — otherwise it could never fail."""
  rng = np.random.RandomState(0)
  # square 8×8 kernels reproduce it on jax 0.10.2 (rectangular ones did not in our trials)
  params = {"w1": jnp.asarray(rng.randn(8, 8), jnp.float32), "w2": jnp.asarray(rng.randn(8, 8), jnp.float32)}
  batch = {"x": jnp.asarray(rng.randn(16, 8), jnp.float32)}

  def fn(p, b):
    return jax.grad(lambda p: jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]) ** 2))(p)
  ref = jax.jit(fn)(params, batch)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  bad = {k: NamedSharding(mesh, P("fsdp", "tensor")) for k in params}
  got = jax.jit(fn)(jax.device_put(params, bad), jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp")))))
  bad_err = max_relative_error(jax.device_get(got), jax.device_get(ref))
  good = {"w1": NamedSharding(mesh, P("fsdp", "tensor")), "w2": NamedSharding(mesh, P("tensor", "fsdp"))}
  got = jax.jit(fn)(jax.device_put(params, good), jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp")))))
  good_err = max_relative_error(jax.device_get(got), jax.device_get(ref))
  print(f"same-layout kernels: {bad_err:.2e}; Megatron layout: {good_err:.2e}")
  assert good_err <= 1e-5
  if bad_err <= 1e-5:
    pytest.fail("XLA:CPU no longer miscomputes the same-layout case; update JAX_NOTES §2 and keep this "
                f"test as a regression check (error {bad_err:.2e})")


def _head_loss(model):
  def loss(params, batch):
    v = model.apply(params, batch["x"], batch["t"], batch["c"])
    return jnp.mean((v - batch["x"]) ** 2)
  return lambda p, b: jax.value_and_grad(loss)(p, b)


@pytest.mark.parametrize("rows", [48, 64, 96])
def test_flow_head_sharded_equals_single_device_at_every_row_count(rows):
  """On (2,2,2) the head at 48/64/96 rows was O(0.2) wrong before `split_modulation` gathered the adaLN chunks
  (32 and 128 rows happened to be right, and were all earlier tests used)."""
  cfg = ModelConfig.from_dict(tiny())
  model = FlowHead(cfg)
  rng = np.random.RandomState(rows)
  boxed = model.init(jax.random.key(0), jnp.zeros((2, cfg.token_dim)), jnp.zeros((2,)), jnp.zeros((2, 64)))
  names = sharding.logical_names(boxed)  # zero-initialised adaLN/final weights would hide the error: perturb all
  params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.randn(*p.shape), p.dtype), nn.unbox(boxed))
  batch = {"x": jnp.asarray(rng.randn(rows, cfg.token_dim), jnp.float32),
           "t": jnp.asarray(rng.rand(rows), jnp.float32), "c": jnp.asarray(rng.randn(rows, 64), jnp.float32)}
  ref = jax.device_get(jax.jit(_head_loss(model))(params, batch))
  got = run_on_mesh(_head_loss(model), params, names, batch, (2, 2, 2))
  err = max_relative_error(got, ref)
  print(f"{rows} rows on (2,2,2): max relative error (loss, grads) {err:.2e}")
  assert err <= 1e-5


def test_harness_catches_the_xla_split_chunk_miscompile():
  """Negative control for `fm_head.split_modulation`: chunks of one batch-sharded product, one through a
  row-parallel (tensor, fsdp) kernel times another, come out wrong on (2,2,2) unless the feature axis is gathered
  before the split."""
  rng = np.random.RandomState(0)
  w = 48
  a = jnp.asarray(rng.randn(w, 3 * w) * 0.1, jnp.float32)
  b = jnp.asarray(rng.randn(w, w) * 0.1, jnp.float32)
  y = jnp.asarray(rng.randn(64, w), jnp.float32)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  rows = NamedSharding(mesh, P(("data", "fsdp")))

  def fn(gather):
    def f(a, b, y):
      mod = y @ a
      if gather:
        mod = jax.lax.with_sharding_constraint(mod, NamedSharding(mesh, P(("data", "fsdp"), None)))
      shift, _, gate = jnp.split(mod, 3, -1)
      return gate * (shift @ b)
    return jax.jit(f)
  ref = fn(False)(a, b, y)
  args = (jax.device_put(a, NamedSharding(mesh, P())), jax.device_put(b, NamedSharding(mesh, P("tensor", "fsdp"))),
          jax.device_put(y, rows))
  bad_err = max_relative_error(jax.device_get(fn(False)(*args)), jax.device_get(ref))
  good_err = max_relative_error(jax.device_get(fn(True)(*args)), jax.device_get(ref))
  print(f"split chunks: {bad_err:.2e}; gathered before the split: {good_err:.2e}")
  assert good_err <= 1e-5
  if bad_err <= 1e-5:
    pytest.fail("XLA no longer miscomputes split chunks; update fm_head.split_modulation's note and docs/GRPO.md, "
                f"and keep this test as a regression check (error {bad_err:.2e})")


def test_config_overrides_and_validation_errors():
  from nextstep_jax.config import ConfigError
  cfg = load_config("configs/tiny.py", ["--config.model.num_layers=3", "--config.model.rope_theta=10000"])
  assert cfg.model.num_layers == 3 and cfg.model.rope_theta == 10000.0
  with pytest.raises(ConfigError, match="no field 'model.num_layer'"):
    load_config("configs/tiny.py", ["--config.model.num_layer=3"])
  bad = [(dict(num_heads=5, head_dim=None), "num_heads=5 does not divide hidden_size=64"),
         (dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
         (dict(dtype="float8"), "dtype='float8' is not one of"),
         (dict(boi_id=999), "boi_id=999 is outside the vocabulary"),
         (dict(head_dim=15), "must be even")]
  for over, msg in bad:
    with pytest.raises(ConfigError, match=msg):
      ModelConfig.from_dict(dict(tiny(), **over))
  with pytest.raises(ConfigError, match="unknown field"):
    ModelConfig.from_dict(dict(tiny(), hidden=3))
