"""The GRPO update step (parallel recompute + PPO loss + KL to a bf16 reference) sharded == single device on the
four test meshes (JAX_NOTES §2): loss, first-step gradients and params after one step on a recorded rollout.
Marked slow: each mesh compiles the update step and the gradient program (~2 min on 2 cores)."""
import jax
import pytest

from nextstep_jax.train import dpo, grpo
from sharding_harness import TEST_MESHES, max_relative_error
from test_grpo import gcfg, rollout
from train_utils import TINY, perturbed, random_params, train_on_mesh

# flow_sde: all 4 steps stochastic → the head runs on 8·4·4 = 128 rows.
G = gcfg(sampler="flow_sde", kl_weight=0.2, clip_range=0.05, train_steps=0, ref_dtype="float32")


def run_grpo(mesh_shape, params, ref_params, batches):
  return train_on_mesh(
      mesh_shape, batches,
      lambda tx, sched, sh, bsh, mesh: grpo.jit_grpo_step(TINY, G, tx, sched, 1, sh, bsh, mesh, with_reference=True),
      lambda p, r, b: grpo.grpo_loss_and_grads(TINY, G, p, r, b, jax.random.fold_in(jax.random.key(1), 0))[2],
      params=params,
      bound=lambda sh: dpo.as_reference(jax.device_put(ref_params, sh.params), G.ref_dtype, sh.params))


@pytest.fixture(scope="module")
def single():
  params = random_params(TINY)
  ref = perturbed(params, 3)
  batches = [rollout(TINY, params, G, seed=i, n_prompts=4)[0] for i in range(1)]  # 8 rows: one per device
  return params, ref, batches, run_grpo((1, 1, 1), params, ref, batches)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_grpo_step_equals_single_device(single, mesh_shape):
  params, ref, batches, (ref_params, ref_hist, ref_grads) = single
  got_params, hist, grads = run_grpo(mesh_shape, params, ref, batches)
  loss_err = max(abs(float(a["loss"]) - float(b["loss"])) for a, b in zip(hist, ref_hist))
  g_err, p_err = max_relative_error(grads, ref_grads), max_relative_error(got_params, ref_params)
  print(f"mesh {mesh_shape}: loss (abs) {loss_err:.1e}, grads {g_err:.1e}, params after the step {p_err:.1e}; "
        f"losses {[round(float(h['loss']), 5) for h in ref_hist]}, kl {[float(h['kl']) for h in ref_hist]}")
  assert all(bool(h["update_ok"]) for h in hist)
  assert loss_err <= 1e-6 and g_err <= 1e-5 and p_err <= 1e-5
