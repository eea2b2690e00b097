"""Flow-matching DPO (train/dpo.py): per-row errors against the model's own FM loss, loss = log 2 at policy =
reference, the gradient against the FM-loss gradient (analytic at policy = reference) and against finite
differences, the reference is never differentiated, accumulation, NaN guard."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.models.nextstep import NextStep, draw_fm_noise
from nextstep_jax.train import dpo
from nextstep_jax.train.synthetic import synthetic_pair_batch
from sharding_harness import max_relative_error
from train_utils import TINY, random_params, train_on_mesh

B, L, T = 4, 40, 16


@pytest.fixture(scope="module")
def setup():
  params = jax.tree.map(jnp.asarray, random_params(TINY))
  batch = {k: jnp.asarray(v) for k, v in synthetic_pair_batch(TINY, 0, B, L, T).items()}
  return params, batch


def _loss_and_grads(dcfg, microbatches=1):
  return jax.jit(lambda p, r, b, k: dpo.dpo_loss_and_grads(TINY, dcfg, p, r, b, k, microbatches))


def _fm_loss(params, batch, tokens, noise, u):
  """Winner-style FM image loss of `tokens` by the model's own NextStep.loss_terms (independent of dpo.py)."""
  terms = NextStep(TINY).apply(params, dict(batch, image_tokens=tokens), noise, u, method=NextStep.loss_terms)
  return terms["fm_sum"] / terms["fm_count"]


def test_row_errors_are_the_model_fm_loss_per_row(setup):
  params, batch = setup
  noise, u = draw_fm_noise(TINY, jax.random.key(3), B, T)
  sums, counts = jax.jit(lambda p, b, n, uu: NextStep(TINY).apply(p, b, b["image_tokens"], n, uu,
                                                                  method=dpo.fm_row_errors))(params, batch, noise, u)
  terms = jax.jit(lambda p, b, n, uu: NextStep(TINY).apply(p, b, n, uu, method=NextStep.loss_terms))
  for i in (0, 3):  # a row alone through the model's loss = that row's entry
    row = {k: v[i:i + 1] for k, v in batch.items()}
    t = terms(params, row, noise[:, i:i + 1], u[:, i:i + 1])
    np.testing.assert_allclose(float(sums[i]), float(t["fm_sum"]), rtol=2e-6)
    assert float(counts[i]) == float(t["fm_count"]) == T * TINY.fm_head_batch_mul


@pytest.mark.parametrize("beta", [10.0, 5000.0])
def test_loss_is_log2_when_policy_is_the_reference(setup, beta):
  """Exactly log 2 up to fp32 rounding of the errors (~1e-7 relative, amplified by β/4 in the loss)."""
  params, batch = setup
  loss, sums, _ = _loss_and_grads(dpo.DpoConfig(beta=beta, ref_dtype="float32"))(params, params, batch,
                                                                                  jax.random.key(1))
  err = abs(float(loss) - math.log(2))
  print(f"β={beta}: policy = reference → loss − log 2 = {float(loss) - math.log(2):.2e}")
  assert err <= 1e-6 + beta * 2e-7
  assert abs(float(sums["margin_sum"])) / B <= 1e-6 + beta * 4e-7
  assert float(sums["pairs"]) == B


def test_gradient_at_the_reference_is_beta_over_4_times_the_fm_gap(setup):
  """At policy = reference σ(margin) = ½, so ∇L = β/4 · ∇(FM(winners) − FM(losers)) (+ sft_weight · ∇FM(winners))
  — checked against gradients of the model's own flow-matching loss on the same draws."""
  params, batch = setup
  beta, sft = 10.0, 0.5
  key = jax.random.key(1)
  _, _, grads = _loss_and_grads(dpo.DpoConfig(beta=beta, sft_weight=sft, ref_dtype="float32"))(params, params,
                                                                                                batch, key)
  noise, u = draw_fm_noise(TINY, key, B, T)
  expected = jax.jit(jax.grad(lambda p: beta / 4 * (_fm_loss(p, batch, batch["image_tokens"], noise, u)
                                                    - _fm_loss(p, batch, batch[dpo.REJECTED], noise, u))
                              + sft * _fm_loss(p, batch, batch["image_tokens"], noise, u)))(params)
  g, e = jax.tree.leaves(grads), jax.tree.leaves(expected)
  total = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in e)))
  diff = float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                           for a, b in zip(g, e))))
  print(f"∇L vs β/4·∇(FM_w − FM_l) + sft·∇FM_w: global relative error {diff / total:.1e}")
  assert diff / total <= 1e-4


