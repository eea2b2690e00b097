"""The DPO step sharded == single device on the four test meshes (JAX_NOTES §2): loss, first-step gradients and
params after 3 steps, random (nothing-zero) policy and a different bf16 reference on the policy's shardings."""
import jax
import pytest

from nextstep_jax.train import dpo
from nextstep_jax.train.synthetic import synthetic_pair_batch
from sharding_harness import TEST_MESHES, max_relative_error
from train_utils import TINY, perturbed, random_params, train_on_mesh

DCFG = dpo.DpoConfig(beta=50.0, sft_weight=0.1, ref_dtype="bfloat16")
PAIRS, L, T = 8, 40, 16


def pair_batch(i):
  """Synthetic pairs whose losers come from another distribution: the DPO gradient is a difference of winner and
  loser gradients, and β amplifies fp32 rounding of the errors, so less cancellation keeps the comparison at
  the precision the step really has."""
  b = synthetic_pair_batch(TINY, i, PAIRS, L, T)
  b[dpo.REJECTED] = 0.5 * b[dpo.REJECTED] + 0.5
  return b


def run_dpo(mesh_shape, params, ref_params, steps=3):
  """(params after `steps` DPO steps, per-step metrics, first-batch grads) on a mesh."""
  return train_on_mesh(
      mesh_shape, [pair_batch(i) for i in range(steps)],
      lambda tx, sched, sh, bsh, mesh: dpo.jit_dpo_step(TINY, DCFG, tx, sched, 1, sh, bsh, mesh),
      lambda p, r, b: dpo.dpo_loss_and_grads(TINY, DCFG, p, r, b, jax.random.key(9))[2], params=params,
      bound=lambda sh: dpo.as_reference(jax.device_put(ref_params, sh.params), DCFG.ref_dtype, sh.params))


@pytest.fixture(scope="module")
def single():
  params = random_params(TINY)
  ref = perturbed(params, 3)
  return params, ref, run_dpo((1, 1, 1), params, ref)


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_dpo_step_equals_single_device(single, mesh_shape):
  params, ref, (ref_params, ref_hist, ref_grads) = single
  got_params, hist, grads = run_dpo(mesh_shape, params, ref)
  loss_err = max(abs(float(a["loss"]) - float(b["loss"])) / abs(float(b["loss"])) for a, b in zip(hist, ref_hist))
  margin_err = max(abs(float(a["reward_margin"]) - float(b["reward_margin"])) for a, b in zip(hist, ref_hist))
  g_err, p_err = max_relative_error(grads, ref_grads), max_relative_error(got_params, ref_params)
  print(f"mesh {mesh_shape}: loss {loss_err:.1e}, margin (abs) {margin_err:.1e}, grads {g_err:.1e}, params after "
        f"3 steps {p_err:.1e} (relative); margins {[round(float(h['reward_margin']), 3) for h in ref_hist]}")
  assert all(bool(h["update_ok"]) for h in hist)
  assert loss_err <= 1e-5 and g_err <= 1e-5 and p_err <= 1e-5
  assert margin_err <= 3e-5  # β/2 times differences of fp32 errors: ~β·1e-7 of rounding
