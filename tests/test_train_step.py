"""Trainer step: sharded == single device (4 meshes, real rule table), gradient accumulation == one big batch,
NaN guard, optimizer masks and schedule, a tiny model's loss falls."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextstep_jax.train.step import loss_and_grads
from nextstep_jax.train.synthetic import synthetic_batch
from sharding_harness import TEST_MESHES, max_relative_error
from train_utils import TINY, random_params, run_steps, train_cfg


@pytest.fixture(scope="module")
def reference():
  params = random_params(TINY)
  return params, run_steps((1, 1, 1), params=params)


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_training_equals_single_device(reference, mesh_shape):
  params, (ref_params, ref_hist, ref_grads) = reference
  got_params, hist, grads = run_steps(mesh_shape, params=params)
  loss_err = max(abs(float(a["loss"]) - float(b["loss"])) / abs(float(b["loss"])) for a, b in zip(hist, ref_hist))
  g_err, p_err = max_relative_error(grads, ref_grads), max_relative_error(got_params, ref_params)
  print(f"mesh {mesh_shape}: loss {loss_err:.1e}, grads {g_err:.1e}, params after 3 steps {p_err:.1e} (relative)")
  assert loss_err <= 1e-5 and g_err <= 1e-5 and p_err <= 1e-5


def test_gradient_accumulation_equals_one_big_batch(reference):
  params, (ref_params, ref_hist, ref_grads) = reference
  got_params, hist, grads = run_steps((1, 1, 1), microbatches=4, params=params)
  for a, b in zip(hist, ref_hist):
    for k in ("loss", "text_loss", "image_loss", "grad_norm"):
      assert abs(float(a[k]) - float(b[k])) <= 1e-5 * abs(float(b[k])), k
  err = max_relative_error(grads, ref_grads)
  print(f"accumulated (4 micro-batches) vs one batch: grads {err:.1e}, "
        f"params {max_relative_error(got_params, ref_params):.1e}")
  assert err <= 1e-5 and max_relative_error(got_params, ref_params) <= 1e-5


def test_nan_guard_skips_update_and_counts():
  from nextstep_jax import sharding
  from nextstep_jax.train.optimizer import make_optimizer
  from nextstep_jax.train.state import init_state
  from nextstep_jax.train.step import train_step
  from nextstep_jax.train.synthetic import synthetic_batch
  tx, sched = make_optimizer(train_cfg(schedule="constant", warmup_steps=0))
  state = init_state(TINY, tx, sharding.mesh_from_shape((1, 1, 1)), jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(TINY, 0, 2, 40, 16).items()}
  step = jax.jit(lambda s, b: train_step(TINY, tx, sched, 1, s, b, jax.random.key(0)))
  bad = dict(batch, image_tokens=batch["image_tokens"].at[0, 0, 0].set(jnp.nan))
  new, m = step(state, bad)
  assert not bool(m["update_ok"]) and int(new.skipped) == 1 and int(new.step) == 1
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new.params, state.params))
  new2, m2 = step(new, batch)
  assert bool(m2["update_ok"]) and int(new2.skipped) == 1
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new2.params, new.params))


def test_weight_decay_mask_and_schedule():
  from nextstep_jax.train.optimizer import decay_mask, lr_schedule
  mask = traverse_util.flatten_dict(decay_mask(random_params(TINY)))
  assert mask[("params", "backbone", "layers", "mlp", "gate_proj", "kernel")]
  assert mask[("params", "backbone", "embed_tokens", "embedding")]
  assert not mask[("params", "backbone", "layers", "self_attn", "q_proj", "bias")]
  assert not mask[("params", "backbone", "norm", "scale")]
  assert not mask[("params", "image_head", "res_blocks", "in_ln", "scale")]
  s = lr_schedule(train_cfg(lr=1e-4, end_lr=1e-5, warmup_steps=10, steps=110))
  np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(60)), float(s(110))],
                             [0.0, 5e-5, 1e-4, 5.5e-5, 1e-5], rtol=1e-5)


def test_tiny_model_loss_falls_on_a_fixed_batch():
  """50 steps on one fixed synthetic batch: both the text and the image loss fall clearly."""
  from nextstep_jax import sharding
  from nextstep_jax.train.optimizer import make_optimizer
  from nextstep_jax.train.state import init_state
  from nextstep_jax.train.step import train_step
  from nextstep_jax.train.synthetic import synthetic_batch
  tx, sched = make_optimizer(train_cfg(lr=3e-3, warmup_steps=5, steps=50, end_lr=3e-4))
  state = init_state(TINY, tx, sharding.mesh_from_shape((1, 1, 1)), jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(TINY, 0, 4, 40, 16, text_len=12).items()}
  step = jax.jit(lambda s, b: train_step(TINY, tx, sched, 1, s, b, jax.random.key(3)))
  hist = []
  for _ in range(50):
    state, m = step(state, batch)
    hist.append({k: float(m[k]) for k in ("text_loss", "image_loss")})
  first = {k: np.mean([h[k] for h in hist[:5]]) for k in hist[0]}
  last = {k: np.mean([h[k] for h in hist[-5:]]) for k in hist[0]}
  print(f"text loss {first['text_loss']:.3f} → {last['text_loss']:.3f}; "
        f"image loss {first['image_loss']:.3f} → {last['image_loss']:.3f}")
  assert last["text_loss"] < 0.5 * first["text_loss"]
  assert last["image_loss"] < 0.8 * first["image_loss"]


def test_unrolled_layer_scan_equals_rolled():
  """`scan_unroll` (layers per scan iteration, backbone and head) changes the program, not the maths."""
  params = random_params(TINY)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(TINY, 0, 4, 32, 8).items()}
  key = jax.random.key(3)
  unrolled_cfg = dataclasses.replace(TINY, scan_unroll=TINY.num_layers)
  fns = [jax.jit(lambda p, c=c: loss_and_grads(c, p, batch, key)) for c in (TINY, unrolled_cfg)]
  loops = [f.lower(params).as_text().count("stablehlo.while") for f in fns]
  assert loops[1] < loops[0], loops  # the layer loops are gone
  rolled, unrolled = (f(params) for f in fns)
  assert abs(float(unrolled[0]) - float(rolled[0])) <= 1e-6 * abs(float(rolled[0]))
  err = max_relative_error(unrolled[2], rolled[2])
  print(f"scan_unroll={TINY.num_layers} vs 1: grads {err:.1e} (relative)")
  assert err <= 1e-5


def test_params_ema_lives_in_the_optimizer_state_sharded_like_the_params():
  """`train.ema_decay`: ema ← d·ema + (1 − d)·params after every update, d = min(decay, (1 + n) / (10 + n));
  its leaves take the params' shardings; `model_params` picks it; a bad decay is a one-line error."""
  from nextstep_jax import sharding
  from nextstep_jax.train.optimizer import make_optimizer, model_params
  from nextstep_jax.train.state import init_state, state_shardings
  from nextstep_jax.train.step import train_step
  decay = 0.9
  tx, sched = make_optimizer(train_cfg(ema_decay=decay))
  mesh = sharding.mesh_from_shape((2, 4, 1))
  state = init_state(TINY, tx, mesh, jax.random.key(0))
  _, shardings = state_shardings(TINY, tx, mesh)
  flat_p = traverse_util.flatten_dict(shardings.params)
  flat_e = traverse_util.flatten_dict(model_params(shardings.params, shardings.opt_state))
  assert flat_e.keys() == flat_p.keys() and all(flat_e[k] == flat_p[k] for k in flat_p)
  assert any(not s.is_fully_replicated for s in flat_p.values())
  for k, a in traverse_util.flatten_dict(model_params(state.params, state.opt_state)).items():
    assert a.sharding == flat_p[k], "/".join(k)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(TINY, 0, 4, 40, 16, text_len=12).items()}
  step = jax.jit(lambda s, b: train_step(TINY, tx, sched, 1, s, b, jax.random.key(3)))
  expected = jax.tree.map(np.asarray, jax.device_get(state.params))
  for n in range(4):
    state, _ = step(state, batch)
    d = min(decay, (1 + n) / (10 + n))
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), expected, jax.device_get(state.params))
  got = jax.device_get(model_params(state.params, state.opt_state))
  assert max_relative_error(got, expected) < 1e-6
  assert max_relative_error(got, jax.device_get(state.params)) > 1e-3  # an average, not the params
  assert model_params(state.params, make_optimizer(train_cfg())[0].init(state.params)) is state.params
  with pytest.raises(ValueError, match="ema_decay"):
    make_optimizer(train_cfg(ema_decay=1.5))