def test_gradient_matches_finite_differences(setup):
  """Directional derivative of the DPO loss (sft_weight 0) along a random direction of the flow head's output
  layer, at a point where policy ≠ reference (margins far from 0, σ ≠ ½).

  fp32-safe by construction: v̂ is affine in that layer, so every flow-matching error is an exact quadratic along
  the direction and steps of one parameter standard deviation are affordable (the loss's fp32 rounding, ~5e-7,
  is then negligible; along directions through the backbone, the tiny winner-minus-loser derivative drowns in
  it). All parameters' gradients are checked exactly by the β/4 identity above."""
  from flax import traverse_util
  params, batch = setup
  flat = traverse_util.flatten_dict(params)
  other = traverse_util.flatten_dict(random_params(TINY, seed=1))
  in_layer = lambda k: k[-3:-1] == ("final_layer", "linear")
  ref = traverse_util.unflatten_dict({k: 10.0 * other[k] if in_layer(k) else v for k, v in flat.items()})
  dcfg = dpo.DpoConfig(beta=2.0, sft_weight=0.0, ref_dtype="float32")
  key = jax.random.key(2)
  fn = _loss_and_grads(dcfg)
  loss, sums, grads = fn(params, ref, batch, key)
  rng = np.random.default_rng(8)
  direction = traverse_util.unflatten_dict({k: (np.std(v) * rng.standard_normal(v.shape) if in_layer(k) else
                                                np.zeros(v.shape)).astype(np.float32) for k, v in flat.items()})
  analytic = sum(float(np.vdot(np.asarray(g, np.float64), np.asarray(d, np.float64)))
                 for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))

  def central(h):
    at = lambda s: float(fn(jax.tree.map(lambda p, d: p + s * h * d, params, direction), ref, batch, key)[0])
    return (at(1) - at(-1)) / (2 * h)
  fd = (4 * central(0.5) - central(1.0)) / 3  # Richardson: O(h⁴)
  rel = abs(fd - analytic) / abs(analytic)
  print(f"loss {float(loss):.4f}, mean margin {float(sums['margin_sum']) / B:.3f}, accuracy "
        f"{float(sums['correct']) / B:.2f}: directional derivative {analytic:.6e} vs finite differences {fd:.6e} "
        f"(relative error {rel:.1e})")
  assert abs(float(sums["margin_sum"])) / B > 0.1 and abs(float(loss) - math.log(2)) > 0.1  # σ(margin) ≠ ½
  assert rel <= 2e-3


def test_loss_and_metrics_follow_the_formula_on_the_model_fm_errors(setup):
  """L = mean −log σ(−β/2·[(e_w − e_w,ref) − (e_l − e_l,ref)]) + sft·FM(winners), with every e taken from the
  model's own FM loss (NextStep.loss_terms, one pair at a time) — away from policy = reference."""
  from flax import traverse_util
  params, batch = setup
  flat, other = traverse_util.flatten_dict(params), traverse_util.flatten_dict(random_params(TINY, seed=1))
  ref = traverse_util.unflatten_dict({k: 10.0 * other[k] if k[-3:-1] == ("final_layer", "linear") else v
                                      for k, v in flat.items()})
  beta, sft, key = 2.0, 0.3, jax.random.key(5)
  loss, sums, _ = _loss_and_grads(dpo.DpoConfig(beta=beta, sft_weight=sft, ref_dtype="float32"))(params, ref, batch,
                                                                                                 key)
  noise, u = draw_fm_noise(TINY, key, B, T)
  fm = jax.jit(_fm_loss)
  e = {(m, x): np.array([float(fm(p, {k: v[i:i + 1] for k, v in batch.items()}, batch[x][i:i + 1], noise[:, i:i + 1],
                                  u[:, i:i + 1])) for i in range(B)])
       for m, p in (("pol", params), ("ref", ref)) for x in ("image_tokens", dpo.REJECTED)}
  gap_w, gap_l = e["pol", "image_tokens"] - e["ref", "image_tokens"], e["pol", dpo.REJECTED] - e["ref", dpo.REJECTED]
  margin = -beta / 2 * (gap_w - gap_l)
  expected = np.mean(np.log1p(np.exp(-margin))) + sft * np.mean(e["pol", "image_tokens"])
  print(f"loss {float(loss):.6f} vs formula on model FM errors {expected:.6f}; margins {np.round(margin, 3)}")
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(sums["margin_sum"]) / B, margin.mean(), rtol=1e-4, atol=1e-6)
  assert float(sums["correct"]) == np.sum(margin > 0)
  np.testing.assert_allclose(float(sums["gap_w_sum"]) / B, gap_w.mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(sums["gap_l_sum"]) / B, gap_l.mean(), rtol=1e-4, atol=1e-6)


def test_reference_gets_no_gradient(setup):
  params, batch = setup
  ref = jax.tree.map(lambda x: 1.01 * x, params)
  dcfg = dpo.DpoConfig(beta=100.0, ref_dtype="float32")
  g_ref = jax.jit(jax.grad(lambda r: dpo.dpo_loss_and_grads(TINY, dcfg, params, r, batch, jax.random.key(0))[0]))(ref)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_ref))


def _run_steps(params, ref, batches, microbatches, dcfg):
  new_params, hist, _ = train_on_mesh(
      (1, 1, 1), batches, lambda tx, sched, sh, bsh, mesh: dpo.jit_dpo_step(TINY, dcfg, tx, sched, microbatches, sh,
                                                                            bsh, mesh),
      None, params=params, bound=lambda sh: jax.device_put(ref, sh.params))
  return new_params, hist


def test_microbatch_accumulation_equals_one_batch_and_nan_guard(setup):
  params, batch = setup
  ref = jax.tree.map(lambda x: (1.01 * x).astype(jnp.bfloat16), params)  # the default bf16 reference
  dcfg = dpo.DpoConfig(beta=50.0, sft_weight=0.1)  # β amplifies fp32 rounding of the errors: keep it moderate
  bad = dict(batch, **{dpo.REJECTED: batch[dpo.REJECTED].at[1, 2, 3].set(jnp.nan)})
  one, h1 = _run_steps(params, ref, [batch, bad, batch], 1, dcfg)
  two, h2 = _run_steps(params, ref, [batch, bad, batch], 2, dcfg)
  for a, b in zip(h1, h2):  # relative 1e-5; margins and error gaps (differences of O(1) numbers) absolute 1e-5
    for k in ("loss", "dpo_loss", "reward_margin", "reward_accuracy", "error_w", "error_w_gap", "error_l_gap",
              "sft_loss", "grad_norm"):
      if np.isfinite(b[k]):
        scale = 1.0 if k in ("reward_margin", "reward_accuracy", "error_w_gap", "error_l_gap") else abs(float(b[k]))
        assert abs(float(a[k]) - float(b[k])) <= 1e-5 * scale, k
  print(f"2 micro-batches vs 1: params after 3 steps {max_relative_error(two, one):.1e}")
  assert max_relative_error(two, one) <= 1e-5
  assert [bool(m["update_ok"]) for m in h1] == [True, False, True] and int(h1[-1]["skipped_updates"]) == 1
